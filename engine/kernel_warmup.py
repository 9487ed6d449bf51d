"""Start-up warm-up: compile the Triton kernels' variants before the first request (CUDA).

Triton compiles a kernel variant the first time it meets a new set of constexprs (launch configs chosen by token
count, query length, batch and context: kernels/triton_*.py's `*_config` functions). Without a warm-up, the
first serving step of a new shape compiles inside the step: a mixed step that stalls every running decode for a
second or more (bench/RESULTS.md, session 14: "slow step" lines of 1.0-1.5 s at 16 / 25 / 8192 tokens). The
steps below cover those choices: every token count up to 64 and each power of two (and one above it) up to the
step budget, for the GEMM / MoE / routing buckets (and the extend attention configs); for single-token and
verify-sized queries (2..16 tokens), one batch per distinct decode / verify variant the attention configs select
on this rank's head layout (row blocks, 64 / 128-key tiles, stages, split or not); one sequence over growing
contexts for the split reduction's width. Steps run through the model like real ones, over page 0 of
the real KV cache (before any request owns a page), on every TP rank alike (the forwards all-reduce).

With the SDPA prefill path (kernels/sdpa_prefill.py) the same holds for cuDNN: it builds an execution plan per
power-of-two bucket of the query and key lengths (40-140 ms each on the H200), so one prompt per query bucket
from the path's threshold on, after a cached prefix of each power-of-two length that fits, builds them all (the
prompts without a prefix are among the token-count steps).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.block_tables import BlockTables
from engine.model_runner import MAX_UNIFORM_Q, StepInputs
from kernels.triton_attention import (VERIFY_MAX_Q, attention_path, decode_config, extend_config, next_pow2,
                                      verify_config)

SMALL_COUNTS = 64  # every token count up to this one (the tuned small-M GEMM tables have buckets in here)
LONG_CONTEXT = 16384  # long enough for the most splits (64) of decode / verify at a small batch


@dataclass(frozen=True)
class AttentionShape:
    """What the attention kernels' launch configs depend on besides the step: this rank's KV heads, query
    heads per KV head, head size, FP8 pages, the GPU's SMs."""

    kv_heads: int
    group: int
    head_dim: int
    fp8_kv: bool
    num_sms: int

    def variants(self, sequences: int, query: int, context: int) -> set[tuple]:
        """The attention kernels' compiled variants a step of `sequences` requests of `query` tokens each at
        `context` launches: the constexprs _launch_decode / _launch_verify / _launch_extend in
        kernels/triton_attention.py pick, and the split reduction's width where the KV is split."""
        path = attention_path(query, sequences * query, sequences)
        if path == "extend":
            return {("extend", *sorted(extend_config(query, self.head_dim).items()))}
        if path == "decode":
            c = decode_config(sequences, self.kv_heads, context, self.num_sms, self.fp8_kv)
            out = {("decode", c["block_n"], c["splits"] > 1, c["stages"])}
        else:
            c = verify_config(sequences, self.kv_heads, self.group, query, context, self.num_sms, self.fp8_kv)
            out = {("verify", c["block_m"], c["row_blocks"], c["block_n"], c["splits"] > 1, c["warps"], c["stages"])}
        if c["splits"] > 1:
            out.add(("reduce", path, max(2, next_pow2(c["splits"]))))
        return out


@dataclass(frozen=True)
class WarmupStep:
    """`sequences` requests of `query` new tokens each, after `context - query` cached ones. all_logits: every
    row's logits, the shape of a decode / verify step, for which the runner tells attention the longest possible
    context instead of this one (ModelRunner.decode_max_seq_len). Decode / verify steps of more rows than
    max_num_seqs are not warmed up here: they run in the CUDA graphs, compiled at capture."""

    sequences: int
    query: int
    context: int
    all_logits: bool = False

    @property
    def tokens(self) -> int:
        return self.sequences * self.query

    def attention_context(self, max_model_len: int) -> int:
        """The context the attention kernels' configs see for this step (engine/model_runner.py uniform_rows)."""
        uniform = (self.all_logits or self.tokens == 1) and self.query <= MAX_UNIFORM_Q
        return max_model_len if uniform else self.context


def token_counts(max_tokens: int) -> list[int]:
    """Token counts whose steps select every bucketed launch config: 1..SMALL_COUNTS, then 2^k and 2^k + 1."""
    counts = set(range(1, min(SMALL_COUNTS, max_tokens) + 1))
    p = SMALL_COUNTS
    while p <= max_tokens:
        counts.update((p, p + 1))
        p *= 2
    counts.add(max_tokens)
    return sorted(c for c in counts if c <= max_tokens)


def warmup_steps(max_tokens: int, max_seqs: int, max_model_len: int, attention: AttentionShape,
                 sdpa_min_tokens: int | None = None) -> list[WarmupStep]:
    """The warm-up's steps for a step budget of max_tokens tokens and max_seqs sequences: one prompt per token
    count; for every query length up to VERIFY_MAX_Q, the first batch of each decode / verify / reduction variant
    (short or long context, or decode-shaped); one or two sequences over growing contexts (the reductions'
    widths). sdpa_min_tokens: the SDPA prefill path's threshold where it runs (its cuDNN plans, see above)."""
    prompts = token_counts(min(max_tokens, max_model_len))
    steps = [WarmupStep(1, t, t) for t in prompts]
    if sdpa_min_tokens is not None:
        for bucket in sorted({next_pow2(t) for t in prompts if t >= sdpa_min_tokens}):
            q = max(sdpa_min_tokens, bucket // 2 + 1)  # the bucket's shortest query leaves the most room for a prefix
            room, prefix = max_model_len - q, 1
            while prefix // 2 < room:  # a prefix in (prefix / 2, prefix]: the longest that fits
                steps.append(WarmupStep(1, q, q + min(prefix, room)))
                prefix *= 2
    long_ctx = min(LONG_CONTEXT, max_model_len)
    forms = [(long_ctx, True), (long_ctx, False), (1, False)]  # (context, all_logits); 1: as short as q allows
    seen: set[tuple] = set()
    for q in range(1, VERIFY_MAX_Q + 1):
        for b in range(1, min(max_seqs, max_tokens // q) + 1):
            for ctx, all_logits in forms:
                if all_logits and b * q > max_seqs:  # more logits rows than the memory profile allowed for
                    continue
                step = WarmupStep(b, q, max(q, ctx), all_logits)
                keys = attention.variants(b, q, step.attention_context(max_model_len))
                if step.context <= max_model_len and not keys <= seen:
                    seen |= keys
                    steps.append(step)
    # split counts: a reduction's width is a power of two >= the splits, which grow with the context
    ctx = 128
    while ctx < long_ctx:
        steps += [WarmupStep(b, q, ctx) for b, q in ((2, 1), (1, 2)) if b <= max_seqs]
        ctx *= 2
    return steps


def step_inputs(step: WarmupStep, block_size: int, num_blocks: int) -> StepInputs:
    """A step over pages 0..n-1 of the cache (every sequence uses the same pages: what they read and write is
    throwaway). Logits: every row (all_logits), else each sequence's last row, or with one row per sequence
    all rows but the first; never more rows than the step has sequences unless all_logits (the start-up memory
    profile sized the logits for max_num_seqs rows)."""
    pages = -(-step.context // block_size)
    table = [p % num_blocks for p in range(pages)]
    ids, positions, slots, qsl = [], [], [], [0]
    for _ in range(step.sequences):
        for pos in range(step.context - step.query, step.context):
            ids.append(0)
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + step.query)
    if step.all_logits:
        rows = list(range(len(ids)))
    elif step.query > 1:  # each sequence's last row
        rows = [end - 1 for end in qsl[1:]]
    else:  # one row each: all but the first (a lone sequence's row makes it decode-shaped whatever we ask)
        rows = list(range(min(1, len(ids) - 1), len(ids)))
    return StepInputs(input_ids=ids, positions=positions, slot_mapping=slots,
                      block_tables=BlockTables.build([table] * step.sequences),
                      seq_lens=[step.context] * step.sequences, query_start_loc=qsl, logits_rows=rows)


__all__ = ["AttentionShape", "WarmupStep", "step_inputs", "token_counts", "warmup_steps"]
