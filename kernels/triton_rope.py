"""Triton fused per-head QK RMSNorm + partial NeoX RoPE, optionally writing K/V into the paged cache.

Same math and roundings as kernels/rope.py (qk_norm_rope_ref): per-head RMSNorm over the full head_dim
(normalized row rounded to the activation dtype, then times the weight), then rotation of the first
rotary_dim dims in the half-rotation layout, pairs (i, i + rotary_dim/2), with cos/sin rounded to the
activation dtype and every product and sum rounded as torch does in bf16. Dims past rotary_dim pass through.

Grid: (tokens, q-head blocks + k-head blocks). A head block loads its rows as three column slices
[0, rot/2), [rot/2, rot), [rot, D), so the rotation needs no register shuffles. With a cache given, the
k-head programs also store the token's rotated K and its V at slot_mapping[t] (skipped when -1), divided by
k_scale / v_scale and cast to the cache dtype (FP8 saturates at +-448), like kernels/attention.store_kv_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    cdiv, next_pow2, pdl_launch, pdl_release, pdl_wait, round_to, tl_dtype, to_out, token_counts,
)


@triton.jit
def norm_rope_heads(
    x_ptr, o_ptr, w_ptr, cos, sin, h0, H, stride_xh, stride_oh,
    eps, HAS_NORM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, PASS: tl.constexpr,
    PASS_P: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, DT: tl.constexpr,
):
    """Normalize + rotate heads h0 .. h0+BH of one token; returns the three output slices (fp32)."""
    hi = h0 + tl.arange(0, BH)
    hm = hi < H
    ia = tl.arange(0, HALF_P)
    ma = hm[:, None] & (ia[None, :] < HALF)
    rows = hi[:, None] * stride_xh
    a = tl.load(x_ptr + rows + ia[None, :], mask=ma, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + rows + HALF + ia[None, :], mask=ma, other=0.0).to(tl.float32)
    if PASS > 0:
        ic = tl.arange(0, PASS_P)
        mc = hm[:, None] & (ic[None, :] < PASS)
        c = tl.load(x_ptr + rows + 2 * HALF + ic[None, :], mask=mc, other=0.0).to(tl.float32)
    if HAS_NORM:
        ss = tl.sum(a * a, 1) + tl.sum(b * b, 1)
        if PASS > 0:
            ss += tl.sum(c * c, 1)
        rstd = tl.rsqrt(ss / D + eps)[:, None]
        wa = tl.load(w_ptr + ia, mask=ia < HALF, other=0.0).to(tl.float32)[None, :]
        wb = tl.load(w_ptr + HALF + ia, mask=ia < HALF, other=0.0).to(tl.float32)[None, :]
        a = round_to(wa * round_to(a * rstd, DT), DT)
        b = round_to(wb * round_to(b * rstd, DT), DT)
        if PASS > 0:
            wc = tl.load(w_ptr + 2 * HALF + ic, mask=ic < PASS, other=0.0).to(tl.float32)[None, :]
            c = round_to(wc * round_to(c * rstd, DT), DT)
    oa = round_to(round_to(a * cos, DT) + round_to(-b * sin, DT), DT)
    ob = round_to(round_to(b * cos, DT) + round_to(a * sin, DT), DT)
    orow = hi[:, None] * stride_oh
    tl.store(o_ptr + orow + ia[None, :], to_out(oa, o_ptr.dtype.element_ty), mask=ma)
    tl.store(o_ptr + orow + HALF + ia[None, :], to_out(ob, o_ptr.dtype.element_ty), mask=ma)
    if PASS > 0:
        tl.store(o_ptr + orow + 2 * HALF + ic[None, :], to_out(c, o_ptr.dtype.element_ty), mask=mc)
    else:
        c = oa
    return oa, ob, c


@triton.jit
def _cache_values(x, scale, FP8: tl.constexpr):
    """fp32 x as the cache stores it, before the cast: divided by the scale, FP8 saturating at +-448."""
    x = x / scale
    if FP8:
        x = tl.clamp(x, -448.0, 448.0)
    return x


@triton.jit
def _as_stored(x, dt: tl.constexpr):
    """fp32 x -> fp32 holding the value a store to dtype dt keeps (FP8 / 16-bit widen exactly)."""
    return to_out(x, dt).to(tl.float32)


@triton.jit
def _store_slices(
    ptr, base, hi, hm, a, b, c, stride_h,
    HALF: tl.constexpr, HALF_P: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr,
):
    """Store the three column slices (fp32) of heads hi at ptr + base + head * stride_h, cast to ptr's dtype."""
    ia = tl.arange(0, HALF_P)
    ma = hm[:, None] & (ia[None, :] < HALF)
    rows = base + hi[:, None] * stride_h
    dt = ptr.dtype.element_ty
    tl.store(ptr + rows + ia[None, :], to_out(a, dt), mask=ma)
    tl.store(ptr + rows + HALF + ia[None, :], to_out(b, dt), mask=ma)
    if PASS > 0:
        ic = tl.arange(0, PASS_P)
        mc = hm[:, None] & (ic[None, :] < PASS)
        tl.store(ptr + rows + 2 * HALF + ic[None, :], to_out(c, dt), mask=mc)


@triton.jit
def store_cache_slices(
    cache_ptr, base, hi, hm, a, b, c, scale, stride_ch,
    HALF: tl.constexpr, HALF_P: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr, FP8: tl.constexpr,
):
    """One head block of K or V into the cache (the fused decode QKV kernel's store, triton_fp8_gemm_swap)."""
    a = _cache_values(a, scale, FP8)
    b = _cache_values(b, scale, FP8)
    if PASS > 0:
        c = _cache_values(c, scale, FP8)
    _store_slices(cache_ptr, base, hi, hm, a, b, c, stride_ch, HALF, HALF_P, PASS, PASS_P)


@triton.jit
def _store_kv_slices(
    cache_ptr, base, wide_ptr, wbase, hi, hm, a, b, c, scale, stride_ch, stride_wh, slot,
    HALF: tl.constexpr, HALF_P: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr, FP8: tl.constexpr,
    WIDE: tl.constexpr,
):
    """One head block of K or V: into the cache at its slot (none when slot < 0), and with WIDE the values the
    cache holds, widened, into the contiguous wide output (every token)."""
    a = _cache_values(a, scale, FP8)
    b = _cache_values(b, scale, FP8)
    if PASS > 0:
        c = _cache_values(c, scale, FP8)
    if slot >= 0:
        _store_slices(cache_ptr, base, hi, hm, a, b, c, stride_ch, HALF, HALF_P, PASS, PASS_P)
    if WIDE:
        dt = cache_ptr.dtype.element_ty
        _store_slices(wide_ptr, wbase, hi, hm, _as_stored(a, dt), _as_stored(b, dt), _as_stored(c, dt), stride_wh,
                      HALF, HALF_P, PASS, PASS_P)


@triton.jit
def _one_token(
    t, hb, q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr,
    v_ptr, kc_ptr, vc_ptr, slot_ptr, kwo_ptr, vwo_ptr,
    HQ, HK, eps, k_scale, v_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cs, stride_vt, stride_vh, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h, stride_wt,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, PASS: tl.constexpr,
    PASS_P: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, NQB: tl.constexpr, DT: tl.constexpr,
    STORE_KV: tl.constexpr, CACHE_FP8: tl.constexpr, WIDE: tl.constexpr,
):
    pos = tl.load(pos_ptr + t).to(tl.int64)
    ia = tl.arange(0, HALF_P)
    cos = tl.load(cs_ptr + pos * stride_cs + ia, mask=ia < HALF, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + ia, mask=ia < HALF, other=0.0)[None, :]
    cos = round_to(cos, DT)
    sin = round_to(sin, DT)
    if hb < NQB:
        norm_rope_heads(
            q_ptr + t * stride_qt, qo_ptr + t * stride_qot, qw_ptr, cos, sin, hb * BH, HQ, stride_qh, stride_qoh,
            eps, HAS_NORM, HALF, HALF_P, PASS, PASS_P, D, BH, DT,
        )
    else:
        h0 = (hb - NQB) * BH
        a, b, c = norm_rope_heads(
            k_ptr + t * stride_kt, ko_ptr + t * stride_kot, kw_ptr, cos, sin, h0, HK, stride_kh, stride_koh,
            eps, HAS_NORM, HALF, HALF_P, PASS, PASS_P, D, BH, DT,
        )
        if STORE_KV:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            hi = h0 + tl.arange(0, BH)
            hm = hi < HK
            wrow = t * stride_wt  # the wide outputs: contiguous [T, HK, D]
            _store_kv_slices(
                kc_ptr, slot * stride_kc_slot, kwo_ptr, wrow, hi, hm, a, b, c, k_scale, stride_kc_h, D, slot,
                HALF, HALF_P, PASS, PASS_P, CACHE_FP8, WIDE,
            )
            vrow = v_ptr + t * stride_vt + hi[:, None] * stride_vh
            ma = hm[:, None] & (ia[None, :] < HALF)
            va = tl.load(vrow + ia[None, :], mask=ma, other=0.0).to(tl.float32)
            vb = tl.load(vrow + HALF + ia[None, :], mask=ma, other=0.0).to(tl.float32)
            vc = va
            if PASS > 0:
                ic = tl.arange(0, PASS_P)
                mc = hm[:, None] & (ic[None, :] < PASS)
                vc = tl.load(vrow + 2 * HALF + ic[None, :], mask=mc, other=0.0).to(tl.float32)
            _store_kv_slices(
                vc_ptr, slot * stride_vc_slot, vwo_ptr, wrow, hi, hm, va, vb, vc, v_scale, stride_vc_h, D, slot,
                HALF, HALF_P, PASS, PASS_P, CACHE_FP8, WIDE,
            )


@triton.jit(**token_counts("T"))
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr,
    v_ptr, kc_ptr, vc_ptr, slot_ptr, kwo_ptr, vwo_ptr,
    T, HQ, HK, eps, k_scale, v_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cs, stride_vt, stride_vh, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h, stride_wt,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, PASS: tl.constexpr,
    PASS_P: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, NQB: tl.constexpr, DT: tl.constexpr,
    STORE_KV: tl.constexpr, CACHE_FP8: tl.constexpr, TPP: tl.constexpr, WIDE: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """TPP tokens per program (unrolled, so their loads overlap) x one head block."""
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    hb = tl.program_id(1)
    for i in tl.static_range(TPP):
        t = tl.program_id(0).to(tl.int64) * TPP + i
        if t < T:
            _one_token(
                t, hb, q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, v_ptr, kc_ptr, vc_ptr,
                slot_ptr, kwo_ptr, vwo_ptr, HQ, HK, eps, k_scale, v_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                stride_cs, stride_vt, stride_vh, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h, stride_wt,
                HAS_NORM, HALF, HALF_P, PASS, PASS_P, D, BH, NQB, DT, STORE_KV, CACHE_FP8, WIDE,
            )


def _check_heads(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    *,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_heads: int = 16,
    num_warps: int = 4,
    tokens_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] (token and head strides free) -> new contiguous (q, k). With k_cache given,
    also stores rotated k and v: [T, Hk, D] into the paged caches at slot_mapping; kv_out: two contiguous
    [T, Hk, D] tensors that receive the K and V values as the caches hold them (divided by the scales, FP8
    rounded), widened exactly to their dtype, every token's (slot -1 included)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    rot = cos_sin.shape[1]
    assert rot % 2 == 0 and rot <= d
    q = _check_heads(q)
    k = _check_heads(k)
    qo = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(t, hk, d, dtype=k.dtype, device=k.device)
    if t == 0:
        return qo, ko
    has_norm = q_norm_weight is not None
    assert (k_norm_weight is not None) == has_norm, "q and k norms come together"
    store = k_cache is not None
    half = rot // 2
    pas = d - rot
    bh = min(next_pow2(max(hq, hk)), block_heads)
    nqb = cdiv(hq, bh)
    nkb = cdiv(hk, bh)
    if store:
        assert v is not None and v_cache is not None and slot_mapping is not None
        v = _check_heads(v)
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)
        assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1)
    wide = kv_out is not None
    if wide:
        assert store, "kv_out holds what the caches store: give the caches"
        for o in kv_out:
            assert o.shape == (t, hk, d) and o.is_contiguous(), f"kv_out tensors must be contiguous [{t}, {hk}, {d}]"
    dummy = qo
    tpp = tokens_per_program or 1
    _qk_norm_rope_kernel[(cdiv(t, tpp), nqb + nkb)](
        q, k, qo, ko, q_norm_weight if has_norm else dummy, k_norm_weight if has_norm else dummy,
        cos_sin, positions, v if store else dummy, k_cache if store else dummy, v_cache if store else dummy,
        slot_mapping if store else positions, kv_out[0] if wide else dummy, kv_out[1] if wide else dummy,
        t, hq, hk, eps, float(k_scale), float(v_scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        cos_sin.stride(0), v.stride(0) if store else 0, v.stride(1) if store else 0,
        k_cache.stride(1) if store else 0, k_cache.stride(2) if store else 0,
        v_cache.stride(1) if store else 0, v_cache.stride(2) if store else 0, hk * d,
        HAS_NORM=has_norm, HALF=half, HALF_P=next_pow2(half), PASS=pas, PASS_P=next_pow2(max(pas, 1)), D=d, BH=bh,
        NQB=nqb, DT=tl_dtype(q.dtype), STORE_KV=store,
        CACHE_FP8=store and k_cache.dtype == torch.float8_e4m3fn, TPP=tpp, WIDE=wide, num_warps=num_warps,
        enable_fp_fusion=False,  # no FMA contraction across the emulated bf16 roundings
        **pdl_launch(q.device),
    )
    return qo, ko


__all__ = ["qk_norm_rope"]
