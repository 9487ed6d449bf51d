"""Turns a scheduled step into the step's inputs (plain lists, cheap to broadcast to TP ranks), runs the
model on them and returns the logits rows the engine needs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.device_copy import to_device
from engine.scheduler import ScheduledRequest
from model.context import ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM


@dataclass
class StepInputs:
    """Everything every TP rank needs for one forward (host-side lists)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]
    seq_lens: list[int]
    query_start_loc: list[int]
    logits_rows: list[int]  # rows of the hidden states whose logits are computed
    # Overlap scheduling: input tokens sampled by the step still in flight, as (input index, row of that
    # step's sampled-token tensor); the runner fills them on the device.
    future_fill: list[tuple[int, int]] = field(default_factory=list)
    num_future: int = 0  # length of that sampled-token tensor


@dataclass
class StepLayout:
    """Where each scheduled request's logits are (rank 0 only).

    sample_rows[i]  logits row of scheduled request i's next token, or -1 when it does not sample
    prompt_rows[i]  (first_row, first_target_position, count) of rows predicting prompt tokens, or None
    """

    sample_rows: list[int] = field(default_factory=list)
    prompt_rows: list[tuple[int, int, int] | None] = field(default_factory=list)


PLACEHOLDER = -1  # an output token sampled by the in-flight step, not yet known on the host


def prepare_step(
    batch: list[ScheduledRequest], block_size: int, num_future: int = 0
) -> tuple[StepInputs, StepLayout]:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens = []
    rows: list[int] = []
    future: list[tuple[int, int]] = []
    layout = StepLayout()
    for s in batch:
        req = s.request
        offset = qsl[-1]
        ids.extend(req.tokens(s.start, s.end))
        if s.end == req.num_tokens and req.output_token_ids and req.output_token_ids[-1] == PLACEHOLDER:
            future.append((offset + s.num_tokens - 1, req.extra["future_row"]))
        pos = range(s.start, s.end)
        positions.extend(pos)
        table = req.block_ids
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        qsl.append(offset + s.num_tokens)
        seq_lens.append(s.end)
        pr = None
        if req.params.prompt_logprobs is not None:
            # Row for position p predicts token p+1; targets are prompt tokens 1..P-1 not yet scored.
            first_target = max(s.start + 1, req.prompt_logprobs_upto, 1)
            last_target = min(s.end, req.num_prompt_tokens - 1)
            if last_target >= first_target:
                pr = (len(rows), first_target, last_target - first_target + 1)
                rows.extend(offset + (p - 1 - s.start) for p in range(first_target, last_target + 1))
        layout.prompt_rows.append(pr)
        if s.samples:
            layout.sample_rows.append(len(rows))
            rows.append(offset + s.num_tokens - 1)
        else:
            layout.sample_rows.append(-1)
    max_blocks = max(len(s.request.block_ids) for s in batch)
    tables = [s.request.block_ids + [0] * (max_blocks - len(s.request.block_ids)) for s in batch]
    inputs = StepInputs(ids, positions, slots, tables, seq_lens, qsl, rows, future, num_future if future else 0)
    return inputs, layout


def fill_future(input_ids: torch.Tensor, inp: StepInputs, future: torch.Tensor | None) -> None:
    """Write the in-flight step's sampled tokens into their input positions (on the device)."""
    if not inp.future_fill:
        return
    if future is None:
        raise RuntimeError("step inputs reference tokens of an in-flight step, but none were given")
    dst = to_device([i for i, _ in inp.future_fill], torch.long, input_ids.device)
    src = to_device([r for _, r in inp.future_fill], torch.long, future.device)
    input_ids.index_copy_(0, dst, future.index_select(0, src).to(input_ids.dtype))


class ModelRunner:
    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.k_scale, self.v_scale = k_scale, v_scale
        self.graphs = None  # engine.cuda_graphs.DecodeGraphs once captured
        # Decode steps tell attention the largest possible KV length, as the CUDA graphs must: the kernel's
        # split-K layout (and so its rounding) is then the same eager or replayed.
        self.decode_max_seq_len: int | None = None

    def build_context(self, inp: StepInputs) -> tuple[torch.Tensor, ForwardContext]:
        dev = self.device
        q_lens = [b - a for a, b in zip(inp.query_start_loc, inp.query_start_loc[1:])]
        ctx = ForwardContext(
            positions=to_device(inp.positions, torch.long, dev),
            slot_mapping=to_device(inp.slot_mapping, torch.long, dev),
            block_tables=to_device(inp.block_tables, torch.int32, dev),
            seq_lens=to_device(inp.seq_lens, torch.int32, dev),
            query_start_loc=to_device(inp.query_start_loc, torch.int32, dev),
            max_query_len=max(q_lens),
            max_seq_len=self.decode_max_seq_len if max(q_lens) == 1 and self.decode_max_seq_len else max(inp.seq_lens),
            kv_caches=self.kv_caches,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return to_device(inp.input_ids, torch.long, dev), ctx

    @torch.inference_mode()
    def run(self, inp: StepInputs, future: torch.Tensor | None = None) -> torch.Tensor:
        """Forward + LM head on the requested rows: fp32 logits [len(logits_rows), vocab]. `future` is the
        in-flight step's sampled tokens when `inp.future_fill` refers to them."""
        if self.graphs is not None:
            from engine.cuda_graphs import is_graphable

            if is_graphable(inp, self.graphs.max_batch):
                return self.graphs.run(inp, future)
        input_ids, ctx = self.build_context(inp)
        fill_future(input_ids, inp, future)
        hidden = self.model(input_ids, ctx)
        index = to_device(inp.logits_rows, torch.long, hidden.device)
        return self.model.compute_logits(hidden.index_select(0, index))
