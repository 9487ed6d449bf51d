"""Turns a scheduled step into tensors, runs the model and returns the logits rows the engine needs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.scheduler import ScheduledRequest
from model.context import ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM


@dataclass
class StepLogits:
    """Logits rows computed for one step.

    sample_rows[i]  row of scheduled request i's next-token logits, or -1 when it does not sample
    prompt_rows[i]  (first_row, first_target_position, count): logits rows predicting prompt tokens
                    first_target_position .. +count for prompt logprobs, or None
    """

    logits: torch.Tensor
    sample_rows: list[int] = field(default_factory=list)
    prompt_rows: list[tuple[int, int, int] | None] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.k_scale, self.v_scale = k_scale, v_scale

    def build_context(self, batch: list[ScheduledRequest]) -> tuple[torch.Tensor, ForwardContext]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens = []
        for s in batch:
            req = s.request
            ids.extend(req.tokens(s.start, s.end))
            pos = range(s.start, s.end)
            positions.extend(pos)
            slots.extend(req.block_ids[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + s.num_tokens)
            seq_lens.append(s.end)
        max_blocks = max(len(s.request.block_ids) for s in batch)
        tables = [s.request.block_ids + [0] * (max_blocks - len(s.request.block_ids)) for s in batch]
        dev = self.device
        ctx = ForwardContext(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            max_query_len=max(s.num_tokens for s in batch),
            max_seq_len=max(seq_lens),
            kv_caches=self.kv_caches,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledRequest]) -> StepLogits:
        input_ids, ctx = self.build_context(batch)
        hidden = self.model(input_ids, ctx)
        rows: list[int] = []
        out = StepLogits(logits=hidden.new_empty(0))
        offset = 0
        for s in batch:
            req = s.request
            pr = None
            if req.params.prompt_logprobs is not None:
                # Row for position p predicts token p+1; targets are prompt tokens 1..P-1 not yet scored.
                first_target = max(s.start + 1, req.prompt_logprobs_upto, 1)
                last_target = min(s.end, req.num_prompt_tokens - 1)
                if last_target >= first_target:
                    pr = (len(rows), first_target, last_target - first_target + 1)
                    rows.extend(offset + (p - 1 - s.start) for p in range(first_target, last_target + 1))
            out.prompt_rows.append(pr)
            if s.samples:
                out.sample_rows.append(len(rows))
                rows.append(offset + s.num_tokens - 1)
            else:
                out.sample_rows.append(-1)
            offset += s.num_tokens
        index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        out.logits = self.model.compute_logits(hidden.index_select(0, index))
        return out
