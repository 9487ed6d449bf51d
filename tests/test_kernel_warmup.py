"""The start-up warm-up (engine/kernel_warmup.py) must reach every launch variant a serving step can select, so
that no step compiles one inside serving. Variants are keyed here the way the launchers pick their constexprs
(kernels/triton_*.py's config functions); a step shape the warm-up misses fails with the shape named. The
warm-up steps themselves also run through the tiny model's runner (the CPU path of the same code)."""
from __future__ import annotations

import random

import pytest
import torch

import kernels.triton_moe as moe
from engine.block_tables import BlockTables
from engine.config import EngineConfig
from engine.kernel_warmup import AttentionShape, WarmupStep, step_inputs, token_counts, warmup_steps
from engine.kv_cache import allocate_kv_caches
from engine.model_runner import ModelRunner, uniform_rows
from kernels.triton_attention import (
    VERIFY_MAX_Q,
    attention_path,
    decode_config,
    extend_config,
    next_pow2,
    verify_config,
)
from kernels.triton_fp8_gemm import gemm_config, swap_linear_config, tuned_small_m
from model.builder import build_model
from model.parallel import TPGroup

SMS = 132
GROUP = 12  # GLM-4.7: 96 query heads over 8 KV heads, at every TP size
H200 = "NVIDIA_H200"
H100 = "NVIDIA_H100_80GB_HBM3"
BUDGETS = [(8192, 256, 202752), (16384, 64, 131072), (2048, 8, 8192)]  # (max tokens, max seqs, max model len)


def attention_variants(b: int, t: int, max_q: int, max_seq: int, hk: int, fp8: bool) -> set[tuple]:
    """The compiled variants (kernel, constexprs) one step's attention launches, read off _launch_* in
    kernels/triton_attention.py (written here apart from engine/kernel_warmup.py's AttentionShape.variants)."""
    path = attention_path(max_q, t, b)
    if path == "extend":
        return {("extend", *sorted(extend_config(max_q, 128).items()))}
    if path == "decode":
        c = decode_config(b, hk, max_seq, SMS, fp8)
        out = {("decode", c["block_n"], c["splits"] > 1, c["stages"])}
        by_token = False
    else:
        c = verify_config(b, hk, GROUP, max_q, max_seq, SMS, fp8)
        out = {("verify", c["block_m"], c["row_blocks"], c["block_n"], c["splits"] > 1, c["warps"], c["stages"])}
        by_token = True
    if c["splits"] > 1:
        out.add(("reduce", max(2, next_pow2(c["splits"])), by_token))
    return out


def warmup_attention(max_tokens: int, max_seqs: int, max_len: int, hk: int, fp8: bool) -> set[tuple]:
    """The variants the warm-up's steps launch, each at the context the runner gives attention for it (the
    longest possible one for decode-shaped steps: engine/model_runner.py uniform_rows)."""
    keys: set[tuple] = set()
    for s in warmup_steps(max_tokens, max_seqs, max_len, AttentionShape(hk, GROUP, 128, fp8, SMS)):
        ctx = max_len if uniform_rows(step_inputs(s, 16, 1 << 20)) else s.context
        keys |= attention_variants(s.sequences, s.tokens, s.query, ctx, hk, fp8)
    return keys


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("hk", [8, 2, 1])  # TP1, TP4, TP8 shards
@pytest.mark.parametrize("fp8", [False, True])
def test_every_serving_step_attention_variant_is_warmed_up(budget, hk, fp8):
    """Random serving steps: mixed (one request of q tokens next to decodes, or all alike) at their real
    context, and decode / verify-shaped ones (every row sampled) at the longest context, as the runner runs
    them outside the CUDA graphs (up to max_num_seqs rows: larger ones only run in the graphs)."""
    max_tokens, max_seqs, max_len = budget
    warm = warmup_attention(max_tokens, max_seqs, max_len, hk, fp8)
    rng = random.Random(hk * 2 + fp8)
    for _ in range(20000):
        b = rng.randint(1, max_seqs)
        if rng.random() < 0.3:  # decode / verify-shaped
            q = rng.randint(1, min(VERIFY_MAX_Q, max_seqs // b))
            t, max_seq = b * q, max_len
        else:
            q = rng.choice([1, 1, rng.randint(1, VERIFY_MAX_Q), rng.randint(1, max_tokens)])
            if q > max_tokens - (b - 1):  # one request of q tokens next to b - 1 decodes
                q = max(1, max_tokens - (b - 1))
            t = q + b - 1 if rng.random() < 0.5 else min(max_tokens, b * q)  # mixed step / all alike
            max_seq = rng.randint(q, max_len)
        missing = attention_variants(b, t, q, max_seq, hk, fp8) - warm
        assert not missing, f"step (batch {b}, {t} tokens, max query {q}, max context {max_seq}): {missing}"


def _moe_configs(device: str, e: int, n: int, m: int) -> tuple:
    saved = moe.device_name
    moe.device_name = lambda _d: device  # the tuned table of that GPU
    try:
        return tuple(sorted(moe.moe_config(m, e, n, 5120, "fp8_channel", torch.device("cpu")).items()))
    finally:
        moe.device_name = saved


@pytest.mark.parametrize("max_tokens", [8192, 16384, 3000])
def test_every_token_count_bucket_is_warmed_up(max_tokens):
    """GEMM (swap-AB / Triton / heuristic) and fused-MoE configs are bucketed by token count: every count a
    step can have selects a config that one of the warm-up's token counts selects too."""
    warm_counts = {s.tokens for s in warmup_steps(max_tokens, 256, 202752, AttentionShape(8, GROUP, 128, True, SMS))}
    assert set(token_counts(max_tokens)) <= warm_counts
    shapes = [(12288 + 1024, 5120), (5120, 12288), (1536, 5120), (384, 5120), (5120, 1536)]
    pickers = {
        "gemm heuristic": lambda m, n, k: tuple(sorted(gemm_config(m, n, k, False).items())),
        "gemm tuned": lambda m, n, k: repr(tuned_small_m(H200, n, k, m)),
        "swap-AB": lambda m, n, k: repr(swap_linear_config(H200, n, k, m)),
        "moe 1536": lambda m, n, k: _moe_configs(H200, 161, 1536, m),
        "moe 192": lambda m, n, k: _moe_configs(H200, 161, 192, m),
        "moe 384 H100": lambda m, n, k: _moe_configs(H100, 161, 384, m),  # a 16,384-token bucket
    }
    for name, pick in pickers.items():
        for n, k in shapes:
            warm = {pick(m, n, k) for m in warm_counts}
            for m in range(1, max_tokens + 1):
                assert pick(m, n, k) in warm, f"{name} [{n}, {k}]: {m} tokens select a config no warm-up step does"


def _cpu_runner(checkpoint, max_model_len: int, num_blocks: int) -> tuple[EngineConfig, ModelRunner]:
    """The tiny model's runner on CPU in float32 over num_blocks pages of 16 tokens."""
    config = EngineConfig.create(str(checkpoint), device="cpu", max_model_len=max_model_len)
    cpu = torch.device("cpu")
    model = build_model(config.model, cpu, torch.float32, TPGroup(), "auto", 0, progress=False)
    kv = allocate_kv_caches(config.model, TPGroup(), list(range(config.model.num_hidden_layers)), num_blocks, 16,
                            torch.float32, cpu)
    return config, ModelRunner(model, kv, cpu)


def test_warmup_steps_run_through_the_model(tiny_bf16):
    """The warm-up's inputs are valid steps: the runner takes each of them (CPU path of the same code), and
    logits come for no more rows than the step has sequences unless it is decode-shaped."""
    config, runner = _cpu_runner(tiny_bf16, max_model_len=512, num_blocks=64)
    steps = warmup_steps(256, 8, 512, AttentionShape(config.model.num_key_value_heads, config.model.num_attention_heads
                         // config.model.num_key_value_heads, config.model.head_dim, False, SMS))
    assert {s.query for s in steps} >= set(range(1, VERIFY_MAX_Q + 1))
    assert any(s.all_logits for s in steps) and any(not s.all_logits and s.query == 1 for s in steps)
    for s in steps[:: max(1, len(steps) // 40)]:
        inp = step_inputs(s, 16, 64)
        assert 1 <= len(inp.logits_rows) <= max(s.sequences, s.tokens if s.all_logits else 0)
        logits = runner.run(inp).logits
        assert logits.shape[0] == len(inp.logits_rows) and torch.isfinite(logits).all()


@pytest.mark.parametrize("pages", [1, 15, 16, 17, 513])
def test_block_tables_reach_the_kernels_padded_to_a_multiple_of_16(tiny_bf16, pages):
    """The attention kernels take the table's width as an int argument that Triton specializes on its
    divisibility by 16: the runner pads every table so a step's longest sequence cannot select a new variant."""
    _, runner = _cpu_runner(tiny_bf16, max_model_len=16 * 600, num_blocks=600)
    inp = step_inputs(WarmupStep(2, 1, 16 * pages), 16, 600)
    inp.block_tables = BlockTables.build([inp.block_tables.row(0)[:pages], inp.block_tables.row(1)[:1]])  # shorter 2nd
    _, ctx = runner.build_context(inp)
    width = ctx.block_tables.shape[1]
    assert width % 16 == 0 and width >= pages and ctx.block_tables.stride(0) == width
    assert ctx.block_tables[1, 1:].eq(0).all() and ctx.block_tables[0, :pages].tolist() == list(range(pages))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@pytest.mark.parametrize("max_tokens,max_seqs,max_model_len", BUDGETS)
def test_sdpa_prefill_plans_cover_every_length_bucket(max_tokens, max_seqs, max_model_len):
    """With the SDPA prefill path, cuDNN keys its plans on the query and key lengths rounded up to powers of two
    (kernels/sdpa_prefill.py): the warm-up must meet every (query bucket, cached-prefix bucket) pair a prefill row
    can have -- the prefix part (query x prefix keys) and the square part (query x query) of the merge, and the
    square call without a prefix -- and nothing of it where the path is off."""
    shape = AttentionShape(1, GROUP, 128, False, SMS)
    threshold = 4096
    plain = warmup_steps(max_tokens, max_seqs, max_model_len, shape)
    steps = warmup_steps(max_tokens, max_seqs, max_model_len, shape, threshold)
    extra = [s for s in steps if s not in plain]
    assert all(s in steps for s in plain)
    assert all(s.sequences == 1 and s.query >= threshold and s.context > s.query for s in extra)
    seen = set()
    for s in steps:
        if s.sequences == 1 and s.query >= threshold:
            seen.add((_pow2(s.query), _pow2(s.context - s.query) if s.context > s.query else 0))
    rng = random.Random(1)
    for _ in range(5000):
        q = rng.randint(threshold, min(max_tokens, max_model_len)) if threshold <= min(max_tokens, max_model_len) \
            else None
        if q is None:
            break
        p = rng.choice([0, rng.randint(1, max_model_len - q)]) if max_model_len > q else 0
        assert (_pow2(q), _pow2(p) if p else 0) in seen, (q, p)
    if threshold > min(max_tokens, max_model_len):
        assert steps == plain
