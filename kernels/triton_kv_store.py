"""Triton KV-cache store: rows k, v [T, Hk, D] into paged caches [num_blocks, block_size, Hk, D] at
slot_mapping[t] (skipped when -1), divided by k_scale / v_scale and cast to the cache dtype (FP8 E4M3
saturates at +-448). Same as kernels/attention.store_kv_ref for in-range values."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, next_pow2, pdl_launch, pdl_release, pdl_wait, to_out


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, HK, D, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    BH: tl.constexpr, BD: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        hi = tl.program_id(1) * BH + tl.arange(0, BH)
        di = tl.arange(0, BD)
        m = (hi[:, None] < HK) & (di[None, :] < D)
        k = tl.load(k_ptr + t * stride_kt + hi[:, None] * stride_kh + di[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + hi[:, None] * stride_vh + di[None, :], mask=m, other=0.0).to(tl.float32)
        k = k / k_scale
        v = v / v_scale
        if FP8:
            k = tl.clamp(k, -448.0, 448.0)
            v = tl.clamp(v, -448.0, 448.0)
        tl.store(kc_ptr + slot * stride_kc_slot + hi[:, None] * stride_kc_h + di[None, :],
                 to_out(k, kc_ptr.dtype.element_ty), mask=m)
        tl.store(vc_ptr + slot * stride_vc_slot + hi[:, None] * stride_vc_h + di[None, :],
                 to_out(v, vc_ptr.dtype.element_ty), mask=m)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    t, hk, d = k.shape
    if t == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    for c in (k_cache, v_cache):
        assert c.stride(-1) == 1 and c.stride(0) == c.shape[1] * c.stride(1), "cache pages must be dense"
    bh = min(next_pow2(hk), 16)
    _store_kv_kernel[(t, cdiv(hk, bh))](
        k, v, k_cache, v_cache, slot_mapping, hk, d, float(k_scale), float(v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        BH=bh, BD=next_pow2(d), FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4, **pdl_launch(k.device),
    )


__all__ = ["store_kv"]
