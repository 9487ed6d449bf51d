"""Real-shape calls of every Triton wrapper, used by compile_sm90.py (compile only, CPU tensors)."""
from __future__ import annotations

import itertools
import traceback

import torch

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


def case_quant():
    from kernels.triton_quant import quant_fp8_per_group, quant_fp8_per_token

    for t, k in [(1, 5120), (64, 12288), (4096, 5120)]:
        x = torch.empty(t, k, dtype=BF16)
        quant_fp8_per_token(x)
        quant_fp8_per_group(x)


def case_norm_act():
    from kernels.triton_activation import silu_mul, silu_mul_fp8
    from kernels.triton_norm import add_rms_norm, rms_norm, rms_norm_fp8

    for t in (1, 4096):
        x = torch.empty(t, 5120, dtype=BF16)
        w = torch.empty(5120, dtype=BF16)
        rms_norm(x, w, 1e-5)
        add_rms_norm(x, x, w, 1e-5)
        rms_norm_fp8(x, w, 1e-5, residual=x)
        for i in (1536, 192, 12288):
            g = torch.empty(t, 2 * i, dtype=BF16)
            silu_mul(g)
            silu_mul_fp8(g)


def case_allreduce():
    from kernels.triton_allreduce import flag_area_ints, one_shot_all_reduce, one_shot_all_reduce_add_rms_norm

    for world in (2, 4, 8):
        tables = torch.empty(world, dtype=torch.int64)
        w = torch.empty(5120, dtype=BF16)
        for t in (1, 16, 48):
            x = torch.empty(t, 5120, dtype=BF16)
            one_shot_all_reduce(x, tables, tables, 0, world)
            for quant in (False, True):
                one_shot_all_reduce_add_rms_norm(x, tables, tables, world - 1, world, x, w, 1e-5, quant)
    assert flag_area_ints(8) == 1024


def case_rope_kv():
    from kernels.triton_kv_store import store_kv
    from kernels.triton_rope import qk_norm_rope

    for hq, hk in ((96, 8), (12, 1)):
        t, d = 64, 128
        qkv = torch.empty(t, (hq + 2 * hk) * d, dtype=BF16)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
        q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
        w = torch.empty(d, dtype=BF16)
        cs = torch.empty(4096, 64)
        pos = torch.empty(t, dtype=torch.int64)
        qk_norm_rope(q, k, w, w, cs, pos, 1e-5)
        for cdt in (BF16, FP8):
            kc = torch.empty(100, 16, hk, d, dtype=cdt)
            qk_norm_rope(q, k, w, w, cs, pos, 1e-5, v=v, k_cache=kc, v_cache=kc, slot_mapping=pos)
            wide = torch.empty(t, hk, d, dtype=BF16)
            qk_norm_rope(q, k, w, w, cs, pos, 1e-5, v=v, k_cache=kc, v_cache=kc, slot_mapping=pos, kv_out=(wide, wide))
            store_kv(k, v, kc, kc, pos)


def case_packed_kv():
    from kernels.triton_packed_kv import gather_packed_kv

    for hk, cdt in ((8, BF16), (8, FP8), (1, FP8)):
        kc = torch.empty(100, 16, hk, 128, dtype=cdt)
        gather_packed_kv(kc, kc, torch.empty(300, dtype=torch.int64), BF16)


def case_gemm():
    from kernels.triton_fp8_gemm import fp8_gemm

    for m in (1, 16, 64, 256, 4096):
        for n, k in ((1536, 5120), (5120, 12288), (14336, 5120)):
            xq = torch.empty(m, k, dtype=FP8)
            w = torch.empty(n, k, dtype=FP8)
            fp8_gemm(xq, torch.empty(m, 1), w, torch.empty(n, 1), torch.empty(n, dtype=BF16), BF16, False)
            if m in (1, 4096):
                fp8_gemm(xq, torch.empty(m, k // 128), w, torch.empty(n // 128, k // 128), None, BF16, True)


def case_swap():
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap

    for m in (1, 4, 16):
        for n, k in ((14336, 5120), (5120, 12288)):
            x = torch.empty(m, k, dtype=BF16)
            w = torch.empty(n, k, dtype=FP8)
            fp8_gemm_swap(torch.empty(m, k, dtype=FP8), torch.empty(m, 1), w, torch.empty(n, 1), None, BF16)
            fp8_gemm_swap(x, None, w, torch.empty(n, 1), None, BF16)  # in-kernel activation quant
            fp8_gemm_swap(x, None, w, torch.empty(n, 1), None, BF16, x_absmax_parts=torch.empty(m, 96))
    from kernels.triton_fp8_gemm_swap import fp8_qkv_norm_rope

    for m in (1, 16):
        for hq, hk in ((96, 8), (12, 1)):
            n = (hq + 2 * hk) * 128
            kc = torch.empty(100, 16, hk, 128, dtype=FP8)
            pos = torch.zeros(m, dtype=torch.int64)
            nw = torch.empty(128, dtype=BF16)
            fp8_qkv_norm_rope(torch.empty(m, 5120, dtype=FP8), torch.empty(m, 1), torch.empty(n, 5120, dtype=FP8),
                              torch.empty(n, 1), torch.empty(n, dtype=BF16), BF16, hq, hk, nw, nw,
                              torch.empty(4096, 64), pos, 1e-5, kc, kc, pos)
            fp8_qkv_norm_rope(torch.empty(m, 5120, dtype=FP8), torch.empty(m, 1), torch.empty(n, 5120, dtype=FP8),
                              torch.empty(n, 1), torch.empty(n, dtype=BF16), BF16, hq, hk, nw, nw,
                              torch.empty(4096, 64), pos, 1e-5, kc, kc, pos,
                              config=dict(BLOCK_W=128, BLOCK_K=128, SPLIT_K=1, num_warps=8, num_stages=6))


def case_router():
    from kernels.triton_moe_routing import moe_gate_route, rms_norm_gate_route

    for t in (1, 4):
        x = torch.empty(t, 5120, dtype=BF16)
        gw, b = torch.empty(160, 5120), torch.empty(160)
        moe_gate_route(x, gw, b, 8, 1, 1, True, 2.5, 1)
        for quant in (True, False):
            rms_norm_gate_route(x, x, torch.empty(5120, dtype=BF16), 1e-5, quant, gw, b, 8, 1, 1, True, 2.5, 1)


def case_moe():
    from kernels.triton_moe import fused_moe
    from kernels.triton_moe_routing import moe_route, split_bf16_stacked

    moe_route(torch.empty(4096, 480), torch.empty(160), 8, 1, 1, True, 2.5, 1, parts=3)
    split_bf16_stacked(torch.empty(160, 5120))
    for t in (1, 4, 64, 512, 4096):
        moe_route(torch.empty(t, 160), torch.empty(160), 8, 1, 1, True, 2.5, 1)
        for e, inter in ((161, 192), (160, 1536)):
            h = 5120
            x = torch.empty(t, h, dtype=BF16)
            ids = torch.zeros(t, 9, dtype=torch.int32)
            tw = torch.empty(t, 9)
            w13 = torch.empty(e, 2 * inter, h, dtype=FP8)
            w2 = torch.empty(e, h, inter, dtype=FP8)
            fused_moe(x, w13, w2, tw, ids, torch.empty(e, 2 * inter, 1), torch.empty(e, h, 1), "fp8_channel")
            if t == 64:  # aligned + separate reduce
                fused_moe(x, w13, w2, tw, ids, torch.empty(e, 2 * inter, 1), torch.empty(e, h, 1), "fp8_channel",
                          config=dict(BLOCK_M=16, BLOCK_N1=64, BLOCK_K1=128, SPLIT_K1=2, W1=4, S1=4, BLOCK_N2=128,
                                      BLOCK_K2=128, W2=4, S2=3, PAIR_MAX=0, FUSE_REDUCE_MAX_T=0))
            if t in (1, 4096):
                fused_moe(x, w13, w2, tw, ids, torch.empty(e, 2 * inter // 128 + 1, h // 128),
                          torch.empty(e, h // 128, inter // 128 + 1), "fp8_block")


def case_moe_tma():
    """The prefill configs with tiles by tensor descriptors (TMA1 / TMA2), as the GPU would take them."""
    import kernels.triton_moe as moe

    moe._tma_capable = lambda device: True  # CPU stub tensors: the GPU's answer
    t, h = 4096, 5120
    for e, inter in ((161, 192), (161, 384), (160, 1536)):
        cfg = dict(moe.moe_config(t, e, inter, h, "fp8_channel", torch.device("cpu")), TMA1=True, TMA2=True)
        for bn1, w1 in ((64, 4), (128, 8)):
            moe.fused_moe(torch.empty(t, h, dtype=BF16), torch.empty(e, 2 * inter, h, dtype=FP8),
                          torch.empty(e, h, inter, dtype=FP8), torch.empty(t, 9), torch.zeros(t, 9, dtype=torch.int32),
                          torch.empty(e, 2 * inter, 1), torch.empty(e, h, 1), "fp8_channel",
                          config=dict(cfg, BLOCK_N1=bn1, W1=w1), quant_in_kernel=False)


def case_moe_persistent():
    """The persistent down GEMM (PERSIST2) at the prefill tiles the H100 tables hold."""
    import kernels.triton_moe as moe

    moe._tma_capable = lambda device: True  # CPU stub tensors: the GPU's answer
    t, h = 4096, 5120
    for e, inter in ((161, 192), (161, 384), (160, 1536)):
        cfg = dict(moe.moe_config(t, e, inter, h, "fp8_channel", torch.device("cpu")), TMA1=True, TMA2=True,
                   PERSIST2=True, N_LOOP2=1)
        for bn2, s2 in ((256, 3), (256, 4), (128, 4)):
            moe.fused_moe(torch.empty(t, h, dtype=BF16), torch.empty(e, 2 * inter, h, dtype=FP8),
                          torch.empty(e, h, inter, dtype=FP8), torch.empty(t, 9), torch.zeros(t, 9, dtype=torch.int32),
                          torch.empty(e, 2 * inter, 1), torch.empty(e, h, 1), "fp8_channel",
                          config=dict(cfg, BLOCK_N2=bn2, W2=8, S2=s2), quant_in_kernel=False)


def case_attention():
    from kernels.triton_attention import paged_attention

    for hq, hk in ((96, 8), (12, 1)):
        for cdt in (BF16, FP8):
            kc = torch.empty(1000, 16, hk, 128, dtype=cdt)
            b = 8
            bt = torch.empty(b, 600, dtype=torch.int32)
            lens = torch.empty(b, dtype=torch.int32)
            qsl = torch.empty(b + 1, dtype=torch.int32)
            q = torch.empty(b, hq, 128, dtype=BF16)
            paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=1, max_seq_len=8192)
            paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=1, max_seq_len=8192, num_splits=1)
            for splits in (1, 8):  # with max |o| per head for o_proj's quantization
                paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=1, max_seq_len=8192, num_splits=splits,
                                absmax_out=torch.empty(q.shape[0], hq))
            for bn, w in ((64, 4), (128, 8)):
                paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=1, max_seq_len=8192, block_n=bn,
                                num_warps=w)
            for ql in (2, 4, 8, 16):  # verify: k+1 tokens per sequence
                q = torch.empty(b * ql, hq, 128, dtype=BF16)
                paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=ql, max_seq_len=8192,
                                absmax_out=torch.empty(q.shape[0], hq))
                paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=ql, max_seq_len=8192, num_splits=1)
            q = torch.empty(4096, hq, 128, dtype=BF16)
            paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=4096)
            if cdt == BF16:
                paged_attention(q, kc, kc, bt, lens, qsl, 0.1, max_query_len=4096, block_m=128, num_warps=8)


def case_token_counts():
    """A mixed step's token count (an 8192-token chunk next to 16 decodes = 8208, next to 15 = 8207) must not
    compile new variants of the kernels that take it: after the 8208-token calls, the 8207-token ones add no
    entry to any kernel's compile cache (Triton keys it on each int argument's divisibility by 16). Nor must the
    split count (16, then 15). (The block table's width, its row stride, stays specialized: the engine pads it to a
    multiple of 16, which tests/test_kernel_warmup.py checks.)"""
    from triton.runtime.jit import JITFunction

    import kernels.triton_attention as attention
    import kernels.triton_fp8_gemm as gemm
    import kernels.triton_moe as moe
    import kernels.triton_moe_align as align
    import kernels.triton_moe_routing as routing
    import kernels.triton_moe_segments as segments
    import kernels.triton_rope as rope

    jitted = {f"{m.__name__}.{n}": f for m in (attention, gemm, moe, align, routing, rope, segments)
              for n, f in vars(m).items()
              if isinstance(f, JITFunction)}

    def variants() -> dict[str, int]:
        return {n: sum(len(c[0]) for c in f.device_caches.values()) for n, f in jitted.items()}

    def attend(pages: int, splits: int) -> None:
        kc = torch.empty(1000, 16, 1, 128, dtype=BF16)
        for b, ql, path in ((2, 4096, "extend"), (8, 4, "verify"), (8, 1, "decode")):
            bt = torch.empty(b, pages, dtype=torch.int32)
            lens, qsl = torch.empty(b, dtype=torch.int32), torch.empty(b + 1, dtype=torch.int32)
            attention.paged_attention(torch.empty(b * ql if ql < 4096 else ql, 12, 128, dtype=BF16), kc, kc, bt,
                                      lens, qsl, 0.1, max_query_len=ql, max_seq_len=8192, num_splits=splits, path=path)

    def step(t: int) -> None:
        gemm.fp8_gemm(torch.empty(t, 5120, dtype=FP8), torch.empty(t, 1), torch.empty(1536, 5120, dtype=FP8),
                      torch.empty(1536, 1), None, BF16, False)
        routing.moe_route(torch.empty(t, 160), torch.empty(160), 8, 1, 1, True, 2.5, 1)
        e, inter, h = 161, 192, 5120
        moe.fused_moe(torch.empty(t, h, dtype=BF16), torch.empty(e, 2 * inter, h, dtype=FP8),
                      torch.empty(e, h, inter, dtype=FP8), torch.empty(t, 9), torch.zeros(t, 9, dtype=torch.int32),
                      torch.empty(e, 2 * inter, 1), torch.empty(e, h, 1), "fp8_channel")
        q, k = torch.empty(t, 12, 128, dtype=BF16), torch.empty(t, 1, 128, dtype=BF16)
        w = torch.empty(128, dtype=BF16)
        rope.qk_norm_rope(q, k, w, w, torch.empty(4096, 64), torch.empty(t, dtype=torch.int64), 1e-5)

    step(8208)
    attend(512, 16)
    first = variants()
    step(8207)
    attend(1024, 15)
    again = variants()
    grew = sorted(n for n in again if again[n] > first[n])
    used = sorted(n for n in first if first[n])
    if grew:
        raise AssertionError(f"new compiled variants for a token count of another alignment: {grew}")
    print(f"token counts 8208 / 8207: no new variants of {used}")


HOPPER_MAX_SHARED = 232448  # bytes of shared memory a block may use on H100 / H200 (Triton's launch check)


def case_moe_bf16():
    """Unquantized (bf16 and fp32) expert weights at every token-count bucket, tiny-checkpoint and GLM widths: each
    compiled variant fits a Hopper block's shared memory (the FP8-sized configs' bf16 tiles did not: 288 KiB; the
    decode tiles in fp32 did not either: 240 KiB, test_fused_moe_fp32 on an H100, session 30)."""
    from triton.runtime.jit import JITFunction

    import kernels.triton_moe as moe

    for t, dt in itertools.product((1, 64, 1000, 4096), (BF16, torch.float32)):
        for e, inter, h in ((8, 32, 64), (161, 192, 5120)):
            moe.fused_moe(torch.empty(t, h, dtype=dt), torch.empty(e, 2 * inter, h, dtype=dt),
                          torch.empty(e, h, inter, dtype=dt), torch.empty(t, 2), torch.zeros(t, 2, dtype=torch.int32),
                          None, None, "none")
    kernels = [k for f in vars(moe).values() if isinstance(f, JITFunction) for c in f.device_caches.values()
               for k in c[0].values()]
    over = [(k.name, k.metadata.shared) for k in kernels if k.metadata.shared > HOPPER_MAX_SHARED]
    if over:
        raise AssertionError(f"variants over {HOPPER_MAX_SHARED} bytes of shared memory: {over}")
    print(f"moe bf16 + fp32: {len(kernels)} variants, largest shared memory {max(k.metadata.shared for k in kernels)}")


CASES = {
    "token_counts": case_token_counts,
    "moe_bf16": case_moe_bf16,
    "attention": case_attention,
    "moe": case_moe,
    "moe_tma": case_moe_tma,
    "moe_persistent": case_moe_persistent,
    "gemm": case_gemm,
    "swap": case_swap,
    "router": case_router,
    "quant": case_quant,
    "norm_act": case_norm_act,
    "allreduce": case_allreduce,
    "rope_kv": case_rope_kv,
    "packed_kv": case_packed_kv,
}


def run_cases(names: list[str]) -> list[str]:
    failed = []
    for name, fn in CASES.items():
        if names and name not in names:
            continue
        try:
            fn()
        except Exception:
            traceback.print_exc()
            failed.append(name)
    return failed
