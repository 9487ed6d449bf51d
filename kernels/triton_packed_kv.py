"""Triton gather of a step's keys and values out of the paged caches into packed [total, Hk, D] tensors
(kernels/packed_kv.py: the layout, the index and the torch reference `gather_packed`).

One launch for K and V: a program copies BLOCK_T keys' rows (Hk * D contiguous elements each) of both caches,
widening FP8 pages to the output dtype exactly; the reference is index_select on the 1-byte rows, then a second
pass to widen. H100, session 28 (`bench.fa4_prefill`, 96/8 heads, 4K new tokens after a 4K prefix, FA4 after the
gather): FP8 pages 2.253 -> 2.074 ms; 16-bit pages 2.163 vs 2.218 ms (one round each: index_select moves 16-bit
rows about as fast), so dispatch takes this kernel only where pages widen.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, next_pow2, pdl_launch, pdl_release, pdl_wait, token_counts


@triton.jit(**token_counts("TOTAL"))
def _gather_packed_kv_kernel(
    kc_ptr, vc_ptr, slot_ptr, k_ptr, v_ptr, TOTAL, ROW,
    BLOCK_T: tl.constexpr, ROW_P: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < TOTAL
    slot = tl.load(slot_ptr + t, mask=tm, other=0).to(tl.int64)
    ri = tl.arange(0, ROW_P)
    m = tm[:, None] & (ri[None, :] < ROW)
    src = slot[:, None] * ROW + ri[None, :]
    dst = t[:, None] * ROW + ri[None, :]
    k = tl.load(kc_ptr + src, mask=m)
    tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=m)
    v = tl.load(vc_ptr + src, mask=m)
    tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=m)


def gather_packed_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """k_cache / v_cache [pages, page_size, Hk, D] (dense), slots [total] (cache slot of every key) -> packed K, V
    [total, Hk, D] in dtype (FP8 -> 16-bit exact); equal to packed_kv.gather_packed of each cache."""
    _, _, hk, d = k_cache.shape
    for c in (k_cache, v_cache):
        assert c.is_contiguous() and c.shape == k_cache.shape, "caches must be dense and of one shape"
    total = slots.shape[0]
    k = torch.empty(total, hk, d, dtype=dtype, device=k_cache.device)
    v = torch.empty(total, hk, d, dtype=dtype, device=k_cache.device)
    if total == 0:
        return k, v
    row = hk * d
    row_p = next_pow2(row)
    block_t = max(1, 4096 // row_p)  # [BLOCK_T, ROW_P] tiles of ~4K elements: 16-byte accesses, 32 per thread
    _gather_packed_kv_kernel[(cdiv(total, block_t),)](
        k_cache, v_cache, slots, k, v, total, row, BLOCK_T=block_t, ROW_P=row_p, num_warps=4,
        **pdl_launch(k_cache.device),
    )
    return k, v


__all__ = ["gather_packed_kv"]
