"""Prefill attention through FlashAttention-4's CuTe-DSL kernels (`flash_attn.cute`, which has a Hopper forward)
against cuDNN (the SDPA path's kernel) and our Triton extend kernel, one causal sequence, head_dim 128, bf16:

    python -m bench.fa4_prefill [--heads 96/8,12/1] [--cases 4096:0,16384:0,32768:0,4096:4096,16384:4096] [--knobs]

Per case: cuDNN through kernels.sdpa_prefill.prefill_attention_sdpa on contiguous K/V (with a prefix: its merge of
a prefix block and a causal block), FA4 on the same contiguous K/V (its causal mask is bottom-right aligned, so a
prefix needs no merge), FA4 reading the paged cache through a page table (16-token pages: its non-TMA paged path),
and our Triton extend kernel on the paged cache; "fa4_paged128": FA4 on 128-token pages (`--kv-block-size 128`:
its TMA paged loads, page = KV tile); "fa4_gathered": what the engine runs where it gathers (kernels/packed_kv.py:
the 16-token pages copied into packed K/V, then FA4 with cu_seqlens_k; the gather is timed, the index is not: the
engine builds it once per forward for every layer); "fa4_gathered_fp8" / "sdpa_fp8": the same over FP8 pages
(x 1/8 scales), against the SDPA path the engine takes for FP8 pages it does not gather; "fa4_varlen" (no prefix):
FA4 with cu_seqlens over the step's own contiguous K/V, no pages, no gather; "fa4_gathered_batch": the gather, then
FA4's batch entry point (one sequence, no cu_seqlens) — with "fa4" and "fa4_varlen" it splits the gathered path's
cost into the copy and the varlen entry point; "*_triton": the gather by kernels/triton_packed_kv.py (one launch
for K and V) instead of index_select; "fa4_fresh_fp8" (no prefix): a prompt alone over an FP8 cache as the engine
runs it since session 28 (the values the cache holds, widened by the prologue before the timed call). --knobs
adds FA4's sm90 launch choices through its internal `_flash_attn_fwd` (tile_mn, pack_gqa, intra-warpgroup overlap,
P@V from registers) on the 16-token paged cache ("fa4_paged[knob]") and, without a prefix, on the contiguous K/V
of the batch entry point the engine's prompt-alone route takes ("fa4[knob]"). "[no_pack_gqa]" columns: the
engine's gathered and FP8 prompt routes with FA4's GQA packing off (it packs whenever GQA). --only NAME,... runs
just those variants. Times are CUDA-event medians of 10
calls after warm-up (FA4 compiles on its first call; --queued: 10 calls back to back, the host's launch cost
hidden; --rounds R: R such times per variant, the variants interleaved, median and range printed; --graph: 10 calls
captured in a CUDA graph, the replay timed: kernel time without the host); % = FLOPs / time / 989 TFLOP/s (bf16
dense datasheet). "err" = the largest difference from the cuDNN output over its largest value. flash-attn-4 is
optional: the script says so when it is missing.
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from kernels.packed_kv import gather_packed, pack_index
from kernels.triton_packed_kv import gather_packed_kv
from kernels.sdpa_prefill import paged_attention_prefill_sdpa, prefill_attention_sdpa
from kernels.triton_attention import paged_attention

try:
    from flash_attn.cute.interface import _flash_attn_fwd, flash_attn_func, flash_attn_varlen_func
except ImportError as exc:  # pragma: no cover - optional library
    _flash_attn_fwd = flash_attn_func = flash_attn_varlen_func = None
    FA4_ERROR = f"{type(exc).__name__}: {exc}"
else:
    FA4_ERROR = ""

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
PEAK = 989e12
D, BS = 128, 16
# FA4's sm90 launch choices for --knobs (its default at head_dim 128: 128 x 128 tiles, overlap, P@V from registers)
KNOBS = {
    "tile=128x176": dict(tile_mn=(128, 176)),
    "tile=128x160": dict(tile_mn=(128, 160)),
    "tile=128x96": dict(tile_mn=(128, 96)),
    "tile=192x128": dict(tile_mn=(192, 128)),
    "no_pack_gqa": dict(pack_gqa=False),
    "no_overlap": dict(intra_wg_overlap=False),
    "pv_from_smem": dict(mma_pv_is_rs=False),
}


def _time_ms(fn: Callable[[], object], reps: int = 10, queued: bool = False, graph: bool = False) -> float:
    """Median of `reps` single calls between CUDA events (host launch cost included), or with `queued` the mean
    of `reps` calls enqueued back to back between two events (the GPU's time when the host runs ahead, as in an
    eager prefill whose kernels take milliseconds), or with `graph` the mean of `reps` calls captured in one CUDA
    graph and replayed (the kernels' time without any host cost: a ~0.1 ms call is host-bound even queued)."""
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on the capture stream
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(reps):
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        g.replay()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / reps
    if queued:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / reps
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def paged(src_k: torch.Tensor, src_v: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, page table [1, pages]) holding src in pages of `page` tokens, out of order as in serving."""
    kv, hk = src_k.shape[:2]
    pages = -(-kv // page)
    perm = torch.randperm(pages, device="cuda", dtype=torch.int32)
    caches = []
    for src in (src_k, src_v):
        padded = torch.zeros(pages * page, hk, D, device="cuda", dtype=BF16)
        padded[:kv] = src
        cache = torch.zeros(pages, page, hk, D, device="cuda", dtype=BF16)
        cache[perm.long()] = padded.view(pages, page, hk, D)
        caches.append(cache)
    return caches[0], caches[1], perm.view(1, -1)


def case(n: int, prefix: int, hq: int, hk: int, knobs: bool = False, queued: bool = False,
         rounds: int = 1, graph: bool = False, only: frozenset[str] = frozenset()) -> dict[str, object]:
    kv = n + prefix
    scale = D ** -0.5
    q = torch.randn(n, hq, D, device="cuda", dtype=BF16)
    k = torch.randn(kv, hk, D, device="cuda", dtype=BF16)
    v = torch.randn(kv, hk, D, device="cuda", dtype=BF16)
    k_cache, v_cache, table = paged(k, v, BS)
    lens = torch.tensor([kv], device="cuda", dtype=torch.int32)
    qsl = torch.tensor([0, n], device="cuda", dtype=torch.int32)

    out: dict[str, object] = {}
    ref = prefill_attention_sdpa(q, k, v, scale)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "cudnn": lambda: prefill_attention_sdpa(q, k, v, scale),
        "triton": lambda: paged_attention(q, k_cache, v_cache, table, lens, qsl, scale, max_query_len=n,
                                          max_seq_len=kv),
    }
    if flash_attn_func is not None:
        runs["fa4"] = lambda: _first(flash_attn_func(q[None], k[None], v[None], softmax_scale=scale, causal=True))[0]
        cu_q = torch.tensor([0, n], device="cuda", dtype=torch.int32)
        runs["fa4_paged"] = lambda: _first(flash_attn_varlen_func(
            q, k_cache, v_cache, cu_seqlens_q=cu_q, seqused_k=lens, max_seqlen_q=n, page_table=table,
            softmax_scale=scale, causal=True))
        k128, v128, table128 = paged(k, v, 128)
        runs["fa4_paged128"] = lambda: _first(flash_attn_varlen_func(
            q, k128, v128, cu_seqlens_q=cu_q, seqused_k=lens, max_seqlen_q=n, page_table=table128,
            softmax_scale=scale, causal=True))
        packed = pack_index(table, [kv], BS)

        def index_select(kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gather_packed(kc, packed, BF16), gather_packed(vc, packed, BF16)

        def one_launch(kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gather_packed_kv(kc, vc, packed.slots, BF16)

        def gathered(kc: torch.Tensor, vc: torch.Tensor, ks: float = 1.0, vs: float = 1.0,
                     gather: Callable = index_select, **kw: object) -> torch.Tensor:
            o = _first(flash_attn_varlen_func(
                q, *gather(kc, vc), cu_seqlens_q=cu_q, cu_seqlens_k=packed.cu_seqlens, max_seqlen_q=n,
                max_seqlen_k=kv, softmax_scale=scale * ks, causal=True, **kw))
            return o.mul_(vs) if vs != 1.0 else o

        if prefix == 0:  # a prompt alone: its own K/V, varlen (what a step without cached keys can attend)
            runs["fa4_varlen"] = lambda: _first(flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, max_seqlen_q=n, max_seqlen_k=n, softmax_scale=scale,
                causal=True))
        runs["fa4_gathered"] = lambda: gathered(k_cache, v_cache)
        runs["fa4_gathered_triton"] = lambda: gathered(k_cache, v_cache, gather=one_launch)
        runs["fa4_gathered_batch"] = lambda: _first(flash_attn_func(  # one sequence: batch mode, no cu_seqlens
            q[None], gather_packed(k_cache, packed, BF16)[None], gather_packed(v_cache, packed, BF16)[None],
            softmax_scale=scale, causal=True))[0]
        k8, v8 = (k_cache * 8).to(FP8), (v_cache * 8).to(FP8)  # stored x 8, read back x 1/8: the same K/V
        runs["fa4_gathered_fp8"] = lambda: gathered(k8, v8, 0.125, 0.125)
        runs["fa4_gathered_fp8_triton"] = lambda: gathered(k8, v8, 0.125, 0.125, gather=one_launch)
        # FA4 packs the query heads of a KV head into one tile whenever GQA (FA3 packs only short queries)
        runs["fa4_gathered_triton[no_pack_gqa]"] = lambda: gathered(k_cache, v_cache, gather=one_launch,
                                                                    pack_gqa=False)
        runs["fa4_gathered_fp8_triton[no_pack_gqa]"] = lambda: gathered(k8, v8, 0.125, 0.125, gather=one_launch,
                                                                        pack_gqa=False)
        if prefix == 0:  # a prompt alone over an FP8 cache: the prologue's widened values (written before the call)
            kw8, vw8 = gather_packed(k8, packed, BF16), gather_packed(v8, packed, BF16)
            runs["fa4_fresh_fp8"] = lambda: _first(flash_attn_func(
                q[None], kw8[None], vw8[None], softmax_scale=scale * 0.125, causal=True))[0].mul_(0.125)
            runs["fa4_fresh_fp8[no_pack_gqa]"] = lambda: _first(flash_attn_func(
                q[None], kw8[None], vw8[None], softmax_scale=scale * 0.125, causal=True,
                pack_gqa=False))[0].mul_(0.125)
        runs["sdpa_fp8"] = lambda: paged_attention_prefill_sdpa(
            q, k8, v8, table, lens, qsl, scale, 0.125, 0.125, rest=paged_attention, query_start_host=[0, n],
            seq_lens_host=[kv], min_prefill_tokens=1)
        for name, kw in (KNOBS.items() if knobs and prefix == 0 else ()):
            runs[f"fa4[{name}]"] = lambda kw=kw: _first(_flash_attn_fwd(
                q[None], k[None], v[None], softmax_scale=scale, causal=True, **kw))[0]
        for name, kw in (KNOBS.items() if knobs else ()):
            runs[f"fa4_paged[{name}]"] = lambda kw=kw: _first(_flash_attn_fwd(
                q, k_cache, v_cache, cu_seqlens_q=cu_q, seqused_k=lens, max_seqlen_q=n, page_table=table,
                softmax_scale=scale, causal=True, **kw))
    if only:
        runs = {name: fn for name, fn in runs.items() if name in only}
    flops = 4 * D * hq * (n * prefix + n * (n + 1) / 2)
    errs: dict[str, float] = {}
    for name, fn in runs.items():
        try:
            o = fn()
            errs[name] = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
        except Exception as exc:  # noqa: BLE001 - a variant the library refuses is a result, not a crash
            torch.cuda.synchronize()
            out[name] = f"failed {type(exc).__name__}: {str(exc)[:160]}"
    # rounds > 1: every variant once per round, in turn, so a drift of the GPU's clocks hits them all alike
    times: dict[str, list[float]] = {name: [] for name in errs}
    for _ in range(rounds):
        for name in errs:
            if name in out:  # failed while timed
                continue
            try:
                times[name].append(_time_ms(runs[name], queued=queued, graph=graph))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report it, time the others
                torch.cuda.synchronize()
                out[name] = f"failed {type(exc).__name__}: {str(exc)[:160]}"
    for name, err in errs.items():
        if name in out:
            continue
        ms = statistics.median(times[name])
        spread = f" [{min(times[name]):.3f}-{max(times[name]):.3f}]" if rounds > 1 else ""
        out[name] = f"{ms:7.3f} ms{spread} ({100 * flops / (ms * 1e-3) / PEAK:4.1f}%) err {err:.1e}"
    return {name: out[name] for name in runs}  # columns in the order of `runs`


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="96/8,12/1")
    ap.add_argument("--cases", default="4096:0,16384:0,32768:0,4096:4096,16384:4096,2048:0,8192:0")
    ap.add_argument("--knobs", action="store_true", help="also FA4's sm90 launch choices (KNOBS) on the paged cache")
    ap.add_argument("--queued", action="store_true", help="time calls enqueued back to back (see _time_ms)")
    ap.add_argument("--graph", action="store_true",
                    help="time calls captured in a CUDA graph (kernel time, no host cost; a variant that cannot be "
                         "captured reports its error)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every variant this many times, interleaved; print the median and [min-max]")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args = ap.parse_args()
    only = frozenset(x for x in args.only.split(",") if x)
    print(torch.cuda.get_device_name(0), "| flash_attn.cute:", FA4_ERROR or "importable", flush=True)
    for heads in args.heads.split(","):
        hq, hk = (int(x) for x in heads.split("/"))
        for c in args.cases.split(","):
            n, p = (int(x) for x in c.split(":"))
            r = case(n, p, hq, hk, args.knobs, args.queued, args.rounds, args.graph, only)
            print(f"{hq}/{hk} q {n:6} prefix {p:5} | " + " | ".join(f"{k} {v}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
