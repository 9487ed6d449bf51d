"""What the engine's steps did and how long they took, summed, so that a serving run can be set against its
floor (bench/step_floor.py): the bytes every decode step must read (this rank's weights, the experts the batch
touches, the KV its sequences attend over) and the FLOPs the prompts bring, over the GPU's measured bandwidth and
peak.

Steps are of two kinds. A decode step computes one token per request (plus its draft tokens when verifying);
a prefill step computes prompt tokens, maybe beside decoding requests (a mixed step). A step's time is the wall
time of the step() call that launched it: with overlap scheduling that call also finishes the step before it, so
in steady state it is one step's cycle (as the draft budget prices steps, engine/engine_core.py). Recording is a
loop over the step's requests, a few integer additions each."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.scheduler import ScheduledRequest
from model.config import ModelConfig


@dataclass(frozen=True)
class ModelFootprint:
    """This rank's bytes the floor needs. Routed experts are read in part, by the experts a batch touches:
    bytes of one expert slot summed over the MoE layers, with the slot counts (a fused shared expert is a slot
    past the routed ones, read by every step). The other weights are read whole by every step (MTP layer and
    embedding table left out: a decode step reads neither whole). KV bytes per token over the main layers."""

    expert_slot_bytes: int
    expert_slots: int
    routed_experts: int
    experts_per_token: int
    other_weight_bytes: int
    kv_bytes_per_token: int

    @staticmethod
    def of(model: torch.nn.Module, kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]], block_size: int,
           cfg: ModelConfig) -> "ModelFootprint":
        slot_bytes = other = slots = 0
        for name, p in model.named_parameters():
            nbytes = p.numel() * p.element_size()
            if name.startswith(("mtp.", "embed_tokens.")):
                continue
            if ".mlp.experts." in name:
                slots = p.shape[0]
                slot_bytes += nbytes // slots
            else:
                other += nbytes
        kv = 0
        for layer, (k, v) in kv_caches.items():
            if layer < cfg.num_hidden_layers:  # the MTP layer's KV is read by its own forwards only
                kv += (k.numel() * k.element_size() + v.numel() * v.element_size()) // (k.shape[0] * block_size)
        return ModelFootprint(slot_bytes, slots, cfg.n_routed_experts, cfg.num_experts_per_tok, other, kv)


class StepAccounting:
    def __init__(self, footprint: ModelFootprint | None = None) -> None:
        self.footprint = footprint
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.decode_seqs = 0
        self.decode_rows = 0  # tokens computed: one per request, plus its drafts when verifying
        self.decode_context_tokens = 0  # KV positions the decode rows attend over, summed over requests
        self.prefill_steps = 0
        self.prefill_seconds = 0.0
        self.prefill_tokens = 0  # prompt tokens computed
        self.prefill_attention_pairs = 0.0  # (query, key) pairs of causal prompt attention: n * start + n^2 / 2
        self.prefill_decode_seqs = 0  # requests decoding inside prefill steps
        self.prefill_decode_context_tokens = 0

    def record(self, scheduled: Sequence[ScheduledRequest], seconds: float) -> None:
        prompt = decode = context = rows = 0
        pairs = 0.0
        for s in scheduled:
            if s.num_tokens - s.num_drafts == 1 and s.start >= s.request.num_prompt_tokens:
                decode += 1
                rows += s.num_tokens
                context += s.end
            else:
                prompt += s.num_tokens
                pairs += s.num_tokens * s.start + s.num_tokens * s.num_tokens / 2
        if prompt:
            self.prefill_steps += 1
            self.prefill_seconds += seconds
            self.prefill_tokens += prompt
            self.prefill_attention_pairs += pairs
            self.prefill_decode_seqs += decode
            self.prefill_decode_context_tokens += context
        elif decode:
            self.decode_steps += 1
            self.decode_seconds += seconds
            self.decode_seqs += decode
            self.decode_rows += rows
            self.decode_context_tokens += context

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {f"steps_{k}": v for k, v in vars(self).items() if k != "footprint"}
        if self.footprint is not None:
            s.update({f"model_{k}": v for k, v in vars(self.footprint).items()})
        return s
