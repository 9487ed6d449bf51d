"""Triton token sort/align by expert for the fused MoE GEMMs.

From topk_ids [T, k] (int32, ids in [0, E), or -1 for a pair whose expert lives on another rank under expert
parallelism: such pairs get no sorted row) build:
  sorted_ids   [max_blocks * BLOCK_M] int32: (token, slot) pair indices t*k + j grouped by expert, each
               expert's run padded to a multiple of BLOCK_M with the sentinel T*k
  block_expert [max_blocks] int32: the expert of each BLOCK_M rows of sorted_ids, -1 past the last block
max_blocks = min(T*k, ceil(T*k / BLOCK_M) + E) bounds the real block count, so the GEMM grids are known on
the host without a sync (CUDA-graph safe).

The pairs are cut into chunks of CHUNK. Within a chunk, `tl.sort` of the keys expert * CHUNK + index puts the
chunk's pairs in (expert, index) order, so a pair's slot is
    expert_start[e] + (pairs of e in earlier chunks) + (its sorted position - pairs of lower experts in its chunk)
-- deterministic (pairs keep their index order within an expert) and free of atomics (contended same-address
atomics made the earlier one-program version cost 160 us at 4096 tokens).

  small (one chunk):  one program does histogram -> offsets -> block_expert -> sentinel fill -> sort -> scatter
  large:              _hist (a program per chunk: its histogram + a slice of the sentinel fill)
                      -> _scan (one program: offsets, per-chunk bases, CG chunks per step)
                      -> _scatter (a program per chunk: sort + scatter, a slice of block_expert)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, next_pow2, pdl_launch, pdl_release, pdl_wait, token_counts

# pairs handled by the one-program kernel. H200, `python -m bench.moe_stages --align` (161 slots): 2304 pairs
# take 73.5 us in one program vs 16.8 us on the multi-program path; 576 pairs 14.0 vs 13.0 us
SMALL_MAX = 512
CHUNK_LARGE = 1024


@triton.jit
def _block_experts(bexp_ptr, blk_end, E, MAX_BLOCKS, BCHUNK: tl.constexpr, first=0, programs=1):
    """block_expert[b] = number of experts whose (padded) run ends at or before block b; -1 past the end.
    This program's share: block chunks first, first + programs, ... (BCHUNK blocks each)."""
    bi0 = tl.arange(0, BCHUNK)
    for b0 in range(first * BCHUNK, MAX_BLOCKS, programs * BCHUNK):
        bi = b0 + bi0
        ex = tl.sum((blk_end[None, :] <= bi[:, None]).to(tl.int32), 1)
        ex = tl.where(ex < E, ex, -1)
        tl.store(bexp_ptr + bi, ex, mask=bi < MAX_BLOCKS)


@triton.jit
def _sort_scatter(ids_ptr, sorted_ptr, base_ptr, c, NP, E, CHUNK: tl.constexpr):
    """Scatter chunk c's pairs: base_ptr[e] = slot of the chunk's first pair of expert e minus the number of the
    chunk's pairs with a lower expert (so slot = base[e] + sorted position)."""
    li = tl.arange(0, CHUNK)
    p = c * CHUNK + li
    e = tl.load(ids_ptr + p, mask=p < NP, other=E)  # tail -> E: sorts last, not stored
    e = tl.where(e < 0, E, e)  # another rank's expert: like the tail
    key = tl.sort(e * CHUNK + li)
    se = key // CHUNK
    src = c * CHUNK + key % CHUNK
    ok = se < E
    pos = tl.load(base_ptr + se, mask=ok, other=0) + li
    tl.store(sorted_ptr + pos, src.to(tl.int32), mask=ok)


@triton.jit(**token_counts("NP", "MAX_BLOCKS"))
def _align_small_kernel(
    ids_ptr, sorted_ptr, bexp_ptr, base_ptr, NP, E, MAX_BLOCKS,
    BLOCK_M: tl.constexpr, E_P: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr, FILL: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    li = tl.arange(0, CHUNK)
    ei = tl.arange(0, E_P)
    e = tl.load(ids_ptr + li, mask=li < NP, other=E)
    e = tl.where(e < 0, E, e)
    counts = tl.where(ei < E, tl.histogram(e, E_P), 0)
    nblk = (counts + BLOCK_M - 1) // BLOCK_M
    blk_end = tl.cumsum(nblk, 0)
    start = (blk_end - nblk) * BLOCK_M
    lower = tl.cumsum(counts, 0) - counts  # pairs with a lower expert
    tl.store(base_ptr + ei, start - lower)
    _block_experts(bexp_ptr, blk_end, E, MAX_BLOCKS, BCHUNK)
    fi = tl.arange(0, FILL)
    total = MAX_BLOCKS * BLOCK_M
    for r0 in range(0, total, FILL):
        tl.store(sorted_ptr + r0 + fi, tl.zeros([FILL], dtype=tl.int32) + NP, mask=r0 + fi < total)
    tl.debug_barrier()  # sentinel fill and bases before the scatter
    _sort_scatter(ids_ptr, sorted_ptr, base_ptr, 0, NP, E, CHUNK)


@triton.jit(**token_counts("NP", "TOTAL"))
def _align_hist_kernel(
    ids_ptr, hist_ptr, sorted_ptr, NP, E, TOTAL, E_P: tl.constexpr, CHUNK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    c = tl.program_id(0)
    nc = tl.num_programs(0)
    li = tl.arange(0, CHUNK)
    p = c * CHUNK + li
    e = tl.load(ids_ptr + p, mask=p < NP, other=E)
    e = tl.where(e < 0, E, e)
    tl.store(hist_ptr + c * E_P + tl.arange(0, E_P), tl.histogram(e, E_P))
    for r0 in range(c * CHUNK, TOTAL, nc * CHUNK):  # this program's share of the sentinel fill
        tl.store(sorted_ptr + r0 + li, tl.zeros([CHUNK], dtype=tl.int32) + NP, mask=r0 + li < TOTAL)


@triton.jit(**token_counts("NCHUNK"))
def _align_scan_kernel(
    hist_ptr, base_ptr, NCHUNK, E, BLOCK_M: tl.constexpr, E_P: tl.constexpr, CG: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Chunks are taken CG at a time as a [CG, E_P] tile (a cumsum down the chunks, one across the experts): the
    serial loop is NCHUNK / CG long (a chunk at a time took ~0.65 us per chunk, 95 us at 16K tokens on an H100).
    The experts' run ends go to hist's row NCHUNK: the scatter programs fill block_expert from them."""
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    ei = tl.arange(0, E_P)
    ci = tl.arange(0, CG)
    real = ei < E
    counts = tl.zeros([E_P], dtype=tl.int32)
    for g0 in range(0, NCHUNK, CG):
        rows = g0 + ci
        counts += tl.sum(tl.load(hist_ptr + rows[:, None] * E_P + ei[None, :], mask=rows[:, None] < NCHUNK,
                                 other=0), 0)
    counts = tl.where(real, counts, 0)
    nblk = (counts + BLOCK_M - 1) // BLOCK_M
    blk_end = tl.cumsum(nblk, 0)
    run = (blk_end - nblk) * BLOCK_M  # slot of the next pair of each expert
    for g0 in range(0, NCHUNK, CG):
        rows = g0 + ci
        rm = rows[:, None] < NCHUNK
        h = tl.load(hist_ptr + rows[:, None] * E_P + ei[None, :], mask=rm & real[None, :], other=0)
        earlier = tl.cumsum(h, 0) - h  # pairs of the same expert in this group's earlier chunks
        lower = tl.cumsum(h, 1) - h  # pairs with a lower expert in the same chunk
        tl.store(base_ptr + rows[:, None] * E_P + ei[None, :], run[None, :] + earlier - lower, mask=rm)
        run += tl.sum(h, 0)
    tl.store(hist_ptr + NCHUNK * E_P + ei, blk_end)


@triton.jit(**token_counts("NP", "MAX_BLOCKS"))
def _align_scatter_kernel(
    ids_ptr, sorted_ptr, base_ptr, blk_end_ptr, bexp_ptr, NP, E, MAX_BLOCKS,
    E_P: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr, PDL: tl.constexpr = False,
):
    """A program per chunk: its pairs' scatter and its share of block_expert (one [BCHUNK, E_P] step each at
    prefill sizes; in the one-program scan it was a serial loop, ~40 us at 16K tokens on an H100)."""
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    c = tl.program_id(0)
    _sort_scatter(ids_ptr, sorted_ptr, base_ptr + c * E_P, c, NP, E, CHUNK)
    blk_end = tl.load(blk_end_ptr + tl.arange(0, E_P))
    _block_experts(bexp_ptr, blk_end, E, MAX_BLOCKS, BCHUNK, c, tl.num_programs(0))


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    return max(1, min(num_pairs, cdiv(num_pairs, block_m) + num_experts))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              small_max: int = SMALL_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] int32 (contiguous) -> (sorted_ids, block_expert); see the module doc."""
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    np_ = ids.numel()
    mb = max_blocks(np_, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(mb * block_m, dtype=torch.int32, device=dev)
    bexp = torch.empty(mb, dtype=torch.int32, device=dev)
    e_p = next_pow2(num_experts + 1)
    bchunk = max(16, min(next_pow2(mb), 8192 // e_p))  # [BCHUNK, E_P] block-expert tile
    if np_ <= small_max:
        chunk = max(16, next_pow2(np_))
        base = torch.empty(e_p, dtype=torch.int32, device=dev)
        _align_small_kernel[(1,)](
            ids, sorted_ids, bexp, base, np_, num_experts, mb,
            BLOCK_M=block_m, E_P=e_p, CHUNK=chunk, BCHUNK=bchunk, FILL=max(chunk, 1024),
            num_warps=8 if chunk >= 2048 else 4, **pdl_launch(ids.device),
        )
        return sorted_ids, bexp
    chunk = CHUNK_LARGE
    nchunk = cdiv(np_, chunk)
    hist = torch.empty(nchunk + 1, e_p, dtype=torch.int32, device=dev)  # + the experts' run ends (scan -> scatter)
    base = torch.empty(nchunk, e_p, dtype=torch.int32, device=dev)
    _align_hist_kernel[(nchunk,)](ids, hist, sorted_ids, np_, num_experts, mb * block_m, E_P=e_p, CHUNK=chunk,
                                  num_warps=4, **pdl_launch(ids.device))
    _align_scan_kernel[(1,)](hist, base, nchunk, num_experts, BLOCK_M=block_m, E_P=e_p,
                             CG=max(1, min(16, 4096 // e_p)), num_warps=4, **pdl_launch(ids.device))
    _align_scatter_kernel[(nchunk,)](ids, sorted_ids, base, hist[nchunk], bexp, np_, num_experts, mb, E_P=e_p,
                                     CHUNK=chunk, BCHUNK=bchunk, num_warps=4, **pdl_launch(ids.device))
    return sorted_ids, bexp


__all__ = ["moe_align", "max_blocks"]
