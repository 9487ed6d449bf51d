"""Triton token sort/align by expert for the fused MoE GEMMs.

From topk_ids [T, k] (int32, ids in [0, E)) build, in one single-program launch:
  sorted_ids   [max_blocks * BLOCK_M] int32: (token, slot) pair indices t*k + j grouped by expert, each
               expert's run padded to a multiple of BLOCK_M with the sentinel T*k
  block_expert [max_blocks] int32: the expert of each BLOCK_M rows of sorted_ids, -1 past the last block
max_blocks = min(T*k, ceil(T*k / BLOCK_M) + E) bounds the real block count, so the GEMM grids are known on
the host without a sync (CUDA-graph safe). Within an expert, pairs land in arbitrary order (atomic slots);
every GEMM row is independent, so results don't depend on it.

Phases: histogram of ids -> padded exclusive offsets (cumsum) -> block_expert and sentinel fill -> barrier ->
scatter of each pair to offset[e] + atomic_add(cursor[e], 1). The cursor workspace is written by the same
program before the barrier (no zeroing launch needed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, next_pow2


@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_ptr, bexp_ptr, cursor_ptr, NP, E, MAX_BLOCKS,
    BLOCK_M: tl.constexpr, E_P: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr,
):
    ci = tl.arange(0, CHUNK)
    ei = tl.arange(0, E_P)
    counts = tl.zeros([E_P], dtype=tl.int32)
    for p0 in range(0, NP, CHUNK):
        m = p0 + ci < NP
        e = tl.load(ids_ptr + p0 + ci, mask=m, other=E)  # tail -> bin E (ignored; E_P > E)
        counts += tl.histogram(e, E_P)
    counts = tl.where(ei < E, counts, 0)
    nblk = (counts + BLOCK_M - 1) // BLOCK_M
    blk_end = tl.cumsum(nblk, 0)  # inclusive, in blocks
    blk_start = blk_end - nblk
    tl.store(cursor_ptr + ei, blk_start * BLOCK_M)
    # expert of each block: number of experts whose run ends at or before it
    bi0 = tl.arange(0, BCHUNK)
    for b0 in range(0, MAX_BLOCKS, BCHUNK):
        bi = b0 + bi0
        ex = tl.sum((blk_end[None, :] <= bi[:, None]).to(tl.int32), 1)
        ex = tl.where(ex < E, ex, -1)
        tl.store(bexp_ptr + bi, ex, mask=bi < MAX_BLOCKS)
    total = MAX_BLOCKS * BLOCK_M
    for r0 in range(0, total, CHUNK):
        tl.store(sorted_ptr + r0 + ci, tl.zeros([CHUNK], dtype=tl.int32) + NP, mask=r0 + ci < total)
    tl.debug_barrier()
    for p0 in range(0, NP, CHUNK):
        m = p0 + ci < NP
        e = tl.load(ids_ptr + p0 + ci, mask=m, other=0)
        pos = tl.atomic_add(cursor_ptr + e, 1, mask=m)
        tl.store(sorted_ptr + pos, (p0 + ci).to(tl.int32), mask=m)


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    return max(1, min(num_pairs, cdiv(num_pairs, block_m) + num_experts))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] int32 (contiguous) -> (sorted_ids, block_expert); see the module doc."""
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    np_ = ids.numel()
    mb = max_blocks(np_, num_experts, block_m)
    sorted_ids = torch.empty(mb * block_m, dtype=torch.int32, device=ids.device)
    bexp = torch.empty(mb, dtype=torch.int32, device=ids.device)
    e_p = next_pow2(num_experts + 1)
    cursor = torch.empty(e_p, dtype=torch.int32, device=ids.device)
    # one program walks everything: wide chunks keep the number of dependent steps small
    chunk = max(16, min(4096, next_pow2(max(np_, mb * block_m))))
    bchunk = max(16, min(next_pow2(mb), 8192 // e_p))  # [BCHUNK, E_P] block-expert tile
    _moe_align_kernel[(1,)](
        ids, sorted_ids, bexp, cursor, np_, num_experts, mb,
        BLOCK_M=block_m, E_P=e_p, CHUNK=chunk, BCHUNK=bchunk, num_warps=8 if chunk >= 2048 else 4,
    )
    return sorted_ids, bexp


__all__ = ["moe_align", "max_blocks"]
