"""Per-kernel breakdown of one fused-MoE call (torch.profiler), to see where prefill-sized MoE time goes.

    python -m bench.moe_stages [--tokens 1,64,4096] [--inter 192,1536] [--variants]
    python -m bench.moe_stages --align [--tokens 64,256,512,1024]

Prints, per (tokens, N): every CUDA kernel launched by `kernels.triton_moe.fused_moe` with its mean time,
the sum, and `torch._scaled_grouped_mm` (the two grouped GEMMs over the same routing) for scale.
--variants [tiles|tma] also times alternative launch configs (config overrides: VARIANTS[name]) kernel by
kernel; "tma" tries the weight / act tiles by tensor descriptors (TMA1: gate_up's weights, TMA2: down's act and
weights) with the table's tiles and larger ones; "persist" the persistent down GEMM (PERSIST2) at several tiles.
--routing balanced gives every expert the same pair count (bench.kernels --moe-routing).
Variants are timed eagerly (prefill runs eagerly) and by CUDA-graph replay. The `_scaled_grouped_mm` baseline is
timed both ways too: kernel times (profiler) and CUDA-graph replay; they disagree by 2.5x (session 18,
bench/RESULTS.md): judge by the replay.
--align times only the token sort/align step (kernels/triton_moe_align.py) per token count, with the one-program
path's limit `small_max` at several values: which pair counts the one-program kernel should still take.
"""
from __future__ import annotations

import argparse
import functools

import torch

from bench.kernel_profile import kernel_breakdown
from bench.kernels import (
    BF16, DATASHEET, _eager_time, _graph_time, _grouped_baseline, _padding_share, _routings, fp8_weight,
)

FP8_PEAK = DATASHEET["fp8"]  # dense datasheet FLOP/s, as bench.kernels' "% FP8 peak"

TILE_VARIANTS = [
    {},
    {"FAST_ACC": True},
    {"BLOCK_M": 128, "BLOCK_N1": 128, "W1": 8, "S1": 3, "FAST_ACC": True},
    {"BLOCK_M": 128, "BLOCK_N1": 64, "W1": 8, "S1": 4, "FAST_ACC": True},
    {"BLOCK_M": 64, "BLOCK_N1": 128, "W1": 4, "S1": 4, "FAST_ACC": True},
    {"BLOCK_M": 128, "BLOCK_N2": 128, "W2": 8, "S2": 4, "N_LOOP2": 1, "FAST_ACC": True},
    {"BLOCK_M": 128, "BLOCK_N2": 256, "W2": 8, "S2": 3, "N_LOOP2": 1, "FAST_ACC": True},
]
_BOTH = {"TMA1": True, "TMA2": True}
TMA_VARIANTS = [
    {},
    {"TMA1": True},
    {"TMA2": True},
    _BOTH,
    {**_BOTH, "S1": 4, "S2": 4},
    {**_BOTH, "BLOCK_M": 128, "BLOCK_N1": 128, "W1": 8, "S1": 3},
    {**_BOTH, "BLOCK_M": 128, "BLOCK_N1": 128, "W1": 8, "S1": 4},
    {**_BOTH, "BLOCK_M": 128, "BLOCK_N2": 128, "W2": 8, "S2": 4, "N_LOOP2": 1},
    {**_BOTH, "BLOCK_M": 128, "BLOCK_N2": 256, "W2": 8, "S2": 3, "N_LOOP2": 1},
    {**_BOTH, "BLOCK_M": 128, "BLOCK_N2": 256, "W2": 8, "S2": 4, "N_LOOP2": 1},
    {**_BOTH, "BLOCK_M": 64, "BLOCK_N1": 128, "W1": 4, "S1": 4, "BLOCK_N2": 256, "W2": 8, "S2": 4},
]
# the down GEMM as one program per SM walking its tiles (PERSIST2, kernels/triton_moe_persistent.py) against the
# one-tile programs on the same descriptors and tiles
_PERSIST = {**_BOTH, "PERSIST2": True}
PERSIST_VARIANTS = [
    {},
    _BOTH,
    _PERSIST,
    {**_PERSIST, "S2": 4},
    {**_PERSIST, "W2": 4},
    {**_PERSIST, "BLOCK_N2": 256, "S2": 3, "W2": 8},
    {**_PERSIST, "BLOCK_K2": 64, "S2": 4},
    {**_BOTH, "BLOCK_N2": 256, "S2": 3, "W2": 8, "N_LOOP2": 1},
]
VARIANTS = {"tiles": TILE_VARIANTS, "tma": TMA_VARIANTS, "persist": PERSIST_VARIANTS}


def breakdown(fn, reps: int = 5) -> dict[str, float]:
    """{kernel name: µs per call} (bench.kernel_profile)."""
    return {r["name"]: r["us_per_call"] for r in kernel_breakdown(fn, reps)}


def align_sweep(tokens: list[int], inter: int, small_maxes=(512, 1024, 2048, 4096)) -> None:
    """moe_align alone (top-8 + the fused shared expert, 161 slots), CUDA graph, for each small_max."""
    from kernels.triton_moe import moe_config
    from kernels.triton_moe_align import moe_align

    h, k, e = 5120, 8, 161
    for t in tokens:
        (_, ids), = _routings(t, e, k, 1)
        block_m = moe_config(t, e, inter, h, "fp8_channel", ids.device)["BLOCK_M"]
        cells = []
        for sm in small_maxes:
            us = _graph_time([lambda sm=sm, ids=ids, bm=block_m: moe_align(ids, e, bm, small_max=sm)]) * 1e6
            cells.append(f"small_max={sm}: {us:6.1f} us")
        print(f"align T={t:5d} ({ids.numel()} pairs, BLOCK_M={block_m}): " + "  ".join(cells), flush=True)


def main(argv=None) -> int:
    from kernels.triton_moe import fused_moe, moe_config

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="64,1024,4096,16384")
    p.add_argument("--inter", default="192,1536")
    p.add_argument("--variants", nargs="?", const="tiles", default=None, choices=sorted(VARIANTS))
    p.add_argument("--align", action="store_true", help="only the align step, at several one-program limits")
    p.add_argument("--routing", default="random", choices=("random", "balanced"),
                   help="random top-8, or every expert the same pair count (bench.kernels --moe-routing)")
    a = p.parse_args(argv)
    if a.align:
        print(torch.cuda.get_device_name(0), flush=True)
        for inter in [int(v) for v in a.inter.split(",")]:
            align_sweep([int(v) for v in a.tokens.split(",")], inter)
        return 0
    h, k, e = 5120, 8, 161
    print(torch.cuda.get_device_name(0), flush=True)
    for inter in [int(v) for v in a.inter.split(",")]:
        w13 = fp8_weight(e, 2 * inter, h)
        w2 = fp8_weight(e, h, inter)
        s13 = torch.rand(e, 2 * inter, 1, device="cuda") * 1e-3
        s2 = torch.rand(e, h, 1, device="cuda") * 1e-3
        for t in [int(v) for v in a.tokens.split(",")]:
            x = torch.randn(t, h, device="cuda", dtype=BF16)
            (w, ids), = _routings(t, e, k, 1, balanced=a.routing == "balanced")
            flops = 2 * t * (k + 1) * 3 * inter * h
            cfg = moe_config(t, e, inter, h, "fp8_channel", x.device)
            pad = {bm: f"{_padding_share([(w, ids)], bm):.1%}" for bm in (64, 128)}
            print(f"\n== T={t} N={inter} {a.routing} routing, padding rows at BLOCK_M 64 / 128: {pad[64]} / "
                  f"{pad[128]}; cfg={cfg}", flush=True)
            parts = breakdown(lambda: fused_moe(x, w13, w2, w, ids, s13, s2, "fp8_channel"))
            for name, us in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"   {us:9.1f} us  {name}")
            total = sum(parts.values())
            print(f"   {total:9.1f} us  total kernels ({flops / total / 1e6:.0f} TFLOP/s)")
            base = _grouped_baseline(x, w13, w2, s13, s2, ids)
            if base is not None:
                bparts = breakdown(base)
                bt = sum(bparts.values())
                bg = _graph_time([base], reps=5) * 1e6
                print(f"   {bt:9.1f} us  _scaled_grouped_mm x2 ({flops / bt / 1e6:.0f} TFLOP/s); graph replay "
                      f"{bg:.1f} us", flush=True)
            if a.variants and t >= 256:
                for v in VARIANTS[a.variants]:
                    c = dict(cfg, **v)
                    run = functools.partial(fused_moe, x, w13, w2, w, ids, s13, s2, "fp8_channel", config=c)
                    try:
                        te = _eager_time([run])  # first: it compiles and needs no graph capture
                        vp = breakdown(run)
                        try:
                            tt = _graph_time([run], reps=5)
                            graph = (f"{tt * 1e6:9.1f} us ({flops / tt / 1e12:.0f} TFLOP/s, "
                                     f"{100 * flops / tt / FP8_PEAK:.0f}% FP8 peak)")
                        except Exception as exc:  # noqa: BLE001 - a library launch that cannot be captured
                            torch.cuda.synchronize()
                            graph = f"graph capture failed ({type(exc).__name__}: {str(exc)[:80]})"
                        gemms = "  ".join(f"{n.split('_kernel')[0].lstrip('_')[:48]} {us:.1f}" for n, us in vp.items()
                                          if "gate_up" in n or "down" in n or "gemm" in n.lower())
                        print(f"   variant {v}: {graph}, eager {te * 1e6:.1f} us "
                              f"({100 * flops / te / FP8_PEAK:.0f}%) | {gemms}", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        torch.cuda.synchronize()
                        print(f"   variant {v}: failed {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
