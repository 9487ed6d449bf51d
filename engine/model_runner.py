"""Turns a scheduled step into the step's inputs (plain lists, cheap to broadcast to TP ranks), runs the
model on them and returns the logits rows the engine needs, and the prompt-logprob scores of the rows that predict
prompt tokens (engine/logprobs.py).

A scheduled request contributes a run of query rows: a prompt chunk, one token (decode), or its last token
plus k draft tokens (verify). Every position that yields a token gets a logits row: the last one of a
request that reaches its end, and each draft position before it. Input ids the host does not know yet
(sampled by the in-flight step under overlap scheduling) are read from the device token table."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.block_tables import BlockTables
from engine.device_copy import to_device
from engine.kv_connector import KVSend
from engine.logprobs import MIN_PROMPT_SLICE_ROWS, LogprobScores, PromptRows, score_rows
from engine.scheduler import ScheduledRequest
from engine.token_table import TokenTable
from model.context import ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM
from spec import MtpBatch, MtpDraftBatch

MAX_UNIFORM_Q = 32  # decode / verify chains up to this many rows per request count as graph-shaped steps


@dataclass
class StepInputs:
    """Everything every TP rank needs for one forward (host-side lists)."""

    input_ids: list[int]  # 0 where table_reads supplies the id
    positions: list[int]
    slot_mapping: list[int]
    block_tables: BlockTables  # the requests' pages, one row each
    seq_lens: list[int]
    query_start_loc: list[int]
    logits_rows: list[int]  # rows of the hidden states whose logits are computed (sampled positions)
    # Device token table: where the previous step's sampled tokens go (one (slot, position) per entry of that
    # step's sampled-token tensor), and which inputs come from the table ((input index, slot, position)).
    table_writes: list[tuple[int, int]] = field(default_factory=list)
    table_reads: list[tuple[int, int, int]] = field(default_factory=list)
    keep_hidden: bool = False  # keep the final hidden states of every row (the MTP drafter reads them next)
    kv_sends: list[KVSend] = field(default_factory=list)  # disaggregation: pages to send once this step ran
    prompt: PromptRows | None = None  # rows predicting prompt tokens of prompt-logprobs requests, scored in the forward


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # fp32 [len(logits_rows), vocab]
    prompt_scores: LogprobScores | None  # for StepInputs.prompt


@dataclass
class StepLayout:
    """Where each scheduled request's logits are (rank 0 only).

    sample_rows[i]  logits rows of scheduled request i's sampled positions: one for a plain step, k + 1 for a
                    verify step with k drafts (the drafts' positions, then the bonus position), [] if none
    prompt_rows[i]  (first prompt-score row, first_target_position, count) of rows predicting prompt tokens, or None
    """

    sample_rows: list[list[int]] = field(default_factory=list)
    prompt_rows: list[tuple[int, int, int] | None] = field(default_factory=list)
    row_offsets: list[int] = field(default_factory=list)  # first packed row of each scheduled request


def prepare_step(
    batch: list[ScheduledRequest], block_size: int, pad_q: int = 0
) -> tuple[StepInputs, StepLayout]:
    """pad_q > 0 (a CUDA-graph verify shape): every request is a decode or verify whose chain is padded to
    pad_q rows with filler tokens that write no KV and whose logits are never sampled."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens = []
    rows: list[int] = []
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    top_k = 0
    reads: list[tuple[int, int, int]] = []
    layout = StepLayout()
    for s in batch:
        req = s.request
        offset = qsl[-1]
        layout.row_offsets.append(offset)
        base_end = s.end - s.num_drafts  # positions before this hold the request's own tokens
        known_end = min(base_end, req.num_known_tokens)
        ids.extend(req.tokens(s.start, known_end) if known_end > s.start else ())
        for pos in range(max(s.start, known_end), base_end):
            reads.append((len(ids), req.table_slot, pos))
            ids.append(0)
        ids.extend(s.drafts)
        pos = range(s.start, s.end)
        positions.extend(pos)
        table = req.block_ids
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        pad = 0
        if pad_q:
            pad = pad_q - s.num_tokens
            if pad < 0:
                raise ValueError(f"a request with {s.num_tokens} query rows cannot be padded to {pad_q}")
            ids.extend([ids[-1]] * pad)
            positions.extend(range(s.end, s.end + pad))
            slots.extend([-1] * pad)
        qsl.append(offset + s.num_tokens + pad)
        seq_lens.append(s.end + pad)
        pr = None
        if req.params.prompt_logprobs is not None and not pad_q:
            # Row for position p predicts token p+1; targets are prompt tokens 1..P-1 not yet scored.
            first_target = max(s.start + 1, req.prompt_logprobs_upto, 1)
            last_target = min(s.end, req.num_prompt_tokens - 1)
            if last_target >= first_target:
                pr = (len(prompt_rows), first_target, last_target - first_target + 1)
                prompt_rows.extend(offset + (p - 1 - s.start) for p in range(first_target, last_target + 1))
                prompt_targets.extend(req.prompt_token_ids[first_target : last_target + 1])
                top_k = max(top_k, req.params.prompt_logprobs)
        layout.prompt_rows.append(pr)
        if s.samples:
            first = offset + s.num_tokens - s.num_drafts - 1
            if pad_q:
                layout.sample_rows.append(list(range(first, first + s.num_drafts + 1)))
            else:
                layout.sample_rows.append(list(range(len(rows), len(rows) + s.num_drafts + 1)))
                rows.extend(range(first, first + s.num_drafts + 1))
        else:
            layout.sample_rows.append([])
    if pad_q:
        rows = list(range(len(ids)))
    tables = BlockTables.build([s.request.block_ids for s in batch])
    prompt = PromptRows(prompt_rows, prompt_targets, top_k) if prompt_rows else None
    inputs = StepInputs(ids, positions, slots, tables, seq_lens, qsl, rows, table_reads=reads, prompt=prompt)
    return inputs, layout


def uniform_rows(inp: StepInputs) -> int:
    """q > 0 when every request of the step has exactly q <= MAX_UNIFORM_Q query rows and every row's logits
    are wanted (a decode or verify step: the shape CUDA graphs capture); else 0."""
    b, t = len(inp.seq_lens), len(inp.input_ids)
    q = t // b if b and t % b == 0 else 0
    if not 0 < q <= MAX_UNIFORM_Q or len(inp.logits_rows) != t or inp.prompt is not None:
        return 0
    if inp.query_start_loc != list(range(0, t + 1, q)) or inp.logits_rows != list(range(t)):
        return 0
    return q


class ModelRunner:
    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        token_table: TokenTable | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.k_scale, self.v_scale = k_scale, v_scale
        self.token_table = token_table
        self.graphs = None  # engine.cuda_graphs.DecodeGraphs once captured
        self.prefill_graphs = None  # engine.prefill_graphs.PrefillGraphs once captured (piecewise; default on CUDA)
        self.mtp_graphs = None  # engine.mtp_graphs.MtpDraftGraphs once captured (MTP speculation)
        self.target_hidden: torch.Tensor | None = None  # the last target forward's hidden states (keep_hidden)
        self.mtp_hidden: torch.Tensor | None = None  # the last NextN-layer forward's output
        # Decode and verify steps tell attention the largest possible KV length, as the CUDA graphs must: the
        # kernel's split-K layout (and so its rounding) is then the same eager or replayed.
        self.decode_max_seq_len: int | None = None
        # keys a prefill step may gather into packed K/V (ForwardContext.max_packed_kv): the worker's reserve
        self.max_packed_kv = 0
        # prompt rows scored at once (engine.logprobs.prompt_slice_rows: the slice the memory profile scores)
        self.prompt_slice_rows = MIN_PROMPT_SLICE_ROWS

    def build_context(self, inp: StepInputs) -> tuple[torch.Tensor, ForwardContext]:
        dev = self.device
        max_q = max(b - a for a, b in zip(inp.query_start_loc, inp.query_start_loc[1:]))
        fixed_len = uniform_rows(inp) > 0 and self.decode_max_seq_len is not None
        ctx = ForwardContext(
            positions=to_device(inp.positions, torch.long, dev),
            slot_mapping=to_device(inp.slot_mapping, torch.long, dev),
            block_tables=inp.block_tables.to_device(dev),
            seq_lens=to_device(inp.seq_lens, torch.int32, dev),
            query_start_loc=to_device(inp.query_start_loc, torch.int32, dev),
            max_query_len=max_q,
            max_seq_len=self.decode_max_seq_len if fixed_len else max(inp.seq_lens),
            kv_caches=self.kv_caches,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            host_query_start_loc=inp.query_start_loc,
            host_seq_lens=inp.seq_lens,
            max_packed_kv=self.max_packed_kv,
        )
        return to_device(inp.input_ids, torch.long, dev), ctx

    def fill_inputs(self, input_ids: torch.Tensor, inp: StepInputs, prev_tokens: torch.Tensor | None) -> None:
        """Record the previous step's sampled tokens in the token table, then read the ids the host lacks."""
        if not (inp.table_writes or inp.table_reads):
            return
        if self.token_table is None:
            raise RuntimeError("step inputs use the device token table, but this runner has none")
        if inp.table_writes:
            if prev_tokens is None:
                raise RuntimeError("step inputs record the previous step's tokens, but none were given")
            self.token_table.write(inp.table_writes, prev_tokens)
        self.token_table.read_into(input_ids, inp.table_reads)

    @torch.inference_mode()
    def run(self, inp: StepInputs, prev_tokens: torch.Tensor | None = None) -> StepOutput:
        """Forward + LM head on the requested rows, and the prompt rows' scores. `prev_tokens`: the previous step's
        sampled tokens when `inp.table_writes` records them."""
        scores = None
        if self.graphs is not None and self.graphs.can_run(inp):
            logits, hidden = self.graphs.run(inp, lambda ids: self.fill_inputs(ids, inp, prev_tokens))
        else:
            input_ids, ctx = self.build_context(inp)
            self.fill_inputs(input_ids, inp, prev_tokens)
            pieces = self.prefill_graphs
            if pieces is not None and pieces.can_run(input_ids, ctx):
                hidden = pieces.run(input_ids, ctx)
            else:
                hidden = self.model(input_ids, ctx)
            index = to_device(inp.logits_rows, torch.long, hidden.device)
            logits = self.model.compute_logits(hidden.index_select(0, index))
            if inp.prompt is not None:
                scores = score_rows(hidden, inp.prompt, self.model.compute_logits, self.prompt_slice_rows)
        self.target_hidden = hidden if inp.keep_hidden else None
        return StepOutput(logits, scores)

    def mtp_graph_rows(self, batch: int, max_kept: int) -> int:
        return self.mtp_graphs.rows_for(batch, max_kept) if self.mtp_graphs is not None else 0

    @torch.inference_mode()
    def run_mtp_draft(self, batch: MtpDraftBatch) -> list[list[int]]:
        """The step's whole NextN draft (extend + chain) in one graph replay; every request's drafts."""
        if self.target_hidden is None:
            raise RuntimeError("an MTP draft reads the target's hidden states, but none were kept")
        self.mtp_hidden = None
        return self.mtp_graphs.run(batch, self.target_hidden)

    @torch.inference_mode()
    def run_mtp(self, batch: MtpBatch) -> torch.Tensor:
        """One NextN-layer forward (its KV is layer num_hidden_layers); logits of batch.logits_rows."""
        source = self.target_hidden if batch.hidden_source == "target" else self.mtp_hidden
        if source is None:
            raise RuntimeError(f"an MTP step reads the {batch.hidden_source} hidden states, but none were kept")
        dev = self.device
        ctx = ForwardContext(
            positions=to_device(batch.positions, torch.long, dev),
            slot_mapping=to_device(batch.slot_mapping, torch.long, dev),
            block_tables=BlockTables.build(batch.block_tables).to_device(dev),
            seq_lens=to_device(batch.seq_lens, torch.int32, dev),
            query_start_loc=to_device(batch.query_start_loc, torch.int32, dev),
            max_query_len=max(b - a for a, b in zip(batch.query_start_loc, batch.query_start_loc[1:])),
            max_seq_len=max(batch.seq_lens),
            kv_caches=self.kv_caches,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            host_query_start_loc=batch.query_start_loc,
            host_seq_lens=batch.seq_lens,
            max_packed_kv=self.max_packed_kv,
        )
        prev = source.index_select(0, to_device(batch.hidden_rows, torch.long, dev))
        out = self.model.mtp_forward(to_device(batch.input_ids, torch.long, dev), prev, ctx)
        self.mtp_hidden = out
        return self.model.compute_logits(out.index_select(0, to_device(batch.logits_rows, torch.long, dev)))

