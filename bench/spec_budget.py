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
then runs R rounds of every (dataset, concurrency) cell on all engines. The small model's steps are host-bound and
the host has slow periods of seconds (one run of a method was seen 80% slower than another in one call), so the
engines alternate finely: with `--interleave block` (the default) a cell's jobs are split into blocks of
`concurrency` prompts (plain-code) or sessions with all their turns (agentic-edit), and each block runs on every
engine (order rotated per block and round) before the next one starts; a slow period then hits one block of
each engine alike. `--interleave cell` runs each whole cell on every engine in turn instead (order rotated per
round). Per cell the summary prints the median TPOT over rounds, the median of each round's TPOT over none's in
the same round, and the median over (request, round) of a request's TPOT over none's for the same request and
round, with a 95% bootstrap interval over (round, block) units; a second none engine (`--methods
none,none#2,...`) gives the same statistic for two identical engines: the noise floor.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import pstats
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.datasets import make_edit_sessions, make_plain_code_dataset
from bench.hook_timer import HookTimer
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


# (request key, prompt ids, max_tokens, on_done(text) -> more jobs, or None); the key names the request the same
# way on every engine (the engine's request id is "<tag>-<key>"), so runs of one request can be paired
Job = tuple[str, list[int], int, Callable[[str], list] | None]
STAT_KEYS = ("spec_draft_tokens", "spec_accepted_tokens", "num_overlapped_steps", "spec_mtp_retired_requests",
             "gc_pause_seconds_total", "gc_collections_gen2", "steps_decode_steps", "steps_decode_seconds",
             "steps_prefill_steps", "steps_prefill_seconds")
# per engine: host time inside its drafter's hooks (bench/hook_timer.py), attached in build() with --hook-timing
TIMERS: dict[int, HookTimer] = {}


class Driver:
    """Keeps up to `concurrency` requests in the engine; records when each output token arrived."""

    def __init__(self, llm: LLM, concurrency: int) -> None:
        self.llm, self.eng, self.concurrency = llm, llm.engine, concurrency
        self.times: dict[str, list[float]] = {}
        self.texts: dict[str, str] = {}
        self._done: dict[str, Any] = {}

    def run(self, jobs: list[Job], tag: str) -> None:
        """Runs the jobs (on_done may queue more) as requests "<tag>-<key>" of tenant `tag`."""
        queue, live, keys = list(jobs), set(), {}
        while queue or live:
            while queue and len(live) < self.concurrency:
                key, ids, n, done = queue.pop(0)
                rid = f"{tag}-{key}"
                self.eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                     tenant=tag)
                live.add(rid)
                keys[rid] = key
                self.times[key], self.texts[key], self._done[key] = [], "", done
            for d in self.eng.step():
                now = time.perf_counter()
                key = keys[d.request_id]
                self.times[key] += [now] * len(d.new_token_ids)
                self.texts[key] += d.new_text
                if d.finished:
                    live.discard(d.request_id)
                    more = self._done.pop(key)
                    if more is not None:
                        queue += more(self.texts[key])


@dataclass
class BlockRun:
    """One Driver run: output token times per request key, llm.stats() deltas over it, its wall time."""
    times: dict[str, list[float]]
    stats: dict[str, float]
    wall: float


def make_blocks(llm: LLM, dataset: str, concurrency: int, args: argparse.Namespace) -> list[list[Job]]:
    """A cell's jobs in blocks of `concurrency` prompts (plain-code) or sessions with all their turns
    (agentic-edit: a turn's on_done queues the next). Prompts depend on (seed, concurrency) only, so every
    engine sees the same ones; each call builds new session objects, whose later turns carry the outputs of the
    engine that runs them."""
    tok = llm.get_tokenizer()
    seed = args.seed * 1000 + concurrency
    if dataset == "plain-code":
        specs = make_plain_code_dataset(args.num_prompts, args.input_len, args.output_len, 0.0, seed, tok,
                                        endpoint="completions")
        jobs = [(f"p{i}", tok.encode(s.prompt, add_special_tokens=False), s.output_len, None)
                for i, s in enumerate(specs)]
    else:
        sessions = make_edit_sessions(args.num_sessions, args.num_turns, args.input_len, args.output_len, 0, 0.0,
                                      seed, tok, endpoint="completions")

        def turn(s, k: int) -> Job:
            spec = s.next_request()

            def done(text: str) -> list[Job]:
                s.record_output(text)
                return [] if s.done else [turn(s, k + 1)]
            return f"s{s.session_id}-t{k}", tok.encode(spec.prompt, add_special_tokens=False), spec.output_len, done
        jobs = [turn(s, 0) for s in sessions]
    return [jobs[i:i + concurrency] for i in range(0, len(jobs), concurrency)]


def _counters(llm: LLM) -> dict[str, float]:
    """llm.stats() and the seconds spent so far in each drafter hook ("hook_<name>")."""
    timer = TIMERS.get(id(llm))
    return {**llm.stats(), **({f"hook_{k}": v for k, v in timer.seconds.items()} if timer else {})}


def run_jobs(llm: LLM, jobs: list[Job], concurrency: int, tag: str) -> BlockRun:
    drv = Driver(llm, concurrency)
    gc.collect()  # the last run's garbage, outside this one's timing
    before = _counters(llm)
    t0 = time.perf_counter()
    drv.run(jobs, tag)  # a tenant per cell and round: no run drafts from another's responses
    wall = time.perf_counter() - t0
    after = _counters(llm)
    keys = (*STAT_KEYS, *(k for k in after if k.startswith("hook_")))
    return BlockRun(drv.times, {k: after.get(k, 0) - before.get(k, 0) for k in keys}, wall)


def _tpot_ms(times: list[float]) -> float:
    """Per request: (last token time - first) / (tokens - 1)."""
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def cell_metrics(runs: list[BlockRun]) -> dict[str, Any]:
    """A cell's numbers over its runs (one per block, or one for the whole cell): token and stats counts add
    up, tok/s is over the runs' summed wall time. "blocks": per run, TPOT (ms) by request key."""
    blocks = [{k: _tpot_ms(t) for k, t in r.times.items() if len(t) > 1} for r in runs]
    tpot = [x for b in blocks for x in b.values()]
    out_tokens = sum(len(t) for r in runs for t in r.times.values())
    hook_keys = sorted({k for r in runs for k in r.stats if k.startswith("hook_")})
    delta = {k: sum(r.stats.get(k, 0) for r in runs) for k in (*STAT_KEYS, *hook_keys)}
    steps = max(delta["steps_decode_steps"] + delta["steps_prefill_steps"], 1)
    hooks_us = {k[5:]: round(1e6 * delta[k] / steps, 2) for k in hook_keys}
    return {
        "tpot_ms_mean": statistics.fmean(tpot) if tpot else float("nan"), "tpot_ms_p50": _pct(tpot, 0.5),
        "tpot_ms_p99": _pct(tpot, 0.99), "output_tok_s": out_tokens / sum(r.wall for r in runs),
        "output_tokens": out_tokens,
        "drafted_per_token": delta["spec_draft_tokens"] / max(out_tokens, 1),
        "accepted_per_token": delta["spec_accepted_tokens"] / max(out_tokens, 1),
        "overlapped_steps": delta["num_overlapped_steps"], "mtp_retired": delta["spec_mtp_retired_requests"],
        "requests": sum(len(r.times) for r in runs), "gc_pause_ms": 1000 * delta["gc_pause_seconds_total"],
        "gc_gen2": delta["gc_collections_gen2"],
        # step() wall per decode-only step (engine/step_accounting.py) and drafter-hook host time per step
        "decode_steps": delta["steps_decode_steps"],
        "decode_step_ms": 1000 * delta["steps_decode_seconds"] / max(delta["steps_decode_steps"], 1),
        "drafter_us_per_step": sum(hooks_us.values()), "drafter_hooks_us_per_step": hooks_us, "blocks": blocks,
    }


def measure(llm: LLM, dataset: str, concurrency: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """The whole cell in one run, at most `concurrency` requests in flight."""
    jobs = [j for b in make_blocks(llm, dataset, concurrency, args) for j in b]
    return cell_metrics([run_jobs(llm, jobs, concurrency, tag)])


def profile(llm: LLM, args: argparse.Namespace, tag: str) -> None:
    """Host and device time of a short run (plain-code requests, one block at --profile-concurrency, default the
    lowest concurrency), top ops."""
    conc = args.profile_concurrency or min(int(c) for c in args.concurrency.split(","))
    small = argparse.Namespace(**{**vars(args), "num_prompts": max(4, conc), "seed": args.seed + 7})
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        r = measure(llm, "plain-code", conc, small, f"profile-{tag}")
    print(f"--- profile {tag}: c{conc}, TPOT {r['tpot_ms_mean']:.2f} ms, {r['output_tokens']} tokens, "
          f"{r['decode_steps']} decode steps, step() {r['decode_step_ms']:.3f} ms")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)
    if torch.cuda.is_available():
        print(f"--- profile {tag}: top ops by device time")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)
    # the same run again under cProfile: Python functions (call counts and own time), which torch's table omits
    profiler = cProfile.Profile()
    profiler.enable()
    r = measure(llm, "plain-code", conc, small, f"cprofile-{tag}")
    profiler.disable()
    print(f"--- cProfile {tag}: {r['decode_steps']} decode steps, step() {r['decode_step_ms']:.3f} ms "
          "(slowed by the profiler)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    if args.profile_dir:
        profiler.dump_stats(f"{args.profile_dir}/{tag}.pstats")


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
    if llm.engine.drafter is not None and args.hook_timing:
        TIMERS[id(llm)] = HookTimer.attach(llm.engine.drafter)
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


def report(method: str, budget: str, dataset: str, conc: int, result: dict[str, Any], args: argparse.Namespace,
           rep: int | None = None) -> dict[str, Any]:
    """Prints a cell's line and appends its JSON line to --out; the row."""
    r = {"method": method, "budget": budget, "dataset": dataset, "concurrency": conc,
         **({} if rep is None else {"rep": rep, "interleave": args.interleave}), **result}
    print(f"{method:<7} {budget:<3} {dataset:<13} c{conc:<3} {'' if rep is None else f'r{rep} '}"
          f"TPOT {r['tpot_ms_mean']:8.2f} p50 {r['tpot_ms_p50']:8.2f} p99 {r['tpot_ms_p99']:8.2f} | "
          f"{r['output_tok_s']:8.1f} tok/s | drafted/tok {r['drafted_per_token']:.2f} "
          f"accepted/tok {r['accepted_per_token']:.2f} | overlapped steps {r['overlapped_steps']}, "
          f"MTP retired {r['mtp_retired']}/{r['requests']} | gc {r['gc_pause_ms']:.1f} ms", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
    return r


def cell_tag(method: str, budget: str, dataset: str, conc: int, rep: int | None = None) -> str:
    return f"{method}-{budget}-{dataset}-{conc}" + ("" if rep is None else f"-r{rep}")


def run_cell(llm: LLM, method: str, budget: str, dataset: str, conc: int, args: argparse.Namespace,
             rep: int | None = None) -> dict[str, Any]:
    result = measure(llm, dataset, conc, args, cell_tag(method, budget, dataset, conc, rep))
    return report(method, budget, dataset, conc, result, args, rep)


def rotation(n: int, shift: int) -> list[int]:
    """0..n-1 rotated left by shift: the engines' order for one round (cell) or one (round, block)."""
    k = shift % n
    return list(range(k, n)) + list(range(k))


def run_cell_blocks(engines: list[tuple[str, str, LLM]], dataset: str, conc: int, args: argparse.Namespace,
                    rep: int) -> list[dict[str, Any]]:
    """One round of a cell on every engine, block by block: block b runs on every engine (order rotated per
    block and round) before block b + 1 starts, so a slow period of the host lands on one block of each
    engine rather than on one engine's whole cell."""
    plans = [make_blocks(llm, dataset, conc, args) for _, _, llm in engines]  # each engine its own sessions
    runs: list[list[BlockRun]] = [[] for _ in engines]
    for b in range(len(plans[0])):
        for i in rotation(len(engines), rep + b):
            method, budget, llm = engines[i]
            runs[i].append(run_jobs(llm, plans[i][b], conc, cell_tag(method, budget, dataset, conc, rep)))
    return [report(m, bu, dataset, conc, cell_metrics(rs), args, rep) for (m, bu, _), rs in zip(engines, runs)]


def print_learnt(llm: LLM, method: str, budget: str) -> None:
    draft_budget = getattr(llm.engine.drafter, "budget", None)
    if draft_budget is not None:  # what the draft budget's wall clock learnt (spec/wall_clock.py)
        learnt = {k: {b: round(v, 3) for b, v in sorted(d.items())} for k, d in draft_budget.clock.snapshot().items()}
        print(f"{method} {budget}: wall clock learnt (ms by batch bucket) {learnt}", flush=True)


# the issue-16 comparisons besides "vs none": suffix against MTP; hybrid against suffix and MTP (the better of them)
VERSUS = {"suffix": ("mtp",), "hybrid": ("suffix", "mtp")}


def request_ratios(rows: list[dict[str, Any]], baseline: str = "none") -> dict[tuple, list[list[float]]]:
    """Per (dataset, concurrency, method, budget): for each (round, block) of the method's rows, the ratios
    TPOT / the baseline's TPOT of the same request in the same round (a speculative baseline: with the same
    budget setting), over the requests both ran."""
    def budget_of(r: dict[str, Any]) -> str:
        return "-" if baseline == "none" else r["budget"]
    base = {(r["dataset"], r["concurrency"], r["rep"], budget_of(r), k): t for r in rows if r["method"] == baseline
            for b in r.get("blocks", []) for k, t in b.items()}
    out: dict[tuple, list[list[float]]] = {}
    for r in rows:
        if r["method"] == baseline or "blocks" not in r:
            continue
        cell = (r["dataset"], r["concurrency"], r["rep"], budget_of(r))
        units = out.setdefault((r["dataset"], r["concurrency"], r["method"], r["budget"]), [])
        for b in r["blocks"]:
            ratios = [t / base[(*cell, k)] for k, t in b.items() if base.get((*cell, k), 0) > 0]
            if ratios:
                units.append(ratios)
    return out


def median_ci(units: list[list[float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median of all values, and a 95% percentile-bootstrap interval that resamples whole units (a (round,
    block): its requests ran side by side, so they share the host's speed and are not independent)."""
    med = statistics.median(x for u in units for x in u)
    rng = random.Random(seed)
    boot = sorted(statistics.median(x for u in rng.choices(units, k=len(units)) for x in u) for _ in range(n_boot))
    return med, boot[int(0.025 * (n_boot - 1))], boot[int(0.975 * (n_boot - 1) + 0.5)]


def paired_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per (dataset, concurrency, method, budget): median TPOT over the rounds, and the median over rounds of
    TPOT / none's TPOT in the same round and cell. Where rows carry per-request TPOTs ("blocks"), also the
    median over (request, round) of TPOT / none's TPOT for that request and round, with a 95% interval (for
    a second engine of a method, e.g. none#2 or suffix#2, the same against its first engine is the A/A noise
    floor), and the same against suffix and MTP where the issue compares with them (VERSUS)."""
    none = {(r["dataset"], r["concurrency"], r["rep"]): r["tpot_ms_mean"] for r in rows if r["method"] == "none"}
    baselines = {"none", "suffix", "mtp", *(base_method(r["method"]) for r in rows)}
    per_request = {b: request_ratios(rows, b) for b in baselines}
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
        if all("decode_step_ms" in r for r in group):
            hooks = statistics.median(r['drafter_us_per_step'] for r in group)
            lines.append(f"{'':<31}decode steps {statistics.median(r['decode_steps'] for r in group):.0f}, "
                         f"step() {statistics.median(r['decode_step_ms'] for r in group):.3f} ms each"
                         + (f", drafter hooks {hooks:.1f} us per step" if hooks else "") + " (medians over rounds)")
            by_hook = {h: statistics.median(r["drafter_hooks_us_per_step"].get(h, 0.0) for r in group)
                       for h in sorted({h for r in group for h in r.get("drafter_hooks_us_per_step", {})})}
            if by_hook:
                lines.append(f"{'':<31}us per step by hook: " + ", ".join(f"{h} {v:.1f}" for h, v in by_hook.items()
                                                                        if v >= 0.05))
        # "M#2" is a second engine of M: against M it is the A/A noise floor
        for baseline in dict.fromkeys(("none", base_method(method), *VERSUS.get(base_method(method), ()))):
            units = per_request[baseline].get((dataset, conc, method, budget)) if baseline != method else None
            if not units:
                continue
            med, lo, hi = median_ci(units)
            aa = "  (A/A: the noise floor)" if baseline == base_method(method) else ""
            lines.append(f"{'':<31}per request {100 * (med - 1):+6.1f}% vs {baseline}, 95% CI [{100 * (lo - 1):+.1f}%, "
                         f"{100 * (hi - 1):+.1f}%] over {sum(map(len, units))} request-rounds in {len(units)} "
                         f"(round, block) units{aa}")
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
    ap.add_argument("--profile-concurrency", type=int, default=None,
                    help="requests in flight in the --profile run (default: the lowest --concurrency)")
    ap.add_argument("--profile-dir", default=None, help="--profile also writes each engine's cProfile stats here")
    ap.add_argument("--profile", action="store_true",
                    help="after the warm-up, one plain-code block per engine at --profile-concurrency under "
                         "torch.profiler: where a step's host and device time go (top ops by self CPU time)")
    ap.add_argument("--hook-timing", action="store_true",
                    help="time each drafter hook (bench/hook_timer.py): a diagnostic, not for the table, since the "
                         "wrappers add host time per call to the speculative engines only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; > 1: every engine built first, methods interleaved (see above and --interleave)")
    ap.add_argument("--interleave", choices=["block", "cell"], default=None,
                    help="with every engine in one process (--repeat > 1, or this flag given): block (the default) "
                         "runs each block of `concurrency` prompts or sessions on every engine before the next "
                         "block; cell runs each whole cell on every engine in turn")
    ap.add_argument("--num-kv-blocks", type=int, default=None,
                    help="KV pages per engine (default: from GPU memory; with --repeat > 1: enough for "
                         "max concurrency x max-model-len twice over)")
    args = ap.parse_args()
    extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.spec_option)}
    setups = [(m, b) for m in args.methods.split(",")
              for b in (["-"] if base_method(m) == "none" else args.budget.split(","))]
    if args.repeat <= 1 and args.interleave is None:  # one engine at a time, each sizing its KV cache from free memory
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
    args.interleave = args.interleave or "block"
    if args.num_kv_blocks is None:  # 16-token pages
        args.num_kv_blocks = 2 * max(c for _, c in cells(args)) * (-(-args.max_model_len // 16))
    engines = [(m, b, build(args, m, b, extra)) for m, b in setups]
    # as a serving process does (engine/gc_control.py): four engines' start-up heap is not walked by every
    # full collection inside a cell (one such pause is a large part of a short cell)
    print(f"gc: froze {freeze_startup_heap()} start-up objects", flush=True)
    rows = []
    for rep in range(args.repeat):
        for dataset, conc in cells(args):
            if args.interleave == "block":
                rows += run_cell_blocks(engines, dataset, conc, args, rep)
                continue
            for i in rotation(len(engines), rep):
                method, budget, llm = engines[i]
                rows.append(run_cell(llm, method, budget, dataset, conc, args, rep))
    for method, budget, llm in engines:
        print_learnt(llm, method, budget)
    print(f"--- paired summary (each round's methods ran back to back per "
          f"{'block of concurrency prompts or sessions' if args.interleave == 'block' else 'cell'})")
    print("\n".join(paired_summary(rows)), flush=True)
    for _, _, llm in engines:
        llm.shutdown()


if __name__ == "__main__":
    main()
