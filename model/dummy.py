"""Dummy weights for real-shape runs without a checkpoint (load_format="dummy").

A DummySource pretends to be a checkpoint in the config's format: it synthesizes each tensor's requested
slice on the target device from a counter-based hash of (seed, tensor name, element index). Every rank
therefore sees the same full tensors whatever the TP size, generates only its own slice, and the weights go
through exactly the loader path real checkpoints take."""
from __future__ import annotations

import math
import zlib

import torch

from kernels.quant import FP8_DTYPE
from model.config import ModelConfig
from model.linear import BLOCK
from model.quant_plan import RELEASE_QUANTIZED_SUFFIXES
from model.weight_map import checkpoint_schema

_M32 = 0xFFFFFFFF
_FP8_SPREAD = 224.0  # dummy FP8 codes are uniform in [-224, 224]


def hashed_uniform(key: int, rows: range, cols: range, ncols: int, device: torch.device) -> torch.Tensor:
    """Uniform [-1, 1) values for the [rows x cols] block of a tensor with ncols columns, fp32."""
    r = torch.arange(rows.start, rows.stop, device=device, dtype=torch.int64)
    c = torch.arange(cols.start, cols.stop, device=device, dtype=torch.int64)
    x = ((r[:, None] * ncols + c[None, :]) ^ key) & _M32
    for _ in range(2):
        x = (x * 0x45D9F3B) & _M32
        x = x ^ (x >> 16)
    return x.to(torch.float32) * (2.0 / 2**32) - 1.0


class DummySource:
    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed
        self.schema = checkpoint_schema(cfg, include_mtp=cfg.num_nextn_predict_layers > 0)
        self.method = cfg.quant.method
        self._scales: dict[str, str] = {}
        if self.method != "none":
            suffix = ".weight_scale" if self.method == "fp8_channel" else ".weight_scale_inv"
            for name in self.schema:
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and (module.endswith(RELEASE_QUANTIZED_SUFFIXES) or ".mlp.experts." in module):
                    self._scales[module + suffix] = name

    def names(self) -> list[str]:
        return list(self.schema) + list(self._scales)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._scales:
            n, k = self.schema[self._scales[name]]
            return (n, 1) if self.method == "fp8_channel" else (-(-n // BLOCK), -(-k // BLOCK))
        return self.schema[name]

    def dtype(self, name: str) -> torch.dtype:
        if name in self._scales:
            return torch.float32
        if name.removesuffix(".weight") + (".weight_scale" if self.method == "fp8_channel" else ".weight_scale_inv") in self._scales:
            return FP8_DTYPE
        if name.endswith(("e_score_correction_bias", "mlp.gate.weight")):
            return torch.float32
        return torch.bfloat16

    def where(self, name: str) -> str:
        return f"<dummy weights, seed {self.seed}>"

    def _std(self, name: str, shape: tuple[int, ...]) -> tuple[float, float]:
        """(center, half-width) of the uniform distribution for this tensor."""
        if name.endswith("norm.weight") or name.endswith(("q_norm.weight", "k_norm.weight")):
            return 1.0, 0.1
        if name.endswith(".bias") and "correction" not in name:
            return 0.0, 0.05
        if name.endswith("e_score_correction_bias"):
            return 0.0, 0.05
        if name == "model.embed_tokens.weight":
            return 0.0, 1.0
        return 0.0, math.sqrt(3.0 / shape[-1])  # std 1/sqrt(fan_in)

    def read(self, name: str, rows: slice | None, cols: slice | None, device: torch.device) -> torch.Tensor:
        shape = self.shape(name)
        r = range(*(rows.indices(shape[0]) if rows else (0, shape[0])))
        if name in self._scales:
            wshape = self.schema[self._scales[name]]
            _, half = self._std(self._scales[name], wshape)
            value = half / _FP8_SPREAD
            ncols = shape[1]
            c = range(*(cols.indices(ncols) if cols else (0, ncols)))
            return torch.full((len(r), len(c)), value, dtype=torch.float32, device=device)
        key = (zlib.crc32(name.encode()) ^ (self.seed * 0x9E3779B1)) & _M32
        ncols = shape[1] if len(shape) == 2 else 1
        c = range(*(cols.indices(ncols) if cols else (0, ncols)))
        dt = self.dtype(name)
        out = torch.empty(len(r), len(c), dtype=dt, device=device)
        center, half = self._std(name, shape)
        step = max(1, (1 << 25) // max(1, len(c)))  # bound the int64 temporaries
        for i in range(0, len(r), step):
            u = hashed_uniform(key, r[i : i + step], c, ncols, device)
            out[i : i + step] = (u * _FP8_SPREAD).to(dt) if dt == FP8_DTYPE else (center + half * u).to(dt)
        return out if len(shape) == 2 else out.view(-1)
