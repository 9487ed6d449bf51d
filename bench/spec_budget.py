"""Draft budget on / off, offline, in one process: per speculative method (none / mtp / suffix / hybrid) and
budget setting, the agentic-edit sessions (files asked back with small edits: repetition) and plain-code
continuations (no repetition) at each concurrency, driving EngineCore directly with at most `concurrency`
requests in flight. Prints TPOT (mean / p50 / p99, per request: (last token time - first) / (tokens - 1)),
output tokens per second, drafted and accepted tokens per emitted token; JSON lines to --out.

    python -m bench.spec_budget --model DIR/fp8-channel --device cuda \\
        --methods none,mtp,suffix,hybrid --budget on,off --concurrency 1,16 \\
        --enable-fused-qk-norm-rope --enable-shared-experts-fusion --out $OUT/spec_budget.jsonl

The issue-16 target this measures: no method more than 3% slower (TPOT) than none on plain-code.

`--repeat R` (R > 1) builds every engine first (KV pages from --num-kv-blocks, so that several fit one GPU) and
then runs R rounds; in each round every (dataset, concurrency) cell runs all engines back to back, the order
rotated per round. A slow period of the host (the small model's steps are host-bound, and one run of a method
was seen 80% slower than another in one call) then hits every method of a cell alike: per cell it prints the
median TPOT and the median of each round's TPOT over none's in the same round (paired ratios).
"""
from __future__ import annotations

import argparse
import gc
import json
import itertools
import statistics
import time
from typing import Any

import torch

from bench.datasets import make_edit_sessions, make_plain_code_dataset
from engine import LLM, SamplingParams
from engine.gc_control import freeze_startup_heap

SPEC = {
    "mtp": {"method": "mtp", "num_speculative_tokens": 3},
    "suffix": {"method": "suffix", "num_speculative_tokens": 16},
    "hybrid": {"method": "hybrid", "num_speculative_tokens": 16, "num_mtp_tokens": 3},
}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


class Driver:
    """Keeps up to `concurrency` requests in the engine; records when each output token arrived."""

    def __init__(self, llm: LLM, concurrency: int) -> None:
        self.llm, self.eng, self.concurrency = llm, llm.engine, concurrency
        self.times: dict[str, list[float]] = {}
        self.texts: dict[str, str] = {}
        self._done: dict[str, Any] = {}

    def run(self, jobs: list[tuple[str, list[int], int, Any]], tenant: str) -> None:
        """jobs: (request id, prompt ids, max_tokens, on_done(text) or None); on_done may queue more jobs."""
        queue, live = list(jobs), set()
        while queue or live:
            while queue and len(live) < self.concurrency:
                rid, ids, n, done = queue.pop(0)
                self.eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                     tenant=tenant)
                live.add(rid)
                self.times[rid], self.texts[rid], self._done[rid] = [], "", done
            for d in self.eng.step():
                now = time.perf_counter()
                self.times[d.request_id] += [now] * len(d.new_token_ids)
                self.texts[d.request_id] += d.new_text
                if d.finished:
                    live.discard(d.request_id)
                    more = self._done.pop(d.request_id)
                    if more is not None:
                        queue += more(self.texts[d.request_id])


def measure(llm: LLM, dataset: str, concurrency: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Prompts depend on (seed, concurrency) only, so every method sees the same ones."""
    tok = llm.get_tokenizer()
    seed = args.seed * 1000 + concurrency
    drv = Driver(llm, concurrency)
    jobs = []
    if dataset == "plain-code":
        specs = make_plain_code_dataset(args.num_prompts, args.input_len, args.output_len, 0.0, seed, tok,
                                        endpoint="completions")
        jobs = [(f"{tag}-p{i}", tok.encode(s.prompt, add_special_tokens=False), s.output_len, None)
                for i, s in enumerate(specs)]
    else:
        sessions = make_edit_sessions(args.num_sessions, args.num_turns, args.input_len, args.output_len, 0, 0.0,
                                      seed, tok, endpoint="completions")

        def turn(s, k: int):
            spec = s.next_request()

            def done(text: str):
                s.record_output(text)
                return [] if s.done else [turn(s, k + 1)]
            return (f"{tag}-s{s.session_id}-t{k}", tok.encode(spec.prompt, add_special_tokens=False),
                    spec.output_len, done)
        jobs = [turn(s, 0) for s in sessions]
    gc.collect()  # the last cell's garbage, outside this one's timing
    before = llm.stats()
    t0 = time.perf_counter()
    drv.run(jobs, tenant=tag)  # a tenant per run: no run drafts from another's responses
    wall = time.perf_counter() - t0
    after = llm.stats()
    tpot = [1000 * (t[-1] - t[0]) / (len(t) - 1) for t in drv.times.values() if len(t) > 1]
    out_tokens = sum(len(t) for t in drv.times.values())
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("spec_draft_tokens", "spec_accepted_tokens",
                                                              "num_overlapped_steps", "spec_mtp_retired_requests",
                                                              "gc_pause_seconds_total", "gc_collections_gen2")}
    return {
        "tpot_ms_mean": statistics.fmean(tpot) if tpot else float("nan"), "tpot_ms_p50": _pct(tpot, 0.5),
        "tpot_ms_p99": _pct(tpot, 0.99), "output_tok_s": out_tokens / wall, "output_tokens": out_tokens,
        "drafted_per_token": delta["spec_draft_tokens"] / max(out_tokens, 1),
        "accepted_per_token": delta["spec_accepted_tokens"] / max(out_tokens, 1),
        "overlapped_steps": delta["num_overlapped_steps"], "mtp_retired": delta["spec_mtp_retired_requests"],
        "requests": len(drv.times), "gc_pause_ms": 1000 * delta["gc_pause_seconds_total"],
        "gc_gen2": delta["gc_collections_gen2"],
    }


def profile(llm: LLM, args: argparse.Namespace, tag: str) -> None:
    """Host and device time of a short run (4 plain-code requests at the lowest concurrency), top ops."""
    conc = min(int(c) for c in args.concurrency.split(","))
    small = argparse.Namespace(**{**vars(args), "num_prompts": 4, "output_len": 64, "seed": args.seed + 7})
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        r = measure(llm, "plain-code", conc, small, f"profile-{tag}")
    print(f"--- profile {tag}: c{conc}, TPOT {r['tpot_ms_mean']:.2f} ms, {r['output_tokens']} tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
          flush=True)


def base_method(label: str) -> str:
    """The method of a --methods entry: "none#2" is a second engine of method none (an A/A control)."""
    return label.split("#", 1)[0]


def build(args: argparse.Namespace, method: str, budget: str, extra: dict[str, Any]) -> LLM:
    """One engine for (method, budget), warmed up over every dataset and concurrency."""
    spec = None if base_method(method) == "none" else {**SPEC[base_method(method)], **extra,
                                                       "draft_budget": budget == "on"}
    overlap = {"overlap_scheduling": False} if spec is None and args.none_overlap == "off" else {}
    kv = {"num_kv_blocks": args.num_kv_blocks} if args.num_kv_blocks else {}
    llm = LLM(args.model, speculative_config=spec, device=args.device, kv_cache_dtype=args.kv_cache_dtype,
              enforce_eager=args.enforce_eager, enable_fused_qk_norm_rope=args.enable_fused_qk_norm_rope,
              enable_shared_experts_fusion=args.enable_shared_experts_fusion, max_model_len=args.max_model_len,
              max_num_seqs=max(cells(args), key=lambda c: c[1])[1], **overlap, **kv)
    runner = llm.engine.worker.runner
    if runner.graphs is not None and runner.graphs.replay_ms:  # what the draft budget was given
        print(f"{method} {budget}: graph replay ms (batch, rows per request) "
              f"{ {k: round(v, 3) for k, v in sorted(runner.graphs.replay_ms.items())} }", flush=True)
    if runner.mtp_graphs is not None and runner.mtp_graphs.replay_ms:
        print(f"{method} {budget}: MTP draft graph ms "
              f"{ {k: round(v, 3) for k, v in sorted(runner.mtp_graphs.replay_ms.items())} }", flush=True)
    if args.warmup:  # Triton compiles each new eager shape once per process: not inside a timed run
        small = argparse.Namespace(**{**vars(args), "num_prompts": 4, "num_sessions": 4, "num_turns": 2,
                                      "output_len": 64, "seed": args.seed + 99})
        for dataset, conc in cells(args):
            measure(llm, dataset, conc, small, f"warmup-{method}-{budget}-{dataset}-{conc}")
    if args.profile:
        profile(llm, args, f"{method}-{budget}")
    return llm


def cells(args: argparse.Namespace) -> list[tuple[str, int]]:
    return [(d, int(c)) for d in args.datasets.split(",") for c in args.concurrency.split(",")]


def run_cell(llm: LLM, method: str, budget: str, dataset: str, conc: int, args: argparse.Namespace,
             rep: int | None = None) -> dict[str, Any]:
    tag = f"{method}-{budget}-{dataset}-{conc}" + ("" if rep is None else f"-r{rep}")
    r = {"method": method, "budget": budget, "dataset": dataset, "concurrency": conc,
         **({} if rep is None else {"rep": rep}), **measure(llm, dataset, conc, args, tag)}
    print(f"{method:<7} {budget:<3} {dataset:<13} c{conc:<3} {'' if rep is None else f'r{rep} '}"
          f"TPOT {r['tpot_ms_mean']:8.2f} p50 {r['tpot_ms_p50']:8.2f} p99 {r['tpot_ms_p99']:8.2f} | "
          f"{r['output_tok_s']:8.1f} tok/s | drafted/tok {r['drafted_per_token']:.2f} "
          f"accepted/tok {r['accepted_per_token']:.2f} | overlapped steps {r['overlapped_steps']}, "
          f"MTP retired {r['mtp_retired']}/{r['requests']} | gc {r['gc_pause_ms']:.1f} ms", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
    return r


def print_learnt(llm: LLM, method: str, budget: str) -> None:
    draft_budget = getattr(llm.engine.drafter, "budget", None)
    if draft_budget is not None:  # what the draft budget's wall clock learnt (spec/wall_clock.py)
        learnt = {k: {b: round(v, 3) for b, v in sorted(d.items())} for k, d in draft_budget.clock.snapshot().items()}
        print(f"{method} {budget}: wall clock learnt (ms by batch bucket) {learnt}", flush=True)


def paired_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per (dataset, concurrency, method, budget): median TPOT over the rounds, and the median over rounds of
    TPOT / none's TPOT in the same round and cell."""
    none = {(r["dataset"], r["concurrency"], r["rep"]): r["tpot_ms_mean"] for r in rows if r["method"] == "none"}
    lines = []
    key = lambda r: (r["dataset"], r["concurrency"], r["method"], r["budget"])  # noqa: E731
    for (dataset, conc, method, budget), group in itertools.groupby(sorted(rows, key=key), key=key):
        group = list(group)
        tpot = [r["tpot_ms_mean"] for r in group]
        ratios = [r["tpot_ms_mean"] / none[(dataset, conc, r["rep"])] for r in group
                  if (dataset, conc, r["rep"]) in none]
        vs = f"{100 * (statistics.median(ratios) - 1):+6.1f}% vs none" if ratios and method != "none" else ""
        lines.append(f"{dataset:<13} c{conc:<3} {method:<7} {budget:<3} TPOT median {statistics.median(tpot):6.3f} "
                     f"ms over {len(tpot)} rounds (min {min(tpot):.3f}, max {max(tpot):.3f}) {vs}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default="none,mtp,suffix,hybrid",
                    help="comma separated; a method given twice as M#2 builds a second engine of M (an A/A control: "
                         "how far two identical engines differ in this process)")
    ap.add_argument("--budget", default="on,off", help="draft budget settings to run (spec draft_budget)")
    ap.add_argument("--datasets", default="agentic-edit,plain-code")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--num-prompts", type=int, default=32, help="plain-code requests")
    ap.add_argument("--num-sessions", type=int, default=16, help="agentic-edit sessions")
    ap.add_argument("--num-turns", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spec-option", action="append", default=[],
                    help="extra speculative_config key=JSON value for every method, e.g. mtp_step_cost_ms=0.3")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--enable-fused-qk-norm-rope", action="store_true")
    ap.add_argument("--enable-shared-experts-fusion", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--none-overlap", choices=["auto", "off"], default="auto",
                    help="overlap scheduling for method none (speculation always runs without it): auto = the "
                         "engine default (on with CUDA); off = the same host/device serialization as speculation")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="an untimed short pass of every dataset and concurrency per engine first")
    ap.add_argument("--profile", action="store_true",
                    help="after the warm-up, one short plain-code pass per engine at the lowest concurrency under "
                         "torch.profiler: where a step's host and device time go (top ops by self CPU time)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; > 1: every engine built first, methods interleaved per cell (see above)")
    ap.add_argument("--num-kv-blocks", type=int, default=None,
                    help="KV pages per engine (default: from GPU memory; with --repeat > 1: enough for "
                         "max concurrency x max-model-len twice over)")
    args = ap.parse_args()
    extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.spec_option)}
    setups = [(m, b) for m in args.methods.split(",")
              for b in (["-"] if base_method(m) == "none" else args.budget.split(","))]
    if args.repeat <= 1:  # one engine at a time, each sizing its KV cache from the free memory
        for method, budget in setups:
            llm = build(args, method, budget, extra)
            for dataset, conc in cells(args):
                run_cell(llm, method, budget, dataset, conc, args)
            print_learnt(llm, method, budget)
            llm.shutdown()
            del llm  # the next engine sizes its KV cache from free memory: give this one's back first
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return
    if args.num_kv_blocks is None:  # 16-token pages
        args.num_kv_blocks = 2 * max(c for _, c in cells(args)) * (-(-args.max_model_len // 16))
    engines = [(m, b, build(args, m, b, extra)) for m, b in setups]
    # as a serving process does (engine/gc_control.py): four engines' start-up heap is not walked by every
    # full collection inside a cell (one such pause is a large part of a short cell)
    print(f"gc: froze {freeze_startup_heap()} start-up objects", flush=True)
    rows = []
    for rep in range(args.repeat):
        for dataset, conc in cells(args):
            k = rep % len(engines)
            for method, budget, llm in engines[k:] + engines[:k]:
                rows.append(run_cell(llm, method, budget, dataset, conc, args, rep))
    for method, budget, llm in engines:
        print_learnt(llm, method, budget)
    print("--- paired summary (each round's methods ran back to back per cell)")
    print("\n".join(paired_summary(rows)), flush=True)
    for _, _, llm in engines:
        llm.shutdown()


if __name__ == "__main__":
    main()
