"""Fused MoE (grouped SwiGLU experts weighted by routing weights): torch reference.

Weights are stacked per expert: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]. Quantization:
"none" (w in activation dtype), "fp8_channel" (scales [E, 2I, 1] / [E, H, 1], activations per token),
"fp8_block" (scales [E, ceil(2I/128), ceil(H/128)] / [E, ceil(H/128), ceil(I/128)], activations per 1x128).
"""
from __future__ import annotations

import torch

from kernels.activation import silu_mul_ref
from kernels.fp8_linear import fp8_linear_block_ref, fp8_linear_channel_ref


def _expert_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, quant: str) -> torch.Tensor:
    if quant == "none":
        return x @ w.t().to(x.dtype)
    if quant == "fp8_channel":
        return fp8_linear_channel_ref(x, w, scale)
    if quant == "fp8_block":
        return fp8_linear_block_ref(x, w, scale)
    raise ValueError(f"unknown MoE quantization {quant!r}")


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    quant: str = "none",
) -> torch.Tensor:
    """x: [T, H]; topk_*: [T, k]. Returns sum_j w_j * expert_{id_j}(x) in x.dtype (accumulated in fp32). An id of
    -1 (expert parallelism: the expert lives on another rank) contributes nothing."""
    t, h = x.shape
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    for e in flat_ids.unique().tolist():
        if e < 0:
            continue
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        xe = x[tok]
        h1 = _expert_linear(xe, w13[e], None if w13_scale is None else w13_scale[e], quant)
        a = silu_mul_ref(h1)
        y = _expert_linear(a, w2[e], None if w2_scale is None else w2_scale[e], quant)
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
