"""FP8 grouped GEMM with per-row x per-channel scales, through QuACK's Hopper GEMM (CuTe DSL, `quack-kernels`).

    out[r, n] = bf16( (sum_k a[idx[r], k] * w[e, n, k]) * row_scale[r] * col_scale[e, n] )  for r in group e

Groups are contiguous row ranges cu_seqlens[e] .. cu_seqlens[e + 1] of the output (QuACK's "varlen_m"); with
`a_idx` the A rows are gathered by index inside the kernel (its "gather_A": cp.async loads of A, TMA for the
weights), so the fused MoE's gate_up reads x by token without a gathered copy. QuACK's sm90 GEMM is persistent
and warp-specialized (a producer warp group feeds TMA / cp.async stages, one or two consumer warp groups run
wgmma; "pingpong" alternates two consumers over tiles so one's epilogue overlaps the other's main loop) -- the
kernel design our Triton MoE GEMMs cannot express in Triton 3.6 (bench/RESULTS.md, session 20).

What we add to QuACK: the epilogue. Its default epilogue adds row / column vectors (biases); FP8 per-channel
dequantization multiplies them, so `ScaledEpiMixin` overrides the per-subtile visit to multiply the fp32
accumulator by both vectors before the bf16 store (the reference's order: acc * x_scale * w_scale, one rounding).
The kernel object is built with `fp8_fast_accum=True` (wgmma accumulates FP8 products in its own precision,
no promotion every K tile), as our Triton kernels' FAST_ACC above decode sizes; QuACK's `gemm()` entry point
does not expose either, so this module compiles through QuACK's fake-tensor helpers itself, one compile per
`GemmTile` and gather flag (the first call with a new tile costs a few seconds; the engine's warm-up prefill
pays it). Compiling needs no GPU: QUACK_ARCH=sm_90 makes QuACK report Hopper (the CPU compile test).

Importing this module needs `quack-kernels` and `nvidia-cutlass-dsl` (the `fa4` extra); kernels/fused_moe_quack.py
imports it only where it can run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import torch
from quack.compile_utils import make_fake_tensor
from quack.cute_dsl_utils import get_device_capacity, get_max_active_clusters
from quack.gemm_default_epi import GemmDefaultEpiMixin
from quack.gemm_sm90 import GemmSm90
from quack.gemm_tvm_ffi_utils import (
    compile_gemm_kernel, make_fake_gemm_tensors, make_fake_scheduler_args, make_fake_varlen_args,
    make_scheduler_args, make_varlen_args,
)

from kernels.scaled_grouped_gemm import check_args

MAX_SWIZZLE = 8
FP8 = cutlass.Float8E4M3FN


@dataclass(frozen=True)
class GemmTile:
    """One QuACK sm90 launch shape: CTA tile (tile_m x tile_n), pingpong (two consumer warp groups taking turns;
    tile_m <= 128 then) or cooperative (both on one tile), and a cluster of cluster_m CTAs along M sharing the
    weight tile by TMA multicast."""
    tile_m: int = 128
    tile_n: int = 192
    pingpong: bool = True
    cluster_m: int = 1

    @classmethod
    def parse(cls, spec: list | tuple | None) -> "GemmTile":
        """From a launch-config entry [tile_m, tile_n, pingpong, cluster_m] (JSON-friendly); None: the default."""
        if spec is None:
            return cls()
        tile_m, tile_n, pingpong, cluster_m = spec
        return cls(int(tile_m), int(tile_n), bool(pingpong), int(cluster_m))


class ScaledEpiMixin(GemmDefaultEpiMixin):
    """D = acc * colvec[m] * rowvec[l, n] (QuACK's names: the column vector runs along M, the row vector along N,
    one row vector per group l). Alpha, beta and C are not used."""

    @cute.jit
    def epi_visit_subtile(self, params, epi_loop_tensors, tRS_rD: cute.Tensor, tRS_rC: cute.Tensor | None = None):
        t_row = epi_loop_tensors.get("mColVecBroadcast")  # this thread's rows' scales, laid out like tRS_rD
        t_col = epi_loop_tensors.get("mRowVecBroadcast")  # this thread's columns' scales of the tile's group
        for i in cutlass.range(cute.size(tRS_rD), unroll_full=True):
            tRS_rD[i] = tRS_rD[i] * t_row[i] * t_col[i]
        return None


class ScaledGemmSm90(ScaledEpiMixin, GemmSm90):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, fp8_fast_accum=True, **kwargs)


@functools.lru_cache(maxsize=None)
def compiled(tile: GemmTile, gather_a: bool, device_capacity: tuple[int, int] = (9, 0)):
    """The compiled kernel for FP8 A (k-major) and B [E, N, K] (k-major), bf16 D [rows, N] (n-major), fp32 scales;
    shapes and strides are symbolic (one compile serves every token count and width)."""
    if device_capacity[0] != 9:
        raise ValueError(f"the scaled grouped GEMM is built for Hopper (sm90), not sm{device_capacity[0]}x")
    a, b, d, _, m, n, _, num_groups = make_fake_gemm_tensors(
        FP8, FP8, cutlass.BFloat16, None, "k", "k", "n", None, varlen_m=True, gather_A=gather_a)
    epi = ScaledGemmSm90.EpilogueArguments(
        mRowVecBroadcast=make_fake_tensor(cutlass.Float32, (num_groups, n), leading_dim=1, divisibility=4),
        mColVecBroadcast=make_fake_tensor(cutlass.Float32, (m,), leading_dim=0, divisibility=4),
    )
    return compile_gemm_kernel(
        ScaledGemmSm90, FP8, (tile.tile_m, tile.tile_n), (tile.cluster_m, 1, 1), tile.pingpong, True,
        gather_a, False, device_capacity, a, b, d, None, epi,
        make_fake_scheduler_args(False, False, num_groups), make_fake_varlen_args(True, False, gather_a, m),
    )


@functools.lru_cache(maxsize=None)
def _max_active_clusters(cluster_m: int, device_capacity: tuple[int, int]) -> int:
    """How many clusters of this size the persistent kernel keeps resident (a driver occupancy query: once)."""
    return get_max_active_clusters(cluster_m, device_capacity=device_capacity)


def scaled_grouped_gemm(a: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                        cu_seqlens: torch.Tensor, out: torch.Tensor, a_idx: torch.Tensor | None = None,
                        tile: GemmTile | None = None) -> torch.Tensor:
    """out [rows, N] bf16 <- the formula of kernels/scaled_grouped_gemm.py (same arguments and checks as its
    reference); cu_seqlens[E] must equal rows (not checked: it would need a host sync)."""
    check_args(a, w, row_scale, col_scale, cu_seqlens, out, a_idx)
    if out.shape[0] == 0:
        return out
    tile = tile or GemmTile()
    capacity = tuple(get_device_capacity(a.device))
    kernel = compiled(tile, a_idx is not None, capacity)
    epi = ScaledGemmSm90.EpilogueArguments(
        mRowVecBroadcast=col_scale, mColVecBroadcast=row_scale, add_to_output=None, rounding_mode=None)
    clusters = _max_active_clusters(tile.cluster_m, capacity)
    kernel(a, w.permute(1, 2, 0), out, None, epi, make_scheduler_args(clusters, MAX_SWIZZLE, None, None),
           make_varlen_args(cu_seqlens, None, a_idx), None)
    return out


__all__ = ["GemmTile", "ScaledGemmSm90", "compiled", "scaled_grouped_gemm"]
