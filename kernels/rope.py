"""Per-head QK RMSNorm + partial NeoX RoPE: torch references.

The cos/sin cache is [max_positions, rotary_dim] fp32 with cos in the first rotary_dim/2 columns and sin in
the second half. Only the first rotary_dim dims of each head rotate, in the half-rotation (NeoX) layout:
pairs (i, i + rotary_dim/2).
"""
from __future__ import annotations

import torch

from kernels.norm import rms_norm_ref


def rope_cos_sin_cache(
    rotary_dim: int, max_positions: int, theta: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rope_ref(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; rotates x[..., :rotary_dim] where rotary_dim = cos_sin.shape[1]."""
    rot = cos_sin.shape[1]
    half = rot // 2
    cs = cos_sin[positions]  # [T, rot] fp32
    # HF builds cos/sin as cat(freqs, freqs) and casts them to the activation dtype before the multiply.
    cos = torch.cat([cs[:, :half], cs[:, :half]], dim=-1).to(x.dtype)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], dim=-1).to(x.dtype)[:, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D]. Optional per-head RMSNorm (weights [D]) then partial RoPE."""
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm_ref(k, k_norm_weight, eps)
    return apply_rope_ref(q, cos_sin, positions), apply_rope_ref(k, cos_sin, positions)
