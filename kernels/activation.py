"""SwiGLU activation: silu(gate) * up over a fused [.., 2I] input (gate half first)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
