"""Persistent down GEMM of the fused MoE at prefill sizes (kernels/triton_moe.py, config key PERSIST2).

The down GEMM's K is the expert width I: 192 / 384 at the TP8 / TP4 shards, i.e. two or three 128-wide K steps
per output tile, after which a program writes a 128 x 128 bf16 tile (32 KB) and exits. A one-tile program
spends most of its life filling its pipeline and draining its stores (H100, session 26: 409 us for the down GEMM
of 4K tokens at I = 192, 4.6x the time of writing its output once). Here a grid of one program per SM walks the
tiles (block of sorted rows, N tile) with a flattened loop, so Triton's software pipeline loads the next tile's
act and weight blocks (tensor descriptors: Hopper bulk copies) while the current tile's epilogue runs.

FP8 per channel only, act already quantized per row (scales in act row order), tiles in row-block-major order
(the act rows of a block stay in L2 across its N tiles). Same arithmetic per tile as `_moe_down_kernel`'s
FAST_ACC / TMA path; the outputs are equal.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import INTERPRET, num_sms, pdl_launch, pdl_release, pdl_wait, to_out


@triton.jit
def _moe_down_persistent_kernel(
    act_desc, as_ptr, w_desc, ws_ptr, y_ptr, sorted_ptr, bexp_ptr,
    NP, I, H, MAX_BLOCKS, stride_asm, stride_wse, stride_wsn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COUNT_CHUNK: tl.constexpr,
    NUM_PROGS: tl.constexpr, FAST_ACC: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    # the real blocks are a prefix of block_expert (-1 past the last one: triton_moe_align); counted in chunks, so
    # the block count is no compile-time constant (a token count the warm-up did not run compiles nothing new)
    nblk = 0
    for b0 in range(0, MAX_BLOCKS, COUNT_CHUNK):
        bi = b0 + tl.arange(0, COUNT_CHUNK)
        nblk += tl.sum((tl.load(bexp_ptr + bi, mask=bi < MAX_BLOCKS, other=-1) >= 0).to(tl.int32), 0)
    num_n = tl.cdiv(H, BLOCK_N)
    k_iters = tl.cdiv(I, BLOCK_K)
    for tile in tl.range(tl.program_id(0), nblk * num_n, NUM_PROGS, flatten=True):
        pid_m = tile // num_n
        pid_n = tile % num_n
        e = tl.load(bexp_ptr + pid_m)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(0, k_iters):
            a = act_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = w_desc.load([e * H + pid_n * BLOCK_N, ki * BLOCK_K]).T
            if FAST_ACC:
                acc = tl.dot(a, b, acc)
            else:
                acc += tl.dot(a, b)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < NP
        pair_c = tl.where(valid, pair, 0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < H
        rn_c = tl.where(mn, rn, 0).to(tl.int64)
        a_scale = tl.load(as_ptr + rows.to(tl.int64) * stride_asm)
        sb = tl.load(ws_ptr + e.to(tl.int64) * stride_wse + rn_c * stride_wsn)
        y = acc * a_scale[:, None] * sb[None, :]
        # output pointers from the unclamped rn with a mask (see triton_moe: a clamped index scalarizes the stores)
        tl.store(y_ptr + pair_c[:, None] * stride_ym + rn[None, :], to_out(y, y_ptr.dtype.element_ty),
                 mask=valid[:, None] & mn[None, :])


def moe_down_persistent(act_desc, act_scale: torch.Tensor, w_desc, w2: torch.Tensor, w2_scale: torch.Tensor,
                        y: torch.Tensor, sorted_ids: torch.Tensor, bexp: torch.Tensor, num_pairs: int, inter: int,
                        cfg: dict) -> None:
    """y[pair] = (act[row] @ w2[e]^T) * act_scale[row] * w2_scale[e] for every real sorted row (pair < num_pairs).
    act_desc / w_desc: tensor descriptors of act [rows, I] (FP8) and w2 viewed as [E * H, I] with [BLOCK_M,
    BLOCK_K2] / [BLOCK_N2, BLOCK_K2] blocks; w2_scale viewed as [E, H]."""
    h = w2.shape[1]
    mb = bexp.numel()
    # one program per SM (a 128 x 256 FP8 tile at 3-4 stages leaves no room for a second; 4 in the interpreter, so
    # tests have more tiles than programs); a constant: the tile count is read on the device (graph-safe)
    grid = 4 if INTERPRET else num_sms(y.device.index or 0)
    _moe_down_persistent_kernel[(grid,)](
        act_desc, act_scale, w_desc, w2_scale, y, sorted_ids, bexp,
        num_pairs, inter, h, mb, act_scale.stride(0), w2_scale.stride(0), w2_scale.stride(1), y.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"], COUNT_CHUNK=1024,
        NUM_PROGS=grid, FAST_ACC=bool(cfg.get("FAST_ACC", False)), num_warps=cfg["W2"], num_stages=cfg["S2"],
        **pdl_launch(y.device),
    )


__all__ = ["moe_down_persistent"]
