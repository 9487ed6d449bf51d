"""The compiled suffix index (spec.suffix_index) against its plain-Python reference (spec.suffix_reference),
hand-worked drafts, tenant scope and the global token bound, argument errors, and a differential test of
simulated acceptance against Arctic Inference's SuffixDecodingCache."""
from __future__ import annotations

import array
import random

import pytest

from bench.suffix_cost import code_corpus, edit_episode
from spec.suffix_index import SuffixDraft, SuffixIndex
from spec.suffix_reference import ReferenceSuffixIndex


def _stream(rng: random.Random, base: list[int], vocab: int, n: int, p_copy: float) -> list[int]:
    """Random tokens mixed with copied runs of `base` (repetition, like code and edits)."""
    out: list[int] = []
    while len(out) < n:
        if rng.random() < p_copy:
            i = rng.randrange(len(base))
            out += base[i : i + rng.randrange(1, 40)]
        else:
            out.append(rng.randrange(vocab))
    return out[:n]


def _drive(seed: int, depth: int, vocab: int, max_global: int, factor: float, min_prob: float,
           steps: int = 250) -> int:
    """Random start/extend/stop/speculate traffic on both indexes; every draft must be equal. Returns the
    number of non-empty drafts compared."""
    rng = random.Random(seed)
    # Rebuild global trees as soon as allowed, one response per stop(), so that evictions meet rebuilds midway.
    fast = SuffixIndex(depth, max_global, compact_min=1, compact_rate=0, compact_step=1)
    ref = ReferenceSuffixIndex(depth, max_global)
    base = [rng.randrange(vocab) for _ in range(150)]
    active: list[int] = []
    next_id, nonempty = 0, 0
    for _ in range(steps):
        r = rng.random()
        if (r < 0.08 or not active) and len(active) < 5:
            tenant = rng.choice(["", "a", "b"])
            prompt = _stream(rng, base, vocab, rng.randrange(0, 80), 0.6)
            fast.start(next_id, prompt, tenant)
            ref.start(next_id, prompt, tenant)
            active.append(next_id)
            next_id += 1
        elif r < 0.14:
            sid = active.pop(rng.randrange(len(active)))
            keep = rng.random() < 0.85
            fast.stop(sid, keep)
            ref.stop(sid, keep)
            for tenant in (None, "", "a", "b"):
                assert fast.num_global_tokens(tenant) == ref.num_global_tokens(tenant)
        else:
            sid = rng.choice(active)
            toks = _stream(rng, base, vocab, rng.randrange(1, 5), 0.6)
            fast.extend(sid, toks)
            ref.extend(sid, toks)
            k = rng.choice([0, 1, 3, 16])
            got = fast.speculate(sid, k, factor, min_prob)
            want = ref.speculate(sid, k, factor, min_prob)
            assert got == want, (seed, sid, got, want)
            nonempty += bool(got.tokens)
    return nonempty


@pytest.mark.parametrize("depth,vocab,seeds", [(3, 3, 4), (8, 4, 4), (16, 12, 3), (64, 40, 1)])
def test_matches_reference(depth: int, vocab: int, seeds: int) -> None:
    nonempty = 0
    for seed in range(seeds):
        for max_global in (0, 40, 250, 1 << 20):
            factor = [100.0, 0.5, 2.0, 1.0][(seed + max_global) % 4]
            min_prob = [0.1, 0.0, 0.3, 0.1][seed]
            nonempty += _drive(seed * 131 + depth, depth, vocab, max_global, factor, min_prob)
    assert nonempty > 100 * seeds  # the comparison is not between empty drafts


def test_long_sequences_match_reference() -> None:
    """Past the core's 32K-element storage blocks and several hash-table growths (local and global trees)."""
    rng = random.Random(7)
    base = [rng.randrange(50) for _ in range(400)]
    fast, ref = SuffixIndex(4, 1 << 20), ReferenceSuffixIndex(4, 1 << 20)
    for sid in range(2):
        toks = _stream(rng, base, 50, 20_000, 0.5)
        for idx in (fast, ref):
            idx.start(sid, toks[:15_000])
            idx.extend(sid, toks[15_000:])
        for _ in range(30):
            k = rng.choice([1, 3])
            assert fast.speculate(sid, k, 1.0, 0.0) == ref.speculate(sid, k, 1.0, 0.0)
            t = rng.randrange(50)
            fast.extend(sid, [t])
            ref.extend(sid, [t])
        fast.stop(sid)
        ref.stop(sid)
    probe = _stream(rng, base, 50, 40, 0.9)
    fast.start(9, probe)
    ref.start(9, probe)
    assert fast.num_global_tokens() == ref.num_global_tokens() > 10_000
    assert fast.speculate(9, 3, 1.0, 0.0) == ref.speculate(9, 3, 1.0, 0.0)


def test_hand_worked_local_draft() -> None:
    idx = SuffixIndex(max_depth=64, max_global_tokens=0)
    idx.start(7, [1, 2, 3, 1, 2, 3, 1, 2])
    # The last 5 tokens (1 2 3 1 2) occurred once before, followed by 3 1 2: probability 1 each (the query's
    # own occurrence is not counted). Lengths 1..4 draft the same, and the longer match wins the tie; length
    # 6 (3 1 2 3 1 2) only occurs as the query itself.
    assert idx.speculate(7, 8) == SuffixDraft([3, 1, 2], 3.0, 5, [1.0, 1.0, 1.0])
    assert idx.speculate(7, 2) == SuffixDraft([3, 1], 2.0, 5, [1.0, 1.0])
    # The budget is min(max_tokens, floor(factor * m)): factor 0.2 allows 1 token at m = 5.
    assert idx.speculate(7, 8, max_spec_factor=0.2) == SuffixDraft([3], 1.0, 5, [1.0])
    assert idx.speculate(7, 0) == SuffixDraft([], 0.0, 0, [])


def test_ties_local_first_global_latest() -> None:
    idx = SuffixIndex(max_depth=8, max_global_tokens=100)
    # Local: after 7 came 1 (first) and 2 (later), once each: the first occurrence wins, p = 1/2.
    idx.start(0, [7, 1, 7, 2, 7])
    assert idx.speculate(0, 4) == SuffixDraft([1], 0.5, 1, [0.5])
    idx.stop(0, keep_response=False)
    # Global: two finished responses continue 7 differently; the most recent one wins.
    for sid, resp in ((1, [7, 1]), (2, [7, 2])):
        idx.start(sid, [])
        idx.extend(sid, resp)
        idx.stop(sid)
    idx.start(3, [9, 7])
    assert idx.speculate(3, 4) == SuffixDraft([2], 0.5, 1, [0.5])
    # Frequency beats recency: a second response continuing 7 with 1.
    idx.start(4, [])
    idx.extend(4, [7, 1])
    idx.stop(4)
    idx.start(5, [9, 7])
    assert idx.speculate(5, 4).tokens == [1]


def _finish(idx: SuffixIndex, sid: int, prompt: list[int], response: list[int], tenant: str = "",
            keep: bool = True) -> None:
    idx.start(sid, prompt, tenant)
    idx.extend(sid, response)
    idx.stop(sid, keep)


def test_tenant_scope_and_global_off() -> None:
    idx = SuffixIndex(max_depth=16, max_global_tokens=1000)
    _finish(idx, 1, [100, 101], [5, 6, 7, 8, 9, 10], tenant="A")
    assert idx.num_global_tokens("A") == 6 and idx.num_global_tokens("B") == 0 and idx.num_global_tokens() == 6
    idx.start(2, [5, 6], tenant="B")
    assert idx.speculate(2, 8) == SuffixDraft([], 0.0, 0, [])  # A's response never reaches B
    idx.start(3, [5, 6], tenant="A")
    assert idx.speculate(3, 8).tokens == [7, 8]  # budget floor(1.0 * 2)
    assert idx.speculate(3, 8, max_spec_factor=4.0).tokens == [7, 8, 9, 10]
    # The prompt never joins the global tree, only the response.
    idx.start(4, [100], tenant="A")
    assert idx.speculate(4, 8).tokens == []

    off = SuffixIndex(max_depth=16, max_global_tokens=0)
    _finish(off, 1, [1], [5, 6, 7, 8])
    assert off.num_global_tokens() == 0
    off.start(2, [5, 6])
    assert off.speculate(2, 8).tokens == []


def test_token_bound_evicts_oldest() -> None:
    idx = SuffixIndex(max_depth=16, max_global_tokens=10)
    _finish(idx, 1, [], [11, 12, 13, 14], tenant="A")
    _finish(idx, 2, [], [21, 22, 23, 24], tenant="B")
    assert idx.num_global_tokens() == 8
    _finish(idx, 3, [], [31, 32, 33, 34], tenant="A")  # 12 > 10: the oldest (tenant A's first) goes
    assert (idx.num_global_tokens("A"), idx.num_global_tokens("B"), idx.num_global_tokens()) == (4, 4, 8)
    idx.start(10, [11, 12], tenant="A")
    assert idx.speculate(10, 4).tokens == []
    idx.start(11, [31, 32], tenant="A")
    assert idx.speculate(11, 4).tokens == [33, 34]
    idx.start(12, [21, 22], tenant="B")
    assert idx.speculate(12, 4).tokens == [23, 24]
    _finish(idx, 4, [], list(range(50, 61)))  # longer than the bound: not kept, nothing evicted
    _finish(idx, 5, [], [41, 42, 43], keep=False)  # not kept
    assert idx.num_global_tokens() == 8


def test_inputs_and_batches() -> None:
    a, b = SuffixIndex(max_depth=8), SuffixIndex(max_depth=8)
    prompt = [3, 4, 5, 3, 4, 6, 3, 4]
    a.start(1, prompt)
    b.start(1, array.array("i", prompt))
    a.start(2, [9, 9, 9])
    b.start(2, array.array("q", [9, 9, 9]))
    a.extend(1, [5])
    a.extend(2, [9])
    b.extend_batch([1, 2], [[5], (9,)])
    assert a.num_tokens(1) == b.num_tokens(1) == 9 and 2 in b and 3 not in b
    assert a.speculate_batch([1, 2], [4, 4], 1.0, 0.1) == b.speculate_batch([1, 2], 4, 1.0, 0.1)
    with pytest.raises(ValueError):  # one bad entry: nothing is appended
        b.extend_batch([1, 99], [[3], [3]])
    assert b.num_tokens(1) == 9


def test_errors() -> None:
    idx = SuffixIndex(max_depth=8)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            SuffixIndex(max_depth=bad)
    with pytest.raises(ValueError):
        SuffixIndex(max_global_tokens=-1)
    idx.start(1, [1, 2])
    with pytest.raises(ValueError, match="already active"):
        idx.start(1, [1])
    for call in (lambda: idx.extend(5, [1]), lambda: idx.speculate(5, 4), lambda: idx.stop(5),
                 lambda: idx.speculate_batch([1, 5], [4, 4], 1.0, 0.1)):
        with pytest.raises(ValueError, match="unknown seq_id"):
            call()
    with pytest.raises(ValueError):
        idx.extend(1, [-3])
    with pytest.raises(ValueError):
        idx.extend(1, [2**31])
    with pytest.raises(TypeError):
        idx.extend(1, [1.5])
    with pytest.raises(ValueError):
        idx.speculate(1, -1)
    with pytest.raises(ValueError):
        idx.speculate(1, 4, min_token_prob=1.5)
    with pytest.raises(ValueError):
        idx.speculate(1, 4, max_spec_factor=-1.0)
    with pytest.raises(TypeError):
        idx.start(2, [1], tenant=3)  # type: ignore[arg-type]
    assert idx.num_tokens(1) == 2  # failed calls changed nothing
    idx.stop(1)
    idx.start(1, [4])  # a stopped seq_id can be reused
    assert idx.num_tokens(1) == 1


# --- differential test against Arctic Inference --------------------------------------------------------------


def _episodes(seed: int, n: int, files: list[list[int]], newlines: frozenset[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) pairs: a file and an edit of it (agentic rewrite), or a file and an unrelated file."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        f, other = rng.choice(files)[:700], rng.choice(files)
        out.append((f, edit_episode(rng, f, other, newlines) if i % 2 == 0 else other[:500]))
    return out


def _accepted(draft: list[int], truth: list[int]) -> int:
    n = 0
    for d, t in zip(draft, truth):
        if d != t:
            break
        n += 1
    return n


def _simulate(make, train, test, max_tokens: int, factor: float, min_prob: float) -> int:
    """Teacher-forced: at every position of each held-out response draft, count the draft tokens that match
    the true continuation, then append the true token. Returns the total over all positions."""
    impl = make()
    for j, (p, r) in enumerate(train):
        impl.finished(j, p, r)
    total = 0
    for k, (p, r) in enumerate(test):
        sid = 1000 + k
        impl.start(sid, p)
        for i in range(len(r)):
            total += _accepted(impl.draft(sid, max_tokens, factor, min_prob), r[i:])
            impl.append(sid, r[i])
        impl.stop(sid)
    return total


class _Ours:
    def __init__(self) -> None:
        self.idx = SuffixIndex(max_depth=64)

    def finished(self, sid, p, r):
        _finish(self.idx, sid, p, r)

    def start(self, sid, p):
        self.idx.start(sid, p)

    def draft(self, sid, k, f, mp):
        return self.idx.speculate(sid, k, f, mp).tokens

    def append(self, sid, t):
        self.idx.extend(sid, [t])

    def stop(self, sid):
        self.idx.stop(sid)


class _Arctic:
    def __init__(self, cache_cls) -> None:
        self.cache = cache_cls(max_tree_depth=64, max_cached_requests=-1)
        self.seqs: dict[int, list[int]] = {}

    def finished(self, sid, p, r):
        self.cache.start_request(sid, p)
        self.cache.add_active_response(sid, r)
        self.cache.stop_request(sid)

    def start(self, sid, p):
        self.cache.start_request(sid, p)
        self.seqs[sid] = list(p)

    def draft(self, sid, k, f, mp):
        d = self.cache.speculate(sid, self.seqs[sid][-64:], max_spec_tokens=k, max_spec_factor=f, min_token_prob=mp)
        return d.token_ids

    def append(self, sid, t):
        self.cache.add_active_response(sid, [t])
        self.seqs[sid].append(t)

    def stop(self, sid):
        self.cache.stop_request(sid)


def test_acceptance_not_below_arctic() -> None:
    suffix_decoding = pytest.importorskip(
        "arctic_inference.suffix_decoding",
        reason="arctic-inference is not installed (its sdist build pulls a CUDA torch, so it is not a dev extra)",
    )
    corpus = code_corpus(max_files=120)
    files = [f for f in corpus.files if len(f) >= 400]
    train = _episodes(1, 24, files, corpus.newlines)
    test = _episodes(2, 4, files, corpus.newlines)
    for max_tokens, factor, min_prob in ((16, 1.0, 0.1), (4, 1.0, 0.1), (16, 2.0, 0.1), (8, 1.0, 0.3)):
        ours = _simulate(_Ours, train, test, max_tokens, factor, min_prob)
        theirs = _simulate(lambda: _Arctic(suffix_decoding.SuffixDecodingCache), train, test, max_tokens, factor,
                           min_prob)
        assert theirs > 0
        assert ours >= theirs, (max_tokens, factor, min_prob, ours, theirs)
