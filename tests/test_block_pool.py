"""Page pool and prefix cache: invariants, LRU eviction, double free, chained hashes, scheduler rules."""
from __future__ import annotations

import pytest

from engine.block_pool import BlockPool, chain_hash
from engine.config import SchedulerConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def _req(rid: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, 0, tokens, SamplingParams(max_tokens=max_tokens), max_tokens)


def test_allocate_free_invariants_and_double_free():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert pool.num_used == 8 and pool.num_allocatable == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(1)
    pool.free(a)
    pool.check_invariants()
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(a)
    pool.free(b)
    assert pool.num_free == 8
    pool.check_invariants()


def test_reallocated_pages_come_back_ascending_and_adjacent():
    """A request frees tail first; the next request of the same size gets the same pages in ascending order
    (without sorting: descending), so runs of adjacent pages survive churn (one KV-transfer descriptor per run)."""
    pool = BlockPool(64, 16)
    first = pool.allocate(32)
    assert first == list(range(32))
    pool.free(first)
    rest = pool.allocate(32)  # the never-used pages 32..63 are older in the LRU
    again = pool.allocate(32)
    assert rest == list(range(32, 64)) and again == list(range(32))
    runs = 1 + sum(b != a + 1 for a, b in zip(again, again[1:]))
    assert runs == 1


def test_chained_hash_depends_on_parent():
    h1 = chain_hash(None, (1, 2))
    assert chain_hash(h1, (3, 4)) != chain_hash(chain_hash(None, (9, 9)), (3, 4))
    assert chain_hash(h1, (3, 4)) == chain_hash(chain_hash(None, (1, 2)), (3, 4))


def test_prefix_lookup_touch_and_lru_eviction():
    pool = BlockPool(4, 2)
    pages = pool.allocate(2)
    h0 = chain_hash(None, (1, 2))
    h1 = chain_hash(h0, (3, 4))
    pool.register(pages[0], h0, (1, 2))
    pool.register(pages[1], h1, (3, 4))
    pool.free(pages)
    assert pool.num_cached == 2 and pool.num_free == 2
    assert pool.lookup([h0, h1], [(1, 2), (3, 4)]) == pages
    assert pool.lookup([h0, h1], [(1, 2), (3, 5)]) == pages[:1]  # token check guards collisions
    pool.touch(pages[:1])
    assert pool.num_used == 1 and pool.num_cached == 1
    pool.free(pages[:1])
    # Allocating 3 pages uses the 2 never-filled pages first, then evicts the LRU cached page.
    got = pool.allocate(3)
    assert pool.num_cached == 1
    survivors = pool.lookup([h0, h1], [(1, 2), (3, 4)])
    assert survivors in ([], [pages[0]])
    pool.free(got)
    pool.check_invariants()


def _done(s: Scheduler, x) -> None:
    """What the engine does around a step: advance at launch, publish pages once tokens are known."""
    s.advance(x)
    s.publish_blocks(x.request)


def _sched(num_blocks=16, bs=4, budget=8, max_seqs=8, prefix=True):
    pool = BlockPool(num_blocks, bs, prefix)
    return Scheduler(SchedulerConfig(budget, max_seqs, 1024), pool), pool


def test_chunking_splits_long_prompts_and_mixes_with_decode():
    s, pool = _sched(budget=8)
    r1 = _req("a", list(range(20)))
    s.add(r1)
    out = s.schedule()
    assert [(x.start, x.num_tokens) for x in out.scheduled] == [(0, 8)] and not out.scheduled[0].samples
    _done(s, out.scheduled[0])
    r2 = _req("b", list(range(100, 103)))
    s.add(r2)
    out = s.schedule()  # running chunk first (8), no budget left for b
    assert [(x.request.request_id, x.num_tokens) for x in out.scheduled] == [("a", 8)]
    _done(s, out.scheduled[0])
    out = s.schedule()
    assert [(x.request.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("a", 16, 4), ("b", 0, 3)]
    assert all(x.samples for x in out.scheduled)
    pool.check_invariants()


def test_full_prompt_hit_recomputes_last_token():
    s, pool = _sched(budget=64)
    r1 = _req("a", list(range(8)))
    s.add(r1)
    out = s.schedule()
    _done(s, out.scheduled[0])
    s.finish(r1, "stop")
    assert pool.num_cached == 2
    r2 = _req("b", list(range(8)))
    s.add(r2)
    out = s.schedule()
    x = out.scheduled[0]
    assert (x.start, x.num_tokens) == (4, 4)  # page 2 holds the last token: it is recomputed
    assert r2.num_cached_tokens == 4
    _done(s, x)
    s.finish(r2, "stop")
    pool.check_invariants()


def test_preempts_newest_when_pages_run_out():
    s, pool = _sched(num_blocks=4, bs=4, budget=64)
    a, b = _req("a", list(range(7))), _req("b", list(range(50, 57)))
    s.add(a)
    s.add(b)
    out = s.schedule()
    for x in out.scheduled:
        _done(s, x)
        x.request.output_token_ids.append(1)
    # a and b each hold 2 pages; a's 9th token needs a 3rd page -> b (newest) is preempted
    for _ in range(2):
        a.output_token_ids.append(1)
        out = s.schedule()
        for x in out.scheduled:
            _done(s, x)
    assert s.num_preemptions >= 1 and b.num_computed_tokens == 0 and not b.block_ids
    assert b in s.waiting
    pool.check_invariants()


def test_max_num_seqs():
    s, _ = _sched(max_seqs=2, budget=64)
    for i in range(4):
        s.add(_req(str(i), [i + 1, i + 2]))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 2
