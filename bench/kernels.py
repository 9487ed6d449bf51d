"""Kernel micro-benchmarks at GLM-4.7 shapes: ours vs a baseline in the same process, and vs the roofline.

    python -m bench.kernels [--only quant,norm,rope,linear,block,route,moe,attn,prefill] [--quick]
                            [--tune] [--out DIR]

For every kernel and shape it prints the time (median), the baseline's time and the speedup (baseline /
ours), and the share of the roofline: bytes the op must move (each input read once, each output written once)
over the HBM bandwidth measured at the start of the run (a 2 GiB device copy, read + write counted), or FLOPs
over the dense FP8 / BF16 datasheet peak (H100/H200 SXM: 1979 / 989 TFLOP/s; the cuBLAS peaks measured in the
run are printed for reference). Targets from issue 5 are checked where they apply.

Timing: every op (ours and baseline alike) is captured in a CUDA graph with R variants on rotated inputs
(different weights / routings / caches, so repeated runs don't measure the L2 cache), the graph is replayed
and the median replay time divided by R. Baselines that cannot be captured (host syncs) are timed eagerly
and marked '(eager)'.

Baselines: torch references (kernels/*.py) for the small ops; cuBLAS `torch._scaled_mm` (row-wise scales,
same Triton activation quant in front) for the FP8 linear; bf16 `torch.mm` on dequantized weights for the
block-FP8 linear; `torch._scaled_grouped_mm` over only the active experts (the two grouped GEMMs alone,
weights pre-gathered outside the timing, rows padded to 16) for the fused MoE; `F.scaled_dot_product_attention`
on contiguous bf16 K/V (GQA) for attention; for prefill, cuDNN SDPA on contiguous bf16 K/V (with a cached prefix:
the same two cuDNN calls + LSE merge as the SDPA prefill path, without its gather) for both ours (Triton) and the
SDPA prefill path (`--prefill-attention-backend sdpa`).

--tune sweeps fused-MoE launch configs per (E, N, token bucket) and the FP8-linear Triton/cuBLAS crossover,
and writes kernels/configs-style JSON files into --out (copy them into kernels/configs/ to use them);
--write-tables merges the tuned MoE buckets into kernels/configs/fused_moe itself (--moe-tokens / --moe-inter
pick the buckets and widths; each width as soon as it is tuned), so a later command in the same device call runs
with them.
--moe-ep N runs (and tunes) the MoE section as rank 0 of N expert-parallel ranks (--enable-expert-parallel): its
160/N experts whole and the fused shared one, the routing's other pairs -1; its tables are E=160/N+1's
(`--moe-ep 8 --moe-inter 1536`: the EP8 rank's E=21 table).
--moe-routing balanced gives every routed expert the same pair count (t = 5120: 256 each, whole 64- / 128-row
blocks), separating the GEMMs' own efficiency from the padding rows a random routing's expert counts cost.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.moe_routing import moe_local_ids_ref
from kernels.sdpa_prefill import paged_attention_prefill_sdpa, prefill_attention_sdpa

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
DATASHEET = {"fp8": 1979e12, "bf16": 989e12}
ROWS: list[dict] = []


# ------------------------------------------------------------------------------------------- timing


def _graph_time(fns: list[Callable], reps: int = 20) -> float:
    """Median seconds per call of fns (each called once per replay, in order)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    # replay enough times that one timed sample is >= ~1 ms
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, min(200, int(1e-3 / one)))
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    del g
    return statistics.median(times) / len(fns)


def _eager_time(fns: list[Callable], reps: int = 20) -> float:
    for f in fns:
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for f in fns:
            f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times) / len(fns)


def timeit(fns: list[Callable], graph: bool = True) -> tuple[float, str]:
    if graph:
        try:
            return _graph_time(fns), "graph"
        except Exception as exc:  # noqa: BLE001 - host syncs etc.: fall back to eager
            torch.cuda.synchronize()
            print(f"    (graph capture failed: {type(exc).__name__}: {str(exc)[:80]}; eager)", flush=True)
    return _eager_time(fns), "eager"


# ------------------------------------------------------------------------------------------- hardware


def _copy_bw() -> float:
    src = torch.empty(1 << 30, dtype=BF16, device="cuda").normal_()  # 2 GiB
    dst = torch.empty_like(src)
    t = _eager_time([lambda: dst.copy_(src)], reps=10)
    return 2 * src.numel() * 2 / t


def _mm_peaks(m: int = 8192) -> tuple[float, float]:
    a = torch.randn(m, m, device="cuda", dtype=BF16)
    b = torch.randn(m, m, device="cuda", dtype=BF16)
    bf16 = 2 * m**3 / _eager_time([lambda: a @ b], reps=10)
    a8, b8 = a.to(FP8), b.to(FP8).t()
    sa = torch.rand(m, 1, device="cuda") + 0.5
    sb = torch.rand(1, m, device="cuda") + 0.5
    try:
        fp8 = 2 * m**3 / _eager_time([lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=BF16)], 10)
    except Exception:  # noqa: BLE001
        fp8 = float("nan")
    return bf16, fp8


def measure_hw() -> dict:
    bw = _copy_bw()
    torch.cuda.empty_cache()
    bf16, fp8 = _mm_peaks()
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", 50 << 20), "bw": bw, "bf16_cublas": bf16, "fp8_cublas": fp8}


HW: dict = {}


def report(kernel: str, shape: str, ours: float, base: float | None, base_name: str, *, nbytes: float = 0,
           flops: float = 0, peak: str = "fp8", target: str = "", met: bool | None = None, note: str = "") -> dict:
    mem = nbytes / ours / HW["bw"] if nbytes else None
    comp = flops / ours / DATASHEET[peak] if flops else None
    speed = base / ours if base else None
    row = dict(kernel=kernel, shape=shape, us=ours * 1e6, base=base_name, base_us=base * 1e6 if base else None,
               speedup=speed, hbm_pct=None if mem is None else 100 * mem,
               peak_pct=None if comp is None else 100 * comp, peak=peak if flops else None, target=target,
               met=met, note=note)
    ROWS.append(row)
    print(_fmt(row), flush=True)
    return row


def _fmt(r: dict) -> str:
    sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
    bu = f"{r['base_us']:.1f}" if r["base_us"] else "-"
    hbm = f"{r['hbm_pct']:.0f}%" if r["hbm_pct"] is not None else "-"
    pk = f"{r['peak_pct']:.0f}%{r['peak']}" if r["peak_pct"] is not None else "-"
    met = {None: "", True: "met", False: "MISSED"}[r["met"]]
    return (f"{r['kernel']:14s} {r['shape']:34s} {r['us']:9.1f}us  {r['base']:>18s} {bu:>9s}us {sp:>7s}  "
            f"hbm {hbm:>5s}  {pk:>9s}  {r['target']} {met} {r['note']}")


def rotations(bytes_per_variant: float, cap: int = 8) -> int:
    """How many input variants to rotate so that they don't all fit in L2 (3x L2)."""
    return max(1, min(cap, math.ceil(3 * HW["l2_bytes"] / max(bytes_per_variant, 1))))


def fp8_weight(*shape, scale=0.05):
    return (torch.randn(*shape, device="cuda") * (scale * 448 / 4)).clamp(-448, 448).to(FP8)


# ------------------------------------------------------------------------------------------- sections


def bench_elementwise(args):
    from kernels.activation import silu_mul_ref
    from kernels.norm import add_rms_norm_ref, rms_norm_ref
    from kernels.quant import quant_fp8_per_token_ref
    from kernels.triton_activation import silu_mul
    from kernels.triton_norm import add_rms_norm, rms_norm, rms_norm_fp8
    from kernels.triton_quant import quant_fp8_per_group, quant_fp8_per_token

    h = 5120
    for t in (1, 64, 4096):
        r = rotations(t * h * 2 * 3)
        xs = [torch.randn(t, h, device="cuda", dtype=BF16) for _ in range(r)]
        rs = [torch.randn(t, h, device="cuda", dtype=BF16) for _ in range(r)]
        w = torch.rand(h, device="cuda", dtype=BF16) + 0.5
        if "quant" in args.only:
            ours, _ = timeit([lambda x=x: quant_fp8_per_token(x) for x in xs])
            base, _ = timeit([lambda x=x: quant_fp8_per_token_ref(x) for x in xs])
            report("quant_token", f"T={t} K={h}", ours, base, "torch ref", nbytes=t * h * 3 + t * 4)
            ours, _ = timeit([lambda x=x: quant_fp8_per_group(x) for x in xs])
            report("quant_group128", f"T={t} K={h}", ours, None, "-", nbytes=t * h * 3 + t * h // 32)
        if "norm" in args.only:
            ours, _ = timeit([lambda x=x: rms_norm(x, w, 1e-5) for x in xs])
            base, _ = timeit([lambda x=x: rms_norm_ref(x, w, 1e-5) for x in xs])
            report("rms_norm", f"T={t} H={h}", ours, base, "torch ref", nbytes=t * h * 4)
            ours, _ = timeit([lambda x=x, y=y: add_rms_norm(x, y, w, 1e-5) for x, y in zip(xs, rs)])
            base, _ = timeit([lambda x=x, y=y: add_rms_norm_ref(x, y, w, 1e-5) for x, y in zip(xs, rs)])
            report("add_rms_norm", f"T={t} H={h}", ours, base, "torch ref", nbytes=t * h * 8)
            ours, _ = timeit([lambda x=x, y=y: rms_norm_fp8(x, w, 1e-5, residual=y) for x, y in zip(xs, rs)])
            base, _ = timeit([lambda x=x, y=y: quant_fp8_per_token_ref(add_rms_norm_ref(x, y, w, 1e-5)[0])
                              for x, y in zip(xs, rs)])
            report("add_norm+fp8", f"T={t} H={h}", ours, base, "torch ref", nbytes=t * h * 9)
        if "norm" in args.only:
            i = 1536
            gs = [torch.randn(t, 2 * i, device="cuda", dtype=BF16) for _ in range(r)]
            ours, _ = timeit([lambda g=g: silu_mul(g) for g in gs])
            base, _ = timeit([lambda g=g: silu_mul_ref(g) for g in gs])
            report("silu_mul", f"T={t} I={i}", ours, base, "torch ref", nbytes=t * i * 6)


def bench_rope(args):
    from kernels.rope import qk_norm_rope_ref, rope_cos_sin_cache
    from kernels.triton_rope import qk_norm_rope

    d, rot, bs = 128, 64, 16
    cs = rope_cos_sin_cache(rot, 131072, 1e6, "cuda")
    for hq, hk in ((96, 8), (12, 1)):
        for t in (1, 64, 4096):
            per = t * (hq + 2 * hk) * d * 2 * 2
            r = rotations(per)
            qkvs = [torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=BF16) for _ in range(r)]
            parts = [x.split([hq * d, hk * d, hk * d], -1) for x in qkvs]
            parts = [(q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)) for q, k, v in parts]
            w = torch.rand(d, device="cuda", dtype=BF16) + 0.5
            pos = torch.randint(0, 131072, (t,), device="cuda")
            nb = (t + bs - 1) // bs + 1
            kc = torch.zeros(nb, bs, hk, d, device="cuda", dtype=FP8)
            vc = torch.zeros_like(kc)
            slots = torch.randperm(nb * bs, device="cuda")[:t]

            def ours_fn(q, k, v):
                return qk_norm_rope(q, k, w, w, cs, pos, 1e-5, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots,
                                    k_scale=0.05, v_scale=0.05)

            def base_fn(q, k, v):
                qo, ko = qk_norm_rope_ref(q, k, w, w, cs, pos, 1e-5)
                kc.view(-1, hk, d)[slots] = (ko.float() / 0.05).to(FP8)
                vc.view(-1, hk, d)[slots] = (v.float() / 0.05).to(FP8)
                return qo, ko

            ours, _ = timeit([lambda p=p: ours_fn(*p) for p in parts])
            base, _ = timeit([lambda p=p: base_fn(*p) for p in parts])
            nbytes = t * (hq + hk) * d * 2 * 2 + t * hk * d * 2 + t * 2 * hk * d + t * rot * 4
            mem = nbytes / ours / HW["bw"]
            report("qk_norm_rope", f"T={t} heads {hq}/{hk} +fp8 KV store", ours, base, "torch ref", nbytes=nbytes,
                   target=">=60% HBM" if t >= 4096 else "", met=(mem >= 0.6) if t >= 4096 else None)


def bench_linear(args, tune_out: dict | None = None):
    from kernels.triton_fp8_gemm import fp8_gemm, fp8_linear_channel_auto, scaled_mm_linear
    from kernels.triton_quant import quant_fp8_per_token

    shapes = [(1536, 5120), (5120, 1536), (14336, 5120), (5120, 12288)]
    ms = (1, 8, 16, 32, 64, 128, 256, 1024, 4096) if not args.quick else (1, 16, 64, 256, 4096)
    crossover: dict[tuple, list] = {}
    for n, k in shapes:
        r = rotations(n * k)
        ws = [fp8_weight(n, k) for _ in range(r)]
        wss = [torch.rand(n, 1, device="cuda") * 1e-3 for _ in range(r)]
        bias = torch.randn(n, device="cuda", dtype=BF16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=BF16)
            xq, xs = quant_fp8_per_token(x)
            tri, _ = timeit([lambda w=w, s=s: fp8_gemm(xq, xs, w, s, bias, BF16, False) for w, s in zip(ws, wss)])
            cub, _ = timeit([lambda w=w, s=s: scaled_mm_linear(xq, xs, w, s, bias, BF16) for w, s in zip(ws, wss)])
            auto, _ = timeit([lambda w=w, s=s: fp8_linear_channel_auto(x, w, s, bias) for w, s in zip(ws, wss)])
            q, _ = timeit([lambda: quant_fp8_per_token(x)])
            crossover.setdefault((n, k), []).append((m, tri, cub))
            nbytes = n * k + m * k * 2 + m * n * 2 + n * 4
            flops = 2 * m * n * k
            best = min(tri, cub)
            report("fp8_linear", f"M={m} N={n} K={k} (triton {tri*1e6:.1f} / cublas {cub*1e6:.1f})",
                   auto, cub + q, "quant+_scaled_mm", nbytes=nbytes, flops=flops,
                   target="not slower than _scaled_mm", met=auto <= (cub + q) * 1.03,
                   note=f"gemm-only best={'triton' if tri < cub else 'cublas'} {best*1e6:.1f}us")
    if tune_out is not None:
        small = tune_linear_small_m()
        # largest M where the Triton GEMM still beats cuBLAS on every shape
        best_m = 0
        for m in ms:
            if all(tri <= cub for (mm, tri, cub) in sum(crossover.values(), []) if mm == m):
                best_m = m
            else:
                break
        tune_out["fp8_linear.json"] = {torch.cuda.get_device_name(0).replace(" ", "_"):
                                       {"triton_max_m": best_m, "small_m": small}}
        print(f"  tuned: Triton GEMM up to M={best_m}", flush=True)


# GLM-4.7 linear shapes (N, K) at TP1 (qkv, o_proj, dense gate_up, shared-expert gate_up / down) and TP8
LINEAR_TUNE_SHAPES = [(14336, 5120), (5120, 12288), (24576, 5120), (3072, 5120), (5120, 1536), (1792, 5120),
                      (1536, 5120)]


def tune_linear_small_m(ms=(1, 16)) -> dict:
    """Sweep the Triton FP8 GEMM's small-M configs per shape; {"N,K": {"M": config}} of the fastest."""
    from kernels.triton_fp8_gemm import fp8_gemm, gemm_config
    from kernels.triton_quant import quant_fp8_per_token

    cands = [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
             for bn in (32, 64, 128) for bk in (128, 256) for sk in (1, 2, 4, 8) for w in (4,) for st in (3, 5)
             if not (bn == 128 and bk == 256)]
    out: dict[str, dict] = {}
    for n, k in LINEAR_TUNE_SHAPES:
        r = rotations(n * k)
        ws = [fp8_weight(n, k) for _ in range(r)]
        wss = [torch.rand(n, 1, device="cuda") * 1e-3 for _ in range(r)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=BF16)
            xq, xs = quant_fp8_per_token(x)
            base = gemm_config(m, n, k, False, HW["sms"])
            best, best_t = base, _graph_time([lambda w=w, s=s: fp8_gemm(xq, xs, w, s, None, BF16, False, base)
                                             for w, s in zip(ws, wss)], reps=5)
            heur_t = best_t
            for c in cands:
                cfg = dict(base, BLOCK_M=16, GROUP_M=1, **c)
                try:
                    tt = _graph_time([lambda w=w, s=s: fp8_gemm(xq, xs, w, s, None, BF16, False, cfg)
                                      for w, s in zip(ws, wss)], reps=5)
                except Exception:  # noqa: BLE001 - e.g. out of shared memory
                    torch.cuda.synchronize()
                    continue
                if tt < best_t:
                    best, best_t = cfg, tt
            out.setdefault(f"{n},{k}", {})[str(m)] = best
            hbm = (n * k + n * 4) / best_t / HW["bw"]
            print(f"    tuned linear M={m} N={n} K={k}: {best_t*1e6:.1f}us ({100*hbm:.0f}% HBM; heuristic "
                  f"{heur_t*1e6:.1f}us) {best}", flush=True)
        del ws
        torch.cuda.empty_cache()
    return out


def bench_block_linear(args):
    from kernels.quant import dequant_fp8_per_block
    from kernels.triton_fp8_gemm import fp8_linear_block

    for n, k in ((1536, 5120), (5120, 1536), (14336, 5120)):
        r = rotations(n * k)
        ws = [fp8_weight(n, k) for _ in range(r)]
        sc = [torch.rand((n + 127) // 128, (k + 127) // 128, device="cuda") * 1e-3 for _ in range(r)]
        wd = [dequant_fp8_per_block(w, s, BF16) for w, s in zip(ws[:2], sc[:2])]
        wd = (wd * r)[:r]
        for m in (1, 64, 4096):
            x = torch.randn(m, k, device="cuda", dtype=BF16)
            ours, _ = timeit([lambda w=w, s=s: fp8_linear_block(x, w, s) for w, s in zip(ws, sc)])
            base, _ = timeit([lambda w=w: x @ w.t() for w in wd])
            report("fp8_block_lin", f"M={m} N={n} K={k}", ours, base, "bf16 mm (dequant)",
                   nbytes=n * k + m * k * 2 + m * n * 2, flops=2 * m * n * k)


def bench_route(args):
    from kernels.moe_routing import moe_route_ref
    from kernels.triton_moe_routing import moe_gate_route, moe_route, split_bf16_exact

    for t in (1, 64, 4096):
        logits = torch.randn(t, 160, device="cuda")
        bias = torch.randn(160, device="cuda") * 0.1
        ours, _ = timeit([lambda: moe_route(logits, bias, 8, 1, 1, True, 2.5, 1)])
        base, _ = timeit([lambda: moe_route_ref(logits, bias, 8, 1, 1, True, 2.5, 1)])
        report("moe_route", f"T={t} E=160 top8+shared", ours, base, "torch ref", nbytes=t * 160 * 4 + t * 9 * 8)
    # the prefill router: fp32 logits by the split bf16 GEMM, then routing. Baseline: the same math as torch ops
    # (split by ~8 launches, the parts summed by two adds, then the routing kernel), the path before session 27
    gw = torch.randn(160, 5120, device="cuda") / 5120**0.5
    bias = torch.randn(160, device="cuda") * 0.1

    def torch_split_router(x):
        e = gw.shape[0]
        parts = torch.mm(x, torch.cat(split_bf16_exact(gw.float())).t(), out_dtype=torch.float32)
        return moe_route((parts[:, :e] + parts[:, e:2 * e]) + parts[:, 2 * e:], bias, 8, 1, 1, True, 2.5, 1)

    for t in (4096, 16384):
        x = torch.randn(t, 5120, device="cuda", dtype=BF16)
        ours, _ = timeit([lambda: moe_gate_route(x, gw, bias, 8, 1, 1, True, 2.5, 1)])
        base, _ = timeit([lambda: torch_split_router(x)])
        report("moe_gate_route", f"T={t} E=160 H=5120 fp32 weight", ours, base, "torch split + adds",
               nbytes=t * 5120 * 2 + 160 * 5120 * 4, flops=2 * 3 * t * 5120 * 160)


def _moe_weight_scales(e: int, inter: int, h: int, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gate_up / down weight scales: per output channel [E, N, 1], or per 128 x 128 block
    [E, ceil(N / 128), ceil(K / 128)] (the layout kernels.quant.quant_fp8_weight_per_block writes)."""
    if quant == "fp8_channel":
        return (torch.rand(e, 2 * inter, 1, device="cuda") * 1e-3, torch.rand(e, h, 1, device="cuda") * 1e-3)
    blocks = lambda n: -(-n // 128)  # noqa: E731
    return (torch.rand(e, blocks(2 * inter), blocks(h), device="cuda") * 1e-3,
            torch.rand(e, blocks(h), blocks(inter), device="cuda") * 1e-3)


def _grouped_baseline(x, w13, w2, s13, s2, ids):
    """torch._scaled_grouped_mm over the active experts only: returns a closure running the two grouped GEMMs
    (weights gathered and rows padded to 16 outside the timing), or None when unsupported."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return None
    e_all = w13.shape[0]
    flat = ids.reshape(-1).long()
    flat = flat[flat >= 0]  # -1: an expert-parallel rank's pair for another rank
    active, counts = flat.unique(return_counts=True)
    pad = ((counts + 15) // 16) * 16
    offs = pad.cumsum(0).to(torch.int32)
    rows = int(pad.sum())
    h = x.shape[1]
    inter = w2.shape[2]
    a = torch.randn(rows, h, device="cuda").to(FP8)
    sa = torch.rand(rows, device="cuda") + 0.5
    if active.numel() == e_all:
        g13, g2, gs13, gs2 = w13, w2, s13, s2
    else:
        g13, g2, gs13, gs2 = w13[active], w2[active], s13[active], s2[active]
    b13 = g13.transpose(1, 2)  # [G, H, 2I], column-major per group
    b2 = g2.transpose(1, 2)  # [G, I, H]
    sb13 = gs13.reshape(g13.shape[0], -1).contiguous()
    sb2 = gs2.reshape(g2.shape[0], -1).contiguous()
    act = torch.randn(rows, inter, device="cuda").to(FP8)
    sact = torch.rand(rows, device="cuda") + 0.5

    def run():
        y1 = torch._scaled_grouped_mm(a, b13, sa, sb13, offs=offs, out_dtype=BF16)
        y2 = torch._scaled_grouped_mm(act, b2, sact, sb2, offs=offs, out_dtype=BF16)
        return y1, y2

    try:
        run()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        print(f"    _scaled_grouped_mm unsupported here: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return None
    return run


def _routings(t, e, k, r, ep: int = 1, device: str = "cuda", balanced: bool = False):
    """r random routings (top-k of e-1 routed experts + shared expert e-1), as moe_route would give.

    balanced: token i takes experts (i * k + j + v) % (e - 1) for j < k in variant v, so every routed expert gets
    t * k / (e - 1) pairs, or one fewer (t = 5120: 256 each, no padding rows at BLOCK_M 64 or 128): what the
    kernels reach without the padding a random routing's uneven expert counts cost.

    ep > 1: what expert-parallel rank 0 of ep ranks receives (--enable-expert-parallel): the first (e-1)/ep routed
    experts keep their ids, the shared expert is its local expert (e-1)/ep for tokens t % ep == 0, every other pair
    is -1 (kernels.moe_local_ids, as model.moe.MoE maps them)."""
    out = []
    for _ in range(r):
        if balanced:
            ids = (torch.arange(t, device=device)[:, None] * k + torch.arange(k, device=device) + len(out)) % (e - 1)
        else:
            ids = torch.rand(t, e - 1, device=device).topk(k, dim=1).indices
        ids = torch.cat([ids, torch.full((t, 1), e - 1, device=device)], 1).to(torch.int32)
        if ep > 1:
            ids = moe_local_ids_ref(ids, 0, (e - 1) // ep, shared_owner=(0, ep))
        w = torch.rand(t, k + 1, device=device)
        w[:, -1] = 1.0
        out.append((w, ids))
    return out


def _padding_share(routes, block_m: int) -> float:
    """The share of the grouped GEMMs' rows that are padding: each expert's pairs rounded up to whole blocks."""
    shares = []
    for _, ids in routes:
        counts = torch.bincount(ids[ids >= 0].long().flatten())
        counts = counts[counts > 0]
        padded = int(((counts + block_m - 1) // block_m * block_m).sum())
        shares.append(1 - int(counts.sum()) / padded)
    return statistics.mean(shares)


def bench_moe(args, tune_out: dict | None = None):
    from kernels.triton_moe import fused_moe, moe_config

    h, k, ep = 5120, 8, args.moe_ep
    e = 160 // ep + 1  # routed experts (this rank's under --moe-ep) + the fused shared one
    remote = ep > 1
    quant = args.moe_quant
    tokens = (1, 4, 16, 64, 256, 1024, 4096) if not args.quick else (1, 64, 4096)
    if args.moe_tokens:
        tokens = tuple(int(v) for v in args.moe_tokens.split(","))
    for inter in (int(v) for v in args.moe_inter.split(",")):
        w13 = fp8_weight(e, 2 * inter, h)
        w2 = fp8_weight(e, h, inter)
        s13, s2 = _moe_weight_scales(e, inter, h, quant)
        # the grouped-GEMM baseline takes per-channel scales only: block weights are timed against channel scales
        b13, b2 = (s13, s2) if quant == "fp8_channel" else _moe_weight_scales(e, inter, h, "fp8_channel")
        per_expert = 3 * inter * h + (s13[0].numel() + s2[0].numel()) * 4
        table = {}
        for t in tokens:
            x = torch.randn(t, h, device="cuda", dtype=BF16)
            r = 8 if t <= 64 else 2 if t <= 1024 else 1
            routes = _routings(t, 160 + 1, k, r, ep, balanced=args.moe_routing == "balanced")
            n_active = statistics.mean(int(ids[ids >= 0].unique().numel()) for _, ids in routes)
            pairs = statistics.mean(int((ids >= 0).sum()) for _, ids in routes)
            nbytes = n_active * per_expert + 2 * t * h * 2
            flops = 2 * pairs * 3 * inter * h
            if tune_out is not None:
                cfg = tune_moe(x, w13, w2, s13, s2, routes, t, e, inter, h, quant, remote)
                table[str(t)] = cfg
            else:
                cfg = None
            ours, _ = timeit([lambda w=w, ids=ids: fused_moe(x, w13, w2, w, ids, s13, s2, quant, config=cfg,
                                                             remote_ids=remote)
                              for w, ids in routes])
            base_fns = [_grouped_baseline(x, w13, w2, b13, b2, ids) for _, ids in routes[: min(r, 4)]]
            base = timeit(base_fns)[0] if all(base_fns) else None
            mem = nbytes / ours / HW["bw"]
            comp = flops / ours / DATASHEET["fp8"]
            target, met = "", None
            if remote:
                pass  # an expert-parallel rank: the issue targets are for the TP layouts
            elif inter == 192 and t == 1:
                target, met = ">=50% HBM, >=1.5x grouped", mem >= 0.5 and (base is None or base / ours >= 1.5)
            elif inter == 192 and t == 64:
                target, met = ">=60% HBM, >=1.5x grouped", mem >= 0.6 and (base is None or base / ours >= 1.5)
            elif inter == 192 and t <= 64:
                target, met = ">=1.5x grouped", base is None or base / ours >= 1.5
            elif t >= 4096:
                target, met = ">=50% FP8 peak", comp >= 0.5
            # x quantized by the preceding RMSNorm kernel (rms_norm_fp8)
            if t <= 64 and quant == "fp8_channel" and not remote:
                from kernels.triton_quant import quant_fp8_per_token

                xq, xsc = quant_fp8_per_token(x)
                pre, _ = timeit([lambda w=w, ids=ids: fused_moe(x, w13, w2, w, ids, s13, s2, "fp8_channel", config=cfg,
                                                                x_fp8=xq, x_scale=xsc) for w, ids in routes])
                report("fused_moe_xq", f"T={t} E={e} N={inter} (x pre-quantized)", pre, base,
                       "_scaled_grouped_mm x2", nbytes=nbytes, flops=flops)
            used = cfg or moe_config(t, e, inter, h, quant, x.device)
            name = "fused_moe" if quant == "fp8_channel" else f"fused_moe_{quant}"
            rank = f" EP{ep} rank 0 pairs~{pairs:.0f}" if remote else ""
            rank += " balanced" if args.moe_routing == "balanced" else ""
            report(name, f"T={t} E={e} N={inter} act~{n_active:.0f}{rank}", ours, base, "_scaled_grouped_mm x2",
                   nbytes=nbytes, flops=flops, target=target, met=met,
                   note=f"BM{used['BLOCK_M']} N1={used['BLOCK_N1']} SK{used['SPLIT_K1']} N2={used['BLOCK_N2']}"
                        f"x{used.get('N_LOOP2', 1)} pad {_padding_share(routes, used['BLOCK_M']):.0%}")
        if tune_out is not None:
            name = f"E={e},N={inter},device={torch.cuda.get_device_name(0).replace(' ', '_')},quant={quant}.json"
            tune_out[name] = table
            # each width's table lands as soon as it is tuned: a device call cut short keeps the widths done
            save_tuned_configs(tune_out, args.out)
            if args.write_tables:
                write_moe_tables({name: table}, args.out)
        del w13, w2
        torch.cuda.empty_cache()


def tune_moe(x, w13, w2, s13, s2, routes, t, e, inter, h, quant="fp8_channel", remote_ids=False) -> dict:
    """Sweep gate_up then down parameters (the other held at its default) for t tokens; return the best.
    remote_ids: the routes hold -1 ids (an expert-parallel rank's, --moe-ep)."""
    from kernels.triton_moe import default_config, fused_moe, moe_config

    base = default_config(t, e, inter, h, quant)
    if t <= 64:
        c1 = [dict(BLOCK_M=16, BLOCK_N1=bn, BLOCK_K1=bk, SPLIT_K1=sk, W1=4, S1=4)
              for bn in (32, 64) for bk in (128, 256) for sk in (1, 2, 4)]
        c2 = [dict(BLOCK_N2=bn, BLOCK_K2=bk, W2=4, S2=3, N_LOOP2=nl) for bn in (64, 128) for bk in (64, 128)
              for nl in (1, 4)]
    else:  # FAST_ACC (accumulate inside the MMA) is on at these sizes: it never lost in the H200 probe
        c1 = [dict(BLOCK_M=bm, BLOCK_N1=bn, BLOCK_K1=128, SPLIT_K1=1, W1=w, S1=st, FAST_ACC=True)
              for bm, bn, w, st in ((64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                                    (128, 128, 8, 3), (64, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3))]
        c2 = [dict(BLOCK_N2=bn, BLOCK_K2=128, W2=w, S2=3, N_LOOP2=nl)
              for bn, w, nl in ((128, 4, 1), (128, 8, 1), (256, 8, 1), (128, 8, 4), (256, 8, 2))]
    if t >= 2048 and quant == "fp8_channel":
        # prefill sizes: weight tiles by descriptors (TMA1) and the persistent down GEMM (PERSIST2) next to the
        # one-tile down kernel at its best session-26 tile (H100: 256-wide down tiles won at every width)
        c1 = [dict(BLOCK_M=128, BLOCK_N1=bn, BLOCK_K1=128, SPLIT_K1=1, W1=w, S1=st, FAST_ACC=True, TMA1=True)
              for bn, w, st in ((64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 8, 4))]
        c2 = [dict(BLOCK_N2=bn, BLOCK_K2=128, W2=8, S2=st, N_LOOP2=1, TMA2=True, PERSIST2=pe)
              for bn, st, pe in ((256, 3, True), (128, 4, True), (256, 4, True), (256, 3, False))]
    fns = lambda cfg: [lambda w=w, ids=ids: fused_moe(x, w13, w2, w, ids, s13, s2, quant, config=cfg,  # noqa: E731
                                                      remote_ids=remote_ids) for w, ids in routes]

    def best_of(cands, start):
        best, best_t = None, float("inf")
        for c in cands:
            cfg = dict(start, **c)
            try:
                tt = _graph_time(fns(cfg), reps=5)
            except Exception:  # noqa: BLE001 - e.g. out of shared memory
                torch.cuda.synchronize()
                continue
            if tt < best_t:
                best, best_t = cfg, tt
        return best or start, best_t

    cfg, _ = best_of(c1, base)
    cfg, tt = best_of(c2, cfg)
    # the config in use (this E's table, else the nearest E's, else the heuristic) stays unless the sweep beats it:
    # the sweep starts from the heuristic, and a table merged from another session's candidates can be faster
    # (session 37: E=161's 16K config beat the E=21 sweep's pick by 5.6%)
    current = moe_config(t, e, inter, h, quant, x.device)
    current_t = _graph_time(fns(current), reps=5)
    if current_t <= tt:
        cfg, tt = current, current_t
    print(f"    tuned T={t} N={inter}: {cfg} {tt*1e6:.1f}us ({'kept the config in use' if cfg is current else 'new'}, "
          f"in use {current_t*1e6:.1f}us)", flush=True)
    return cfg


def _paged(b, ctx, hk, d, bs, dtype):
    pages = (ctx + bs - 1) // bs
    nb = b * pages + 1
    kc = torch.randn(nb, bs, hk, d, device="cuda", dtype=BF16)
    vc = torch.randn(nb, bs, hk, d, device="cuda", dtype=BF16)
    if dtype == FP8:
        kc, vc = (kc * 20).to(FP8), (vc * 20).to(FP8)
    bt = torch.randperm(nb, device="cuda")[: b * pages].view(b, pages).to(torch.int32)
    return kc, vc, bt


def bench_attention(args):
    from kernels.triton_attention import paged_attention

    d, bs = 128, 16
    cases = [((96, 8), 8, 4096), ((96, 8), 32, 4096), ((96, 8), 1, 32768), ((12, 1), 64, 4096), ((12, 1), 32, 16384)]
    if args.quick:
        cases = cases[:2] + cases[3:4]
    for (hq, hk), b, ctx in cases:
        for dt in (BF16, FP8):
            kc, vc, bt = _paged(b, ctx, hk, d, bs, dt)
            ks = 0.05 if dt == FP8 else 1.0
            lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
            q = torch.randn(b, hq, d, device="cuda", dtype=BF16)
            ours, _ = timeit([lambda: paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, ks, max_query_len=1,
                                                      max_seq_len=ctx)])
            elem = 1 if dt == FP8 else 2
            nbytes = b * ctx * hk * d * 2 * elem + 2 * b * hq * d * 2
            base = None
            if dt == BF16:
                kd = torch.randn(b, hk, ctx, d, device="cuda", dtype=BF16)
                vd = torch.randn(b, hk, ctx, d, device="cuda", dtype=BF16)
                qd = q.view(b, hq, 1, d)
                base, _ = timeit([lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)])
                del kd, vd
                args._sdpa_cache = base
            else:
                base = getattr(args, "_sdpa_cache", None)
            mem = nbytes / ours / HW["bw"]
            report("attn_decode", f"B={b} ctx={ctx} heads {hq}/{hk} {'fp8' if dt == FP8 else 'bf16'} KV", ours,
                   base, "SDPA bf16 contiguous", nbytes=nbytes, target=">=70% HBM", met=mem >= 0.7)
            del kc, vc
            torch.cuda.empty_cache()


def _varlen_fa2_time(q, kd, vd, qlen, prefix) -> float | None:
    """torch.nn.attention.varlen.varlen_attn (PyTorch's bundled FlashAttention-2) on contiguous K/V, causal."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    k = kd[0].transpose(0, 1).contiguous()  # [T, Hk, D]
    v = vd[0].transpose(0, 1).contiguous()
    cu = torch.tensor([0, qlen], dtype=torch.int32, device="cuda")
    d = q.shape[-1]
    try:
        return timeit([lambda: varlen_attn(q, k, v, cu, cu, qlen, qlen, scale=d ** -0.5, window_size=(-1, 0))])[0]
    except Exception as exc:  # noqa: BLE001
        print(f"    varlen_attn unavailable: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        return None


def _prefill_baseline(q, kd, vd, prefix: int) -> tuple[float | None, str]:
    """cuDNN SDPA on contiguous K/V [kv, Hk, D] (no gather): one is_causal call without a prefix (cuDNN only, so
    a fallback to another backend shows up as a failure, not as a silently different baseline); with one, the
    same prefix + causal-square + LSE-merge calls the SDPA path makes (there is no single bottom-right cuDNN
    call in torch)."""
    d = q.shape[-1]
    if prefix == 0:
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, kd, vd))

        def run():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=d ** -0.5, enable_gqa=True)

        name = "cuDNN SDPA contiguous"
    else:
        out = torch.empty_like(q)

        def run():
            prefill_attention_sdpa(q, kd, vd, d ** -0.5, "merge", out)

        name = "cuDNN merge contiguous"
    try:
        return timeit([run])[0], name
    except Exception as exc:  # noqa: BLE001 - report and go on
        torch.cuda.synchronize()
        print(f"    {name} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return None, name


def bench_prefill(args):
    """Causal prefill of one sequence (q new tokens after `prefix` cached ones) from the paged cache: ours (Triton
    extend kernel) and the SDPA path (kernels/sdpa_prefill.py: gather + dequantize + cuDNN SDPA; prefix modes
    merge and pad), each against cuDNN SDPA on contiguous bf16 K/V, and as % of the bf16 peak. FLOPs: causal
    QK^T + PV over the visible keys, 4 * H * D * (q * prefix + q^2 / 2)."""
    from kernels.triton_attention import paged_attention

    d, bs = 128, 16
    qlens = (4096,) if args.quick else (4096, 16384, 32768)
    heads = ((96, 8),) if args.quick else ((96, 8), (12, 1))
    for qlen in qlens:
        for prefix in (0, 4096):
            for hq, hk in heads:
                ctx = qlen + prefix
                q = torch.randn(qlen, hq, d, device="cuda", dtype=BF16)
                kd = torch.randn(ctx, hk, d, device="cuda", dtype=BF16)
                vd = torch.randn(ctx, hk, d, device="cuda", dtype=BF16)
                base, base_name = _prefill_baseline(q, kd, vd, prefix)
                flops = 4 * hq * d * (qlen * prefix + qlen * qlen / 2)
                shape0 = f"q={qlen} prefix={prefix} heads {hq}/{hk} bf16 KV"
                if base is not None:
                    report("prefill_cudnn", shape0, base, None, "-", flops=flops, peak="bf16", note=base_name)
                fa2 = _varlen_fa2_time(q, kd.transpose(0, 1).unsqueeze(0), vd.transpose(0, 1).unsqueeze(0), qlen,
                                       prefix) if prefix == 0 else None
                if fa2 is not None:
                    report("prefill_fa2", shape0, fa2, base, base_name, flops=flops, peak="bf16",
                           note="torch varlen_attn (FA2), contiguous")
                for dt in (BF16, FP8):
                    kc, vc, bt = _paged(1, ctx, hk, d, bs, dt)
                    ks = 0.05 if dt == FP8 else 1.0
                    lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
                    qsl = torch.tensor([0, qlen], dtype=torch.int32, device="cuda")
                    shape = f"q={qlen} prefix={prefix} heads {hq}/{hk} {'fp8' if dt == FP8 else 'bf16'} KV"
                    ours, _ = timeit([lambda: paged_attention(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, ks,
                                                              max_query_len=qlen, max_seq_len=ctx)])
                    report("prefill_triton", shape, ours, base, base_name, flops=flops, peak="bf16")
                    for mode in ("merge", "pad") if prefix else ("merge",):
                        def sdpa_path(mode=mode):
                            paged_attention_prefill_sdpa(q, kc, vc, bt, lens, qsl, d ** -0.5, ks, ks,
                                                         rest=paged_attention, query_start_host=[0, qlen],
                                                         seq_lens_host=[ctx], prefix_mode=mode, min_prefill_tokens=1)
                        try:
                            t, _ = timeit([sdpa_path])
                        except Exception as exc:  # noqa: BLE001 - report and go on
                            torch.cuda.synchronize()
                            print(f"    sdpa {mode} {shape} failed: {type(exc).__name__}: {str(exc)[:120]}",
                                  flush=True)
                            continue
                        report("prefill_sdpa" if mode == "merge" else "prefill_sdpa_pad", shape, t, base, base_name, flops=flops, peak="bf16",
                               note=f"{ours / t:.2f}x vs triton")
                    del kc, vc
                    torch.cuda.empty_cache()
                del q, kd, vd
                torch.cuda.empty_cache()


SECTIONS = {
    "moe": bench_moe, "attn": bench_attention, "linear": bench_linear, "rope": bench_rope,
    "quant": bench_elementwise, "norm": None, "route": bench_route, "block": bench_block_linear,
    "prefill": bench_prefill,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--tune", action="store_true", help="tune fused-MoE configs and the FP8-linear crossover")
    p.add_argument("--moe-quant", default="fp8_channel", choices=("fp8_channel", "fp8_block"),
                   help="the MoE section's weights: FP8 per output channel (GLM-4.7-FP8) or per 128 x 128 block")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for kernels.json (+ tuned configs)")
    p.add_argument("--moe-tokens", default="", help="the MoE section's token counts (comma list; default: 1..4096)")
    p.add_argument("--moe-inter", default="192,384,1536", help="the MoE section's expert widths (comma list)")
    p.add_argument("--moe-routing", default="random", choices=("random", "balanced"),
                   help="the MoE section's routings: random top-8 (uneven expert counts, as real routers give) or "
                        "balanced (every expert t*8/160 pairs: the kernels without padding rows at t = 5120)")
    p.add_argument("--moe-ep", type=int, default=1,
                   help="the MoE section as rank 0 of this many expert-parallel ranks (160/N experts whole + the "
                        "shared one; its tables are E=160/N+1's)")
    p.add_argument("--write-tables", action="store_true",
                   help="with --tune: merge the tuned MoE buckets into kernels/configs/fused_moe (and --out)")
    args = p.parse_args(argv)
    args.only = set(args.only.split(","))
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU")
        return 0
    import triton

    HW.update(measure_hw())
    print(f"# {HW['device']} ({HW['sms']} SMs), torch {torch.__version__}, triton {triton.__version__}")
    print(f"# HBM copy bandwidth {HW['bw']/1e12:.2f} TB/s; cuBLAS 8192^3: bf16 {HW['bf16_cublas']/1e12:.0f}, "
          f"fp8 {HW['fp8_cublas']/1e12:.0f} TFLOP/s; roofline % use datasheet dense peaks bf16 989 / fp8 1979")
    tune_out: dict | None = {} if args.tune else None
    t0 = time.time()
    for name, fn in SECTIONS.items():
        if fn is None or not (args.only & ({name} | ({"norm"} if name == "quant" else set()))):
            continue
        print(f"## {name} (t={time.time() - t0:.0f}s)", flush=True)
        try:
            if name in ("linear", "moe"):
                fn(args, tune_out)
            else:
                fn(args)
        except Exception as exc:  # noqa: BLE001 - keep going, report
            import traceback

            traceback.print_exc()
            print(f"   section {name} failed: {type(exc).__name__}: {exc}", flush=True)
        torch.cuda.empty_cache()
    print(f"# total {time.time() - t0:.0f}s")
    print("\n## summary: targets")
    for r in ROWS:
        if r["met"] is not None:
            print(_fmt(r))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump({"hw": HW, "rows": ROWS}, f, indent=1)
        if tune_out:
            save_tuned_configs(tune_out, args.out)
    return 0


def save_tuned_configs(tune_out: dict, out: str) -> None:
    """The tuned tables so far as out/tuned_configs.json (nothing without --out)."""
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "tuned_configs.json"), "w") as f:
            json.dump(tune_out, f, indent=1)


def write_moe_tables(tune_out: dict, out: str) -> None:
    """Merge the tuned fused-MoE buckets into kernels/configs/fused_moe (the buckets not tuned in this run stay as
    they were) and copy each merged table into `out`."""
    from kernels.triton_moe import CONFIG_DIR

    for name, table in tune_out.items():
        if not name.startswith("E="):
            continue
        path = os.path.join(CONFIG_DIR, name)
        merged = {}
        if os.path.exists(path):
            with open(path) as f:
                merged = json.load(f)
        merged.update(table)
        merged["_doc"] = (merged.get("_doc", "fused MoE launch configs by token-count bucket") +
                          f"; buckets {', '.join(sorted(table, key=int))} retuned by bench.kernels --write-tables")
        order = sorted(merged, key=lambda k: (not k.startswith("_"), int(k) if k.isdigit() else 0))
        text = json.dumps({k: merged[k] for k in order}, indent=1) + "\n"
        for target in [path] + ([os.path.join(out, name)] if out else []):
            with open(target, "w") as f:
                f.write(text)
        print(f"# wrote {path} (buckets {', '.join(sorted(table, key=int))})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
