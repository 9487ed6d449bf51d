"""Linear layers with the three weight storages the checkpoints use.

quant = "none":        weight [N, K] in the model dtype (also what FP8 checkpoints become on CPU/float32)
quant = "fp8_channel": weight float8_e4m3fn [N, K] + weight_scale fp32 [N, 1]; activations quantized per token
quant = "fp8_block":   weight float8_e4m3fn [N, K] + weight_scale fp32 [ceil(N/128), ceil(K/128)]
                       (the checkpoint's weight_scale_inv); activations quantized per 1x128 group

Sizes here are this rank's local sizes; the loader slices the checkpoint tensors to fit.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.quant import FP8_DTYPE

BLOCK = 128
QUANT_METHODS = ("none", "fp8_channel", "fp8_block")


def scale_shape(quant: str, out_features: int, in_features: int) -> tuple[int, ...] | None:
    if quant == "fp8_channel":
        return (out_features, 1)
    if quant == "fp8_block":
        return (-(-out_features // BLOCK), -(-in_features // BLOCK))
    return None


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        if quant not in QUANT_METHODS:
            raise ValueError(f"unknown linear quantization {quant!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant
        wdtype = dtype if quant == "none" else FP8_DTYPE
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype, device=device), False)
        shape = scale_shape(quant, out_features, in_features)
        self.weight_scale = (
            nn.Parameter(torch.empty(shape, dtype=torch.float32, device=device), False) if shape else None
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor, x_q: tuple[torch.Tensor, torch.Tensor] | None = None,
                x_absmax_parts: torch.Tensor | None = None) -> torch.Tensor:
        """x_q: x already quantized per token (FP8, scale) by the preceding norm kernel (fp8_channel only).
        x_absmax_parts: max |x| over slices of each row, from the producer of x (fp8_channel only, a hint)."""
        if self.quant == "none":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.quant == "fp8_channel":
            xf, xs = x_q if x_q is not None else (None, None)
            return kernels.fp8_linear_channel(x, self.weight, self.weight_scale, self.bias, x_fp8=xf, x_scale=xs,
                                              x_absmax_parts=x_absmax_parts)
        return kernels.fp8_linear_block(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, quant={self.quant}, bias={self.bias is not None}"
