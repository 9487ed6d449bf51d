"""Tensor-parallel group handle and the sharding arithmetic the layers and the loader share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import kernels

NormOutput = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in the tensor-parallel group. size == 1 means no collectives at all."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup (NCCL on GPU, gloo on CPU)
    one_shot: Any = None  # model.one_shot_allreduce.OneShotAllReduce where the fused all-reduce is on

    def fused_reduce(self, x: torch.Tensor) -> bool:
        """Whether x's all-reduce runs in the one-shot kernel (fused with the norm after it where there is one)."""
        return self.one_shot is not None and self.one_shot.fits(x)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group (in place for NCCL / gloo; the returned tensor is the result)."""
        if self.size > 1:
            if self.fused_reduce(x):
                return self.one_shot.all_reduce(x)
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: bool
    ) -> NormOutput:
        """(rms_norm(s), s, (y_fp8, y_scale) or None) with s = all_reduce(x) + residual: the all-reduce of a
        row-parallel layer's partial sums and the residual add + RMSNorm (+ FP8 quantization) after it, one
        kernel where the one-shot all-reduce takes x, else the collective and then the norm kernel."""
        if self.size > 1 and self.fused_reduce(x):
            return self.one_shot.all_reduce_add_rms_norm(x, residual, weight, eps, quant)
        x = self.all_reduce(x)
        if quant:
            return kernels.rms_norm_quant(x, weight, eps, residual)
        y, summed = kernels.add_rms_norm(x, residual, weight, eps)
        return y, summed, None

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


@dataclass(frozen=True)
class HeadPartition:
    """Which attention heads this rank holds. KV heads are replicated when tp > num_kv_heads."""

    num_heads: int  # local q heads
    num_kv_heads: int  # local kv heads
    q_head_start: int
    kv_head_start: int

    @staticmethod
    def build(num_heads: int, num_kv_heads: int, tp: TPGroup) -> "HeadPartition":
        hq = divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            hk = divide(num_kv_heads, tp.size, "num_key_value_heads")
            kv_start = tp.rank * hk
        else:
            if tp.size % num_kv_heads:
                raise ValueError(
                    f"tensor-parallel size {tp.size} must divide num_key_value_heads ({num_kv_heads}) or be a "
                    f"multiple of it (then KV heads are replicated)"
                )
            hk = 1
            kv_start = tp.rank // (tp.size // num_kv_heads)
        return HeadPartition(hq, hk, tp.rank * hq, kv_start)


def vocab_partition(vocab_size: int, tp: TPGroup, multiple: int = 64) -> tuple[int, int]:
    """(start, local_size) of this rank's slice of the vocab, padded so every rank gets the same size."""
    per_rank = -(-vocab_size // tp.size)
    per_rank = -(-per_rank // multiple) * multiple if tp.size > 1 else per_rank
    return tp.rank * per_rank, per_rank


@dataclass(frozen=True)
class ExpertPartition:
    """Which routed experts this rank holds, and how much of each.

    Tensor parallel (the default): all of them, each a 1/tp slice of its intermediate width. Expert parallel
    (--enable-expert-parallel, tp > 1): a contiguous 1/tp of the experts at full width, so a rank's MoE GEMMs run
    at the full width and write y rows only for the pairs routed to its experts. The shared expert is balanced
    either way: a 1/tp slice on every rank, or (fused, expert parallel) whole on every rank for 1/tp of the tokens
    (model.moe.MoE)."""

    start: int  # global id of the first local routed expert
    count: int  # local routed experts
    width: int  # this rank's width of each of them
    width_start: int  # where that slice starts in the full width
    expert_parallel: bool

    @staticmethod
    def build(num_experts: int, width: int, tp: TPGroup, expert_parallel: bool) -> "ExpertPartition":
        if expert_parallel and tp.size > 1:
            count = divide(num_experts, tp.size, "n_routed_experts")
            return ExpertPartition(tp.rank * count, count, width, 0, True)
        local = divide(width, tp.size, "moe_intermediate_size")
        return ExpertPartition(0, num_experts, local, tp.rank * local, False)

    def local_expert(self, e: int) -> int | None:
        """The local index of global routed expert e, or None where another rank holds it."""
        return e - self.start if self.start <= e < self.start + self.count else None
