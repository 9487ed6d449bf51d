"""FP8 linear layers: torch references.

Channel format: y = (x_fp8 @ w_fp8^T) * x_scale[t] * w_scale[n] + bias, x quantized per token on the fly.
Block format:   x quantized per 1x128 group, w scaled per 128x128 block.
"""
from __future__ import annotations

import torch

from kernels.quant import quant_fp8_per_group_ref, quant_fp8_per_token_ref


def fp8_linear_channel_ref(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [T, K] (bf16/fp16/fp32), w_fp8: [N, K], w_scale: fp32 [N, 1] -> [T, N] in x.dtype."""
    xq, xs = quant_fp8_per_token_ref(x)
    acc = xq.float() @ w_fp8.float().t()
    y = acc * xs * w_scale.float().view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear_block_ref(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: int = 128,
) -> torch.Tensor:
    """x: [T, K], w_fp8: [N, K], w_scale_inv: fp32 [ceil(N/128), ceil(K/128)] -> [T, N] in x.dtype."""
    t, k = x.shape
    n = w_fp8.shape[0]
    kb = -(-k // block)
    pad = kb * block - k
    xp = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    xq, xs = quant_fp8_per_group_ref(xp, block)  # xs: [T, kb]
    wq = torch.nn.functional.pad(w_fp8.float(), (0, pad)) if pad else w_fp8.float()
    ws = w_scale_inv.float().repeat_interleave(block, 0)[:n]  # [N, kb]
    y = torch.zeros(t, n, dtype=torch.float32, device=x.device)
    for j in range(kb):
        sl = slice(j * block, (j + 1) * block)
        y += (xq[:, sl].float() @ wq[:, sl].t()) * xs[:, j : j + 1] * ws[:, j].view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
