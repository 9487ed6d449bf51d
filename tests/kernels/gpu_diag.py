"""GPU diagnostics for the kernels (run by bench/kernels_gpu.sh with --diag): numerics of the fused
QK-norm+RoPE against the torch reference on GPU and on CPU, per-kernel time breakdown of the fused MoE
(torch profiler), and small launch-config sweeps for attention. Prints plain text."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


def _mm(a, b):
    return (a.float() != b.float()).float().mean().item()


def diag_rope():
    from kernels.rope import qk_norm_rope_ref, rope_cos_sin_cache
    from kernels.triton_rope import qk_norm_rope

    print("== rope numerics (fraction of differing bf16 elements; max abs diff)")
    for npos, norm in ((4096, True), (131072, True), (131072, False)):
        t, hq, hk, d, rot = 64, 96, 8, 128, 64
        qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=BF16) * 2
        q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
        q, k = q.reshape(t, hq, d), k.reshape(t, hk, d)
        cs = rope_cos_sin_cache(rot, npos, 1e6, "cuda")
        pos = torch.randint(0, npos, (t,), device="cuda")
        w = (torch.rand(d, device="cuda", dtype=BF16) + 0.5) if norm else None
        qo, ko = qk_norm_rope(q, k, w, w, cs, pos, 1e-5)
        qg, kg = qk_norm_rope_ref(q, k, w, w, cs, pos, 1e-5)
        qc, kc = qk_norm_rope_ref(q.cpu(), k.cpu(), None if w is None else w.cpu(), None if w is None else w.cpu(),
                                  cs.cpu(), pos.cpu(), 1e-5)
        for name, o, g, c in (("q", qo, qg, qc), ("k", ko, kg, kc)):
            regions = {r: _mm(o[..., sl], g[..., sl]) for r, sl in
                       (("rot-lo", slice(0, 32)), ("rot-hi", slice(32, 64)), ("pass", slice(64, 128)))}
            print(f"  npos={npos} norm={norm} {name}: ours-vs-gpu-ref {_mm(o, g):.4f} {regions} "
                  f"max|d| {(o.float() - g.float()).abs().max().item():.4g}; gpu-ref-vs-cpu-ref {_mm(g.cpu(), c):.4f}; "
                  f"ours-vs-cpu-ref {_mm(o.cpu(), c):.4f}")
        if norm:
            from kernels.norm import rms_norm_ref
            from kernels.triton_norm import rms_norm

            n_ours = rms_norm(q, w, 1e-5)
            n_ref = rms_norm_ref(q, w, 1e-5)
            print(f"  per-head rms_norm only: ours-vs-gpu-ref {_mm(n_ours, n_ref):.4f} "
                  f"gpu-vs-cpu-ref {_mm(n_ref.cpu(), rms_norm_ref(q.cpu(), w.cpu(), 1e-5)):.4f}")


def diag_moe_profile():
    from torch.profiler import ProfilerActivity, profile

    from kernels.triton_moe import fused_moe

    print("== fused MoE kernel breakdown (torch profiler, us per call)")
    h, e, k = 5120, 161, 8
    for inter, t in ((192, 1), (192, 64), (192, 4096), (1536, 4096)):
        w13 = (torch.randn(e, 2 * inter, h, device="cuda") * 20).to(FP8)
        w2 = (torch.randn(e, h, inter, device="cuda") * 20).to(FP8)
        s13 = torch.rand(e, 2 * inter, 1, device="cuda") * 1e-3
        s2 = torch.rand(e, h, 1, device="cuda") * 1e-3
        x = torch.randn(t, h, device="cuda", dtype=BF16)
        ids = torch.rand(t, e - 1, device="cuda").topk(k, 1).indices
        ids = torch.cat([ids, torch.full((t, 1), e - 1, device="cuda")], 1).to(torch.int32)
        tw = torch.rand(t, k + 1, device="cuda")
        for _ in range(3):
            fused_moe(x, w13, w2, tw, ids, s13, s2, "fp8_channel")
        torch.cuda.synchronize()
        n = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fused_moe(x, w13, w2, tw, ids, s13, s2, "fp8_channel")
            torch.cuda.synchronize()
        parts = []
        for ev in prof.key_averages():
            dt = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if dt:
                parts.append(f"{ev.key[:28]}={dt / n:.1f}")
        print(f"  N={inter} T={t}: " + ", ".join(parts))
        del w13, w2
        torch.cuda.empty_cache()


def _time(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps * 1e3


def diag_attention_sweep():
    from kernels.triton_attention import paged_attention

    print("== attention config sweeps (us)")
    d, bs = 128, 16
    for dt in (BF16, FP8):
        b, ctx, hq, hk = 32, 4096, 96, 8
        pages = ctx // bs
        kc = torch.randn(b * pages + 1, bs, hk, d, device="cuda").to(dt)
        vc = torch.randn_like(kc, dtype=torch.float32).to(dt)
        bt = torch.randperm(b * pages + 1, device="cuda")[: b * pages].view(b, pages).to(torch.int32)
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        q = torch.randn(b, hq, d, device="cuda", dtype=BF16)
        nbytes = b * ctx * hk * d * 2 * (1 if dt == FP8 else 2)
        res = []
        for bn in (64, 128):
            for w in (4, 8):
                for st in (2, 3):
                    try:
                        us = _time(lambda: paged_attention(q, kc, vc, bt, lens, qsl, 0.088, max_query_len=1,
                                                           max_seq_len=ctx, block_n=bn, num_warps=w, num_stages=st))
                        res.append(f"bn{bn}/w{w}/s{st}={us:.0f}({nbytes / us / 1e6:.2f}TB/s)")
                    except Exception as exc:  # noqa: BLE001
                        res.append(f"bn{bn}/w{w}/s{st}=ERR {type(exc).__name__}")
        print(f"  decode B={b} ctx={ctx} {dt}: " + " ".join(res))
        del kc, vc
    for hq, hk, qlen in ((96, 8, 4096), (12, 1, 8192)):
        pages = qlen // bs
        kc = torch.randn(pages + 1, bs, hk, d, device="cuda", dtype=BF16)
        vc = torch.randn_like(kc)
        bt = torch.arange(pages, device="cuda", dtype=torch.int32).view(1, pages)
        lens = torch.tensor([qlen], dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, qlen], dtype=torch.int32, device="cuda")
        q = torch.randn(qlen, hq, d, device="cuda", dtype=BF16)
        flops = 4 * hq * d * qlen * qlen / 2
        res = []
        for bm, bn, w, st in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2),
                              (128, 32, 4, 3)):
            try:
                us = _time(lambda: paged_attention(q, kc, vc, bt, lens, qsl, 0.088, max_query_len=qlen,
                                                   block_m=bm, block_n=bn, num_warps=w, num_stages=st), reps=5)
                res.append(f"{bm}x{bn}/w{w}/s{st}={us:.0f}({flops / us / 1e6:.0f}TF)")
            except Exception as exc:  # noqa: BLE001
                res.append(f"{bm}x{bn}/w{w}/s{st}=ERR {type(exc).__name__}")
        print(f"  prefill q={qlen} heads {hq}/{hk}: " + " ".join(res))


if __name__ == "__main__":
    for fn in (diag_rope, diag_moe_profile, diag_attention_sweep):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            print(f"{fn.__name__} failed: {exc}")
        sys.stdout.flush()
