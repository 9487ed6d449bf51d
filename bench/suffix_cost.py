"""Host cost of the suffix-decoding index (spec.suffix_index) next to Arctic Inference's SuffixDecodingCache.

    python -m bench.suffix_cost [--batch 64] [--prompt 4096] [--steps 100] [--max-tokens 16]

Prints, at the same parameters (depth 64, factor 1.0, min prob 0.1), for ours and for arctic-inference (when
importable): the per-step host time at batch B with P-token prompts (every request accepts 1-4 tokens, then
every request is drafted), the time to index a 100K-token prompt, and how many draft tokens matched the true
continuation, with the targets beside. Token streams are real code: the Python standard library's source cut
into word-level tokens (identifiers, punctuation, whitespace runs); half the requests are edit episodes (the
response re-emits the prompt's last file with lines changed, dropped and added, as an agentic coding tool
does), half write an unrelated file; the global tree starts with 200 earlier edit-episode responses.
"""
from __future__ import annotations

import argparse
import random
import re
import statistics
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from spec.suffix_index import SuffixIndex

try:  # optional: arctic-inference (an sdist whose build pulls a CUDA torch; its runtime needs numpy)
    from arctic_inference.suffix_decoding import SuffixDecodingCache
except ImportError:  # pragma: no cover - depends on the machine
    SuffixDecodingCache = None

DEPTH = 64
FACTOR = 1.0
MIN_PROB = 0.1
TARGET_STEP_MS = 1.0
TARGET_INDEX_100K_MS = 50.0
_WORDS = re.compile(r"\w+|[^\w\s]|\s+")


@dataclass(frozen=True)
class Corpus:
    files: list[list[int]]  # token ids per file
    newlines: frozenset[int]  # ids of tokens that contain a line break


def code_corpus(min_tokens: int = 200, max_files: int | None = None) -> Corpus:
    """The standard library's .py files as word-level token ids (one vocabulary), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    vocab: dict[str, int] = {}
    files = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        toks = [vocab.setdefault(w, len(vocab)) for w in _WORDS.findall(text)]
        if len(toks) >= min_tokens:
            files.append(toks)
            if max_files is not None and len(files) >= max_files:
                break
    return Corpus(files, frozenset(i for w, i in vocab.items() if "\n" in w))


def split_lines(toks: list[int], newlines: frozenset[int]) -> list[list[int]]:
    lines: list[list[int]] = [[]]
    for t in toks:
        lines[-1].append(t)
        if t in newlines:
            lines.append([])
    return [line for line in lines if line]


def edit_episode(rng: random.Random, file: list[int], other: list[int], newlines: frozenset[int],
                 p_change: float = 0.08) -> list[int]:
    """`file` re-emitted with about p_change of its lines replaced, half as many dropped and half as many added
    (new lines come from `other`)."""
    donor = split_lines(other, newlines) or [[0]]
    out: list[int] = []
    for line in split_lines(file, newlines):
        r = rng.random()
        if r < p_change:
            out += rng.choice(donor)
        elif r < 1.5 * p_change:
            continue
        elif r < 2 * p_change:
            out += rng.choice(donor) + line
        else:
            out += line
    return out


@dataclass
class Workload:
    prompts: list[list[int]]
    responses: list[list[int]]
    warm: list[tuple[list[int], list[int]]]  # finished (prompt, response) pairs for the global tree


def make_workload(corpus: Corpus, batch: int, prompt_len: int, resp_len: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    big = [f for f in corpus.files if len(f) >= 600]
    preamble = corpus.files[0][:300]  # a shared "system prompt"
    prompts, responses = [], []
    for i in range(batch):
        body: list[int] = []
        last = big[0]
        while len(body) < prompt_len:
            last = rng.choice(big)
            body += last
        prompts.append((preamble + body)[-prompt_len:])
        other = rng.choice(big)
        resp = edit_episode(rng, last, other, corpus.newlines) if i % 2 == 0 else list(other)
        while len(resp) < resp_len:
            resp += rng.choice(big)
        responses.append(resp[:resp_len])
    warm = []
    for _ in range(200):
        f, o = rng.choice(big)[:2000], rng.choice(big)
        warm.append((f, edit_episode(rng, f, o, corpus.newlines)))
    return Workload(prompts, responses, warm)


class Ours:
    name = "glint SuffixIndex"

    def __init__(self) -> None:
        self.index = SuffixIndex(DEPTH, 1 << 24)

    def add_finished(self, sid: int, prompt: list[int], response: list[int]) -> None:
        self.index.start(sid, prompt)
        self.index.extend(sid, response)
        self.index.stop(sid)

    def start(self, sid: int, prompt: list[int]) -> None:
        self.index.start(sid, prompt)

    def stop(self, sid: int, keep: bool) -> None:
        self.index.stop(sid, keep)

    def step(self, ids: list[int], accepted: list[list[int]], seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
        self.index.extend_batch(ids, accepted)
        drafts = self.index.speculate_batch(ids, [max_tokens] * len(ids), FACTOR, MIN_PROB)
        return [d.tokens for d in drafts]


class OursPerRequest(Ours):
    name = "glint SuffixIndex, extend() per request"

    def step(self, ids: list[int], accepted: list[list[int]], seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
        for sid, toks in zip(ids, accepted):
            self.index.extend(sid, toks)
        drafts = self.index.speculate_batch(ids, [max_tokens] * len(ids), FACTOR, MIN_PROB)
        return [d.tokens for d in drafts]


class Arctic:
    name = "arctic-inference SuffixDecodingCache"

    def __init__(self) -> None:
        self.cache = SuffixDecodingCache(max_tree_depth=DEPTH, max_cached_requests=-1)

    def add_finished(self, sid: int, prompt: list[int], response: list[int]) -> None:
        self.cache.start_request(sid, prompt)
        self.cache.add_active_response(sid, response)
        self.cache.stop_request(sid)

    def start(self, sid: int, prompt: list[int]) -> None:
        self.cache.start_request(sid, prompt)

    def stop(self, sid: int, keep: bool) -> None:
        self.cache.stop_request(sid)
        if not keep:
            self.cache.evict_cached_response(sid)

    def step(self, ids: list[int], accepted: list[list[int]], seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
        for sid, toks in zip(ids, accepted):
            self.cache.add_active_response(sid, toks)
        out = []
        for sid, seq in zip(ids, seqs):
            d = self.cache.speculate(sid, seq[-DEPTH:], max_spec_tokens=max_tokens, max_spec_factor=FACTOR,
                                     min_token_prob=MIN_PROB)
            out.append(d.token_ids)
        return out


def run_steps(impl, wl: Workload, steps: int, max_tokens: int, seed: int = 1) -> dict[str, float]:
    for j, (p, r) in enumerate(wl.warm):
        impl.add_finished(10_000 + j, p, r)
    ids = list(range(len(wl.prompts)))
    for sid, p in zip(ids, wl.prompts):
        impl.start(sid, p)
    rng = random.Random(seed)
    seqs = [list(p) for p in wl.prompts]
    pos = [0] * len(ids)
    times, drafted, matched = [], 0, 0
    for step in range(steps):
        accepted = []
        for i in ids:
            k = rng.randint(1, 4)
            accepted.append(wl.responses[i][pos[i] : pos[i] + k])
            pos[i] += k
            seqs[i] += accepted[-1]
        t0 = time.perf_counter()
        drafts = impl.step(ids, accepted, seqs, max_tokens)
        dt = time.perf_counter() - t0
        if step >= 5:  # warm-up steps left out
            times.append(dt)
        for i, d in zip(ids, drafts):
            truth = wl.responses[i][pos[i] : pos[i] + len(d)]
            drafted += len(d)
            matched += next((j for j, (a, b) in enumerate(zip(d, truth)) if a != b), min(len(d), len(truth)))
    for sid in ids:
        impl.stop(sid, False)
    n = steps * len(ids)
    return {"step_ms": statistics.median(times) * 1e3, "p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3,
            "drafted": drafted / n, "matched": matched / n}


def index_cost(impl_factory, corpus: Corpus, n_tokens: int = 100_000, reps: int = 3) -> float:
    stream = [t for f in corpus.files for t in f]
    times = []
    for r in range(reps):
        impl = impl_factory()
        prompt = stream[r * n_tokens : (r + 1) * n_tokens]
        t0 = time.perf_counter()
        impl.start(1, prompt)
        times.append(time.perf_counter() - t0)
        impl.stop(1, False)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    corpus = code_corpus()
    wl = make_workload(corpus, args.batch, args.prompt, resp_len=4 * args.steps + 8)
    impls = [Ours, OursPerRequest] + ([Arctic] if SuffixDecodingCache is not None else [])
    print(f"suffix index host cost: batch {args.batch}, {args.prompt}-token prompts, depth {DEPTH}, factor {FACTOR}, "
          f"min prob {MIN_PROB}, max draft {args.max_tokens}; {len(corpus.files)} stdlib files, "
          f"{sum(map(len, corpus.files))} tokens")
    print(f"{'implementation':42s} {'step ms (p50/p90)':>18s} {'index 100K ms':>14s} {'drafted/req':>12s} "
          f"{'matched/req':>12s}")
    for cls in impls:
        res = run_steps(cls(), wl, args.steps, args.max_tokens)
        idx_ms = index_cost(cls, corpus)
        print(f"{cls.name:42s} {res['step_ms']:8.3f} / {res['p90_ms']:7.3f} {idx_ms:14.1f} {res['drafted']:12.2f} "
              f"{res['matched']:12.2f}")
    print(f"{'target':42s} {TARGET_STEP_MS:8.3f}           {TARGET_INDEX_100K_MS:14.1f}")
    if SuffixDecodingCache is None:
        print("arctic-inference is not importable here (pip install arctic-inference; needs numpy): not compared")


if __name__ == "__main__":
    main()
