import inspect, time, torch, traceback
import torch.nn.attention as a, pkgutil
print(torch.__version__, [m.name for m in pkgutil.iter_modules(a.__path__)])
try:
    from torch.nn.attention import varlen
    print(inspect.signature(varlen.varlen_attn))
except Exception as e:
    print("no varlen", e)
    raise SystemExit
from kernels.triton_attention import paged_attention
from bench.kernels import _graph_time
BF16 = torch.bfloat16
for hq, hk, T in ((96, 8, 4096), (12, 1, 8192)):
    d = 128
    q = torch.randn(T, hq, d, device="cuda", dtype=BF16)
    k = torch.randn(T, hk, d, device="cuda", dtype=BF16)
    v = torch.randn(T, hk, d, device="cuda", dtype=BF16)
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    flops = 4 * hq * d * T * T / 2
    for kw in (dict(window_size=(-1, 0), enable_gqa=True), dict(is_causal=True, enable_gqa=True)):
        try:
            o = varlen.varlen_attn(q, k, v, cu, cu, T, T, scale=d ** -0.5, **kw)
            t = _graph_time([lambda: varlen.varlen_attn(q, k, v, cu, cu, T, T, scale=d ** -0.5, **kw)], reps=5)
            print(f"varlen contiguous {hq}/{hk} T={T} {kw}: {t*1e6:.0f}us {flops/t/1e12:.0f} TFLOP/s", flush=True)
            # correctness vs our paged kernel
            bs = 16
            nb = T // bs
            kc = k.view(nb, bs, hk, d).contiguous(); vc = v.view(nb, bs, hk, d).contiguous()
            bt = torch.arange(nb, dtype=torch.int32, device="cuda")[None]
            lens = torch.tensor([T], dtype=torch.int32, device="cuda")
            ours = paged_attention(q, kc, vc, bt, lens, cu, d ** -0.5, max_query_len=T, max_seq_len=T)
            print("   max |varlen - ours|", (o.float() - ours.float()).abs().max().item(), flush=True)
            for ps in (16, 64, 256):
                try:
                    kcp = k.view(T // ps, ps, hk, d); vcp = v.view(T // ps, ps, hk, d)
                    btp = torch.arange(T // ps, dtype=torch.int32, device="cuda")[None]
                    o2 = varlen.varlen_attn(q, kcp, vcp, cu, None, T, T, scale=d ** -0.5, seqused_k=lens, block_table=btp, **kw)
                    t2 = _graph_time([lambda: varlen.varlen_attn(q, kcp, vcp, cu, None, T, T, scale=d ** -0.5, seqused_k=lens, block_table=btp, **kw)], reps=5)
                    print(f"   paged page={ps}: {t2*1e6:.0f}us, max diff {(o2.float()-o.float()).abs().max().item():.3g}", flush=True)
                except Exception as e:
                    print(f"   paged page={ps}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            break
        except Exception as e:
            print(f"varlen {kw}: {type(e).__name__}: {str(e)[:300]}", flush=True)
