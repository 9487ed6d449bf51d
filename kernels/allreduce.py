"""All-reduce of tensor-parallel partial sums, optionally followed by the residual add and RMSNorm: torch
references for kernels/triton_allreduce.py. The sum runs in fp32 in rank order and is rounded once to the
inputs' dtype; every rank computes the same bits."""
from __future__ import annotations

import torch

from kernels.norm import add_rms_norm_ref

# the Triton kernel's grid and barrier-flag layout (kernels/triton_allreduce.py)
MAX_PROGRAMS = 64
ONE_SHOT_WORLD_SIZES = (2, 4, 8)


def flag_area_ints(world: int) -> int:
    """int32 slots each rank's flag area needs: two channels x MAX_PROGRAMS programs x world ranks."""
    return 2 * MAX_PROGRAMS * world


def all_reduce_ref(parts: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)


def all_reduce_add_rms_norm_ref(
    parts: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(all_reduce(parts) + residual), all_reduce(parts) + residual)."""
    return add_rms_norm_ref(all_reduce_ref(parts), residual, weight, eps)
