"""The fused MoE's large-prefill path through QuACK's persistent, warp-specialized Hopper GEMM (FP8 per channel):
kernels.triton_moe.fused_moe's contract, taken there when the launch config has the key QUACK.

  1. segments   pairs sorted by expert with no padding (kernels/triton_moe_align.py at BLOCK_M = 1); each expert's
                rows are one group, cu_seqlens [E + 1]; per sorted row its token (gate_up's gather index) and
                that token's x scale, and per pair its sorted row (one small kernel)
  2. gate_up    y1[r] = x[token(r)] @ w13[e]^T * x_scale[token(r)] * w13_scale[e]   (bf16 [P, 2I], A gathered
                inside the GEMM: no gathered copy of x)
  3. SwiGLU     act = silu(gate) * up quantized per row to FP8 in one pass (kernels/triton_activation.py)
  4. down       y2[r] = act[r] @ w2[e]^T * act_scale[r] * w2_scale[e]              (bf16 [P, H])
  5. top-k sum  out[t] = sum_j topk_weights[t, j] * y2[row of pair t*k + j] in fp32, j in rank order

The GEMMs are kernels/scaled_grouped_gemm.py's contract: on Hopper with `quack-kernels` installed
kernels/quack_grouped_gemm.py, off CUDA its torch reference (the CPU tests run this whole path). Roundings as
the reference (kernels/fused_moe.py): bf16 linear outputs, silu and the product rounded, FP8 per-row quant of
act. Unlike the Triton kernels no expert's rows are padded to a block (QuACK's varlen scheduler masks the
last tile of each group), and the pair -> row map makes the sum deterministic (no atomics).

Config value of QUACK: True (default tiles) or [gate_up tile, down tile], each [tile_m, tile_n, pingpong,
cluster_m] (kernels/quack_grouped_gemm.GemmTile).
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from kernels.scaled_grouped_gemm import scaled_grouped_gemm_ref
from kernels.triton_activation import silu_mul_fp8_only
from kernels.triton_moe_segments import expert_segments, topk_sum
from kernels.triton_quant import quant_fp8_per_token

MODULE = "kernels.quack_grouped_gemm"  # imports quack-kernels and the CUTLASS DSL (the fa4 extra)


@functools.lru_cache(maxsize=None)
def library() -> ModuleType | None:
    """kernels/quack_grouped_gemm.py, or None where QuACK or the CuTe DSL does not import."""
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        return None


def device_supported(device: torch.device) -> bool:
    """QuACK's scaled GEMM here is built for Hopper (sm90) only."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def grouped_gemm_for(device: torch.device) -> Callable | None:
    """The scaled grouped GEMM that runs on this device: QuACK's on Hopper where it imports, the torch reference
    off CUDA (tests), None otherwise (the caller keeps the Triton kernels)."""
    if device.type != "cuda":
        return scaled_grouped_gemm_ref
    lib = library()
    return lib.scaled_grouped_gemm if lib is not None and device_supported(device) else None


def tiles(spec: object) -> tuple[object, object]:
    """The two GEMMs' launch tiles from the config value (None: the library default, see the module doc)."""
    lib = library()
    if lib is None:
        return None, None
    if isinstance(spec, (list, tuple)):
        return lib.GemmTile.parse(spec[0]), lib.GemmTile.parse(spec[1])
    return lib.GemmTile(), lib.GemmTile()


def fused_moe_quack(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor, gemm: Callable,
                    tile_spec: object = True, x_fp8: torch.Tensor | None = None,
                    x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.triton_moe.fused_moe's contract for FP8 per channel: x [T, H] -> [T, H] in x.dtype; `gemm` from
    `grouped_gemm_for(x.device)`."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    topk = topk_ids.shape[1]
    np_ = t * topk
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    if x_fp8 is None:
        x_fp8, x_scale = quant_fp8_per_token(x)
    cu_seqlens, tok, row_scale, row_of = expert_segments(ids, e, x_scale.reshape(-1))
    tile1, tile2 = tiles(tile_spec)
    y1 = torch.empty(np_, two_i, dtype=torch.bfloat16, device=x.device)
    gemm(x_fp8, w13, row_scale, w13_scale.reshape(e, two_i), cu_seqlens, y1, a_idx=tok, tile=tile1)
    act, act_scale = silu_mul_fp8_only(y1)
    y2 = torch.empty(np_, h, dtype=torch.bfloat16, device=x.device)
    gemm(act, w2, act_scale.reshape(-1), w2_scale.reshape(e, h), cu_seqlens, y2, a_idx=None, tile=tile2)
    return topk_sum(y2, topk_weights, out, row_of)


__all__ = ["fused_moe_quack", "grouped_gemm_for", "library", "tiles"]
