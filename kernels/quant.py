"""FP8 E4M3 quantization helpers: torch references.

Activations are quantized dynamically per token (compressed-tensors channel format) or per token-group of 128
(DeepSeek block format). Weights are dequantized per output channel or per 128x128 block.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_MIN_SCALE = 1e-12


def quant_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> (x_fp8 [T, K], scale fp32 [T, 1]) with x ~= x_fp8 * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quant_fp8_per_group_ref(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] with K % group == 0 -> (x_fp8 [T, K], scale fp32 [T, K // group])."""
    t, k = x.shape
    if k % group:
        raise ValueError(f"per-group FP8 quantization needs K ({k}) divisible by the group size ({group})")
    xg = x.float().view(t, k // group, group)
    scale = (xg.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    xq = (xg / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq.view(t, k), scale.squeeze(-1)


def quant_fp8_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (w_fp8 [N, K], scale fp32 [N, 1]) (compressed-tensors 'channel' strategy)."""
    return quant_fp8_per_token_ref(w)


def quant_fp8_weight_per_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (w_fp8 [N, K], scale_inv fp32 [ceil(N/b), ceil(K/b)]) (DeepSeek block format)."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)  # [nb, kb]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * block, kb * block)
    return q[:n, :k].to(FP8_DTYPE).contiguous(), scale


def dequant_fp8_per_channel(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w.float() * scale.float().view(-1, 1)).to(dtype)


def dequant_fp8_per_block(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    n, k = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return (w.float() * s).to(dtype)
