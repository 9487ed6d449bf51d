"""Fake `flash_attn_interface` (FlashAttention-3) and `flash_attn` (FlashAttention-2) modules for CPU tests.

The functions keep the real signatures (hopper/flash_attn_interface.py and flash_attn/flash_attn_interface.py of
Dao-AILab/flash-attention), so a misspelled keyword fails with TypeError, and they assert the argument checks
the real C++ entry points make (hopper/flash_api.cpp mha_fwd, csrc/flash_attn/flash_api.cpp mha_varlen_fwd /
mha_fwd_kvcache): dtypes, int32 index tensors, contiguous last dims, shapes, FA2's page size % 256. The math
is the documented semantics in plain torch: gather pages through the page table, GQA (q head h reads kv head
h // (Hq / Hk)), causal mask aligned to the bottom-right corner, fully masked rows give zeros.

`install(monkeypatch, "fa3" | "fa2")` puts one of them into sys.modules (and hides the other) and returns the
list that records every call as (function name, q.shape). `install_fa4(monkeypatch)` does the same for
FlashAttention-4's `flash_attn.cute.interface` (flash-attn-4 4.0.0b19's flash_attn_varlen_func signature and
checks, paged K/V through page_table or packed K/V through cu_seqlens_k; it returns (out, lse) as the real one
does).
"""
from __future__ import annotations

import itertools
import sys
import types

import torch

HALF = (torch.float16, torch.bfloat16)


def _check_qkv(q, k, v, paged=True):
    assert q.dtype in HALF, f"FlashAttention only supports fp16 and bf16 data type, got {q.dtype}"
    assert k.dtype == q.dtype, "query and key must have the same dtype"
    assert v.dtype == q.dtype, "query and value must have the same dtype"
    for t in (q, k, v):
        assert t.stride(-1) == 1, "Input tensor must have contiguous last dimension"
    d = q.shape[-1]
    assert d % 8 == 0 and d <= 256, f"unsupported head dim {d}"
    if paged:
        assert k.dim() == 4 and v.shape == k.shape, "paged cache is (num_pages, page_size, nheads_k, headdim)"
    else:
        assert k.dim() == 3 and v.shape == k.shape, "varlen k / v are (total_k, nheads_k, headdim)"
    assert k.shape[-1] == d
    assert q.shape[-2] % k.shape[-2] == 0, "Number of heads in key/value must divide number of heads in query"


def _check_index(t, name, shape):
    assert t is not None, f"{name} is required here"
    assert isinstance(t, torch.Tensor), f"{name} must be a tensor"
    assert t.dtype == torch.int32, f"{name} must have dtype torch.int32"
    assert t.is_contiguous(), f"{name} must be contiguous"
    assert tuple(t.shape) == tuple(shape), f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}"


def _attend(q_rows, k_cache, v_cache, table_row, kv_len, scale, causal):
    """q_rows [n, Hq, D] of one sequence -> [n, Hq, D] (q dtype), attending to its first kv_len cached keys."""
    n, hq, d = q_rows.shape
    ps, hk = k_cache.shape[1], k_cache.shape[2]
    pages = table_row[: -(-kv_len // ps)].long()
    k = k_cache[pages].reshape(-1, hk, d)[:kv_len].float().repeat_interleave(hq // hk, dim=1)
    v = v_cache[pages].reshape(-1, hk, d)[:kv_len].float().repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("nhd,khd->hnk", q_rows.float(), k) * scale
    if causal:  # bottom-right aligned: query i sees keys j <= i + kv_len - n
        i = torch.arange(n)[:, None]
        j = torch.arange(kv_len)[None, :]
        scores = scores.masked_fill((j > i + kv_len - n)[None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)  # all-masked rows -> 0
    return torch.einsum("hnk,khd->nhd", probs, v).to(q_rows.dtype)


def _fa3_module(calls):
    mod = types.ModuleType("flash_attn_interface")

    def flash_attn_with_kvcache(
        q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
        cache_batch_idx=None, cache_leftpad=None, page_table=None, cu_seqlens_q=None, cu_seqlens_k_new=None,
        max_seqlen_q=None, rotary_seqlens=None, q_descale=None, k_descale=None, v_descale=None,
        softmax_scale=None, causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
        rotary_interleaved=True, scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
        return_softmax_lse=False,
    ):
        assert k is None and v is None, "the adapter must not append K/V (they are already in the cache)"
        assert cache_batch_idx is None and cache_leftpad is None and qv is None and rotary_cos is None
        assert q_descale is None and k_descale is None and v_descale is None
        assert window_size == (-1, -1) and softcap == 0.0 and not return_softmax_lse
        assert k_cache.stride(-1) == 1, "k_cache must have contiguous last dimension"
        assert v_cache.stride(-1) == 1, "v_cache must have contiguous last dimension"
        _check_qkv(q, k_cache, v_cache)
        assert page_table is not None, "glint's cache is paged"
        varlen = cu_seqlens_q is not None
        if varlen:
            assert q.dim() == 3, "q is (total_q, nheads, headdim) with cu_seqlens_q"
            assert max_seqlen_q is not None, "max_seqlen_q must be provided if cu_seqlens_q is provided"
            b = cu_seqlens_q.shape[0] - 1
            _check_index(cu_seqlens_q, "cu_seqlens_q", (b + 1,))
            starts = cu_seqlens_q.tolist()
        else:
            assert q.dim() == 4, "q is (batch_size, seqlen, nheads, headdim) without cu_seqlens_q"
            b, s = q.shape[:2]
            starts = [i * s for i in range(b + 1)]
        assert page_table.stride(-1) == 1, "page_table must have contiguous last dimension"
        assert page_table.dtype == torch.int32, "page_table must have dtype torch.int32"
        assert page_table.dim() == 2 and page_table.shape[0] == b, "batch_size must be equal to batch_size_k"
        _check_index(cache_seqlens, "cache_seqlens", (b,))
        assert isinstance(softmax_scale, float)
        calls.append(("fa3.flash_attn_with_kvcache", tuple(q.shape)))
        qf = q.reshape(-1, *q.shape[-2:])
        out = torch.zeros_like(qf)
        lens = cache_seqlens.tolist()
        if varlen:
            assert max(e - s for s, e in itertools.pairwise(starts)) <= max_seqlen_q
        for i in range(b):
            s0, s1 = starts[i], starts[i + 1]
            assert s1 - s0 <= lens[i] <= page_table.shape[1] * k_cache.shape[1]
            if s1 > s0:
                out[s0:s1] = _attend(qf[s0:s1], k_cache, v_cache, page_table[i], lens[i], softmax_scale, causal)
        return out.view(q.shape)

    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    return mod


def _fa2_module(calls):
    mod = types.ModuleType("flash_attn")

    def _check_paged(k_cache, block_table, b):
        assert k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
        assert block_table.dtype == torch.int32, "block_table must have dtype torch.int32"
        assert block_table.stride(-1) == 1, "block_table must have contiguous last dimension"
        assert block_table.dim() == 2 and block_table.shape[0] == b

    def flash_attn_with_kvcache(
        q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
        cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
        window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
        return_softmax_lse=False,
    ):
        assert k is None and v is None and cache_batch_idx is None and cache_leftpad is None
        assert alibi_slopes is None and window_size == (-1, -1) and not return_softmax_lse
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        _check_qkv(q, k_cache, v_cache)
        assert q.dim() == 4, "q is (batch_size, seqlen, nheads, headdim)"
        b, _s = q.shape[:2]
        assert block_table is not None
        _check_paged(k_cache, block_table, b)
        _check_index(cache_seqlens, "cache_seqlens", (b,))
        assert isinstance(softmax_scale, float)
        calls.append(("fa2.flash_attn_with_kvcache", tuple(q.shape)))
        out = torch.zeros_like(q)
        for i, n in enumerate(cache_seqlens.tolist()):
            out[i] = _attend(q[i], k_cache, v_cache, block_table[i], n, softmax_scale, causal)
        return out

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
        causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
        return_attn_probs=False, block_table=None,
    ):
        assert dropout_p == 0.0 and alibi_slopes is None and window_size == (-1, -1) and not return_attn_probs
        _check_qkv(q, k, v)
        assert q.dim() == 3, "q is (total_q, nheads, headdim)"
        b = cu_seqlens_q.shape[0] - 1
        _check_index(cu_seqlens_q, "cu_seqlens_q", (b + 1,))
        _check_index(cu_seqlens_k, "cu_seqlens_k", (b + 1,))
        assert block_table is not None, "glint's cache is paged"
        _check_paged(k, block_table, b)
        assert isinstance(softmax_scale, float)
        qs, ks = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert qs[-1] == q.shape[0]
        q_lens = [e - s for s, e in itertools.pairwise(qs)]
        kv_lens = [e - s for s, e in itertools.pairwise(ks)]
        assert max(q_lens) <= max_seqlen_q and max(kv_lens) <= max_seqlen_k
        # varlen_fwd reshapes q to (b * groups, hk, d) when max_seqlen_q == 1: only valid with total_q == b
        assert max_seqlen_q > 1 or q.shape[0] == b
        calls.append(("fa2.flash_attn_varlen_func", tuple(q.shape)))
        out = torch.zeros_like(q)
        for i in range(b):
            if q_lens[i]:
                out[qs[i]:qs[i + 1]] = _attend(q[qs[i]:qs[i + 1]], k, v, block_table[i], kv_lens[i],
                                               softmax_scale, causal)
        return out

    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


def install(monkeypatch, kind: str) -> list:
    """Make `kind` ("fa3" or "fa2") the importable flash_attn library; the other one is hidden."""
    calls: list = []
    if kind == "fa3":
        monkeypatch.setitem(sys.modules, "flash_attn_interface", _fa3_module(calls))
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # None in sys.modules: import raises ImportError
    elif kind == "fa2":
        monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
        monkeypatch.setitem(sys.modules, "flash_attn", _fa2_module(calls))
    else:
        raise ValueError(kind)
    return calls


def _fa4_module(calls):
    mod = types.ModuleType("flash_attn.cute.interface")

    def flash_attn_varlen_func(
        q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
        min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
        softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
        pack_gqa=None, deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None,
        block_sparse_tensors=None, aux_tensors=None, aux_scalars=None, return_lse=False,
    ):
        assert qv is None and seqused_q is None and gather_kv_indices is None
        assert window_size == (None, None) and softcap == 0.0 and score_mod is None and mask_mod is None
        paged = page_table is not None
        _check_qkv(q, k, v, paged)
        assert q.dim() == 3, "q is (total_q, nheads, headdim) with cu_seqlens_q"
        b = cu_seqlens_q.shape[0] - 1
        _check_index(cu_seqlens_q, "cu_seqlens_q", (b + 1,))
        assert isinstance(max_seqlen_q, int) and isinstance(softmax_scale, float)
        starts = cu_seqlens_q.tolist()
        assert max(e - s for s, e in itertools.pairwise(starts)) <= max_seqlen_q
        if paged:  # glint's paged cache: lengths by seqused_k
            assert cu_seqlens_k is None
            _check_index(seqused_k, "seqused_k", (b,))
            assert page_table.dtype == torch.int32 and page_table.stride(-1) == 1 and page_table.shape[0] == b
            lens = seqused_k.tolist()
            offsets = [0] * b
        else:  # packed K/V: sequence i's keys are k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]
            assert seqused_k is None, "glint packs K/V without padding"
            _check_index(cu_seqlens_k, "cu_seqlens_k", (b + 1,))
            ks = cu_seqlens_k.tolist()
            assert ks[0] == 0 and ks[-1] == k.shape[0] and all(x <= y for x, y in itertools.pairwise(ks))
            lens, offsets = [e - s for s, e in itertools.pairwise(ks)], ks[:-1]
            assert isinstance(max_seqlen_k, int) and max(lens) <= max_seqlen_k
            page_table = torch.arange(k.shape[0], dtype=torch.int32)[None]  # one-token pages, packed in order
            k, v = k[:, None], v[:, None]
        calls.append(("fa4.flash_attn_varlen_func" + ("" if paged else "[packed]"), tuple(q.shape)))
        out = torch.zeros_like(q)
        for i in range(b):
            s0, s1 = starts[i], starts[i + 1]
            table = page_table[i] if paged else page_table[0, offsets[i]:]
            assert s1 - s0 <= lens[i] <= table.shape[0] * k.shape[1]
            if s1 > s0:
                out[s0:s1] = _attend(q[s0:s1], k, v, table, lens[i], softmax_scale, causal)
        return out, torch.zeros(q.shape[1], q.shape[0])

    def flash_attn_func(
        q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False, window_size=(None, None),
        learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, score_mod=None,
        score_mod_bwd=None, mask_mod=None, aux_tensors=None, aux_scalars=None, block_sparse_tensors=None,
        block_sparse_tensors_bwd=None, return_lse=False,
    ):
        assert qv is None and gather_kv_indices is None and window_size == (None, None) and softcap == 0.0
        assert score_mod is None and mask_mod is None and isinstance(softmax_scale, float)
        assert q.dtype in HALF and k.dtype == q.dtype and v.dtype == q.dtype
        assert q.dim() == 4 and k.dim() == 4 and v.shape == k.shape, "(batch, seqlen, nheads, headdim)"
        assert all(t.stride(-1) == 1 for t in (q, k, v)), "Input tensor must have contiguous last dimension"
        assert q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1] and q.shape[2] % k.shape[2] == 0
        calls.append(("fa4.flash_attn_func", tuple(q.shape)))
        b, n, _, d = q.shape
        kv_len = k.shape[1]
        table = torch.arange(kv_len, dtype=torch.int32)  # one-token pages in order
        out = torch.stack([_attend(q[i], k[i][:, None], v[i][:, None], table, kv_len, softmax_scale, causal)
                           for i in range(b)])
        return out, torch.zeros(b, q.shape[2], n)

    mod.flash_attn_varlen_func = flash_attn_varlen_func
    mod.flash_attn_func = flash_attn_func
    return mod


def install_fa4(monkeypatch) -> list:
    """Make a fake flash-attn-4 (`flash_attn.cute.interface`) importable; returns the call log."""
    calls: list = []
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = _fa4_module(calls)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", cute.interface)
    return calls


def hide_fa4(monkeypatch) -> None:
    """flash-attn-4 not importable (also on a machine where it is installed)."""
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)


def hide(monkeypatch) -> None:
    """Neither library importable (also on a machine where one is installed)."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
