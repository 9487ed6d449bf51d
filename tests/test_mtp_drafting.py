"""MTP (NextN) drafting through the engine: the drafts equal an independent full recompute of the NextN chain
from the whole sequence (so the layer's incremental KV stays aligned with the accepted tokens through chunked
prefill, verify steps and rollbacks); greedy and seeded outputs equal plain decoding under chunked prefill,
preemption, prefix hits and n > 1; the NextN KV goes back with the request's pages; a checkpoint without an
MTP layer is a clear error."""
from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.engine_core import IDLE_TIMING_EVERY
from engine.mtp_graphs import MtpDraftGraphs
from spec import DraftSlot, MtpCalls, MtpDrafter, StepCost, StepView
from engine_checks import assert_pages_clean, reference_drafts
from model.builder import build_model
from model.config import load_model_config
from model.tiny import write_tiny_checkpoint

KW = dict(device="cpu", kv_block_size=16, num_kv_blocks=48, max_model_len=512, max_num_batched_tokens=48)
MTP = {"method": "mtp", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def mtp(tiny_bf16):
    return LLM(str(tiny_bf16), speculative_config=MTP, **KW)


def with_draft_graphs(llm: LLM) -> list[int]:
    """Give the engine the MTP draft graphs' code path (static buffers, padding-first layout, in-graph chain)
    run eagerly: CUDA graphs need a GPU, the layout and the chain are what can go wrong. Returns a list that
    counts the draft-graph runs."""
    cfg, w = llm.config, llm.engine.worker
    graphs = MtpDraftGraphs(
        w.model, w.runner.kv_caches, w.device, 8, cfg.scheduler.max_model_len, cfg.cache.block_size,
        cfg.speculative.mtp_chain_length, cfg.speculative.num_speculative_tokens, cfg.model.hidden_size,
        cfg.torch_dtype, replay=False,
    )
    runs: list[int] = []
    real = graphs.run

    def run(batch, hidden):
        runs.append(len(batch.seq_lens))
        return real(batch, hidden)
    graphs.run = run
    w.runner.mtp_graphs = graphs
    return runs


@pytest.fixture(scope="module")
def mtp_graphed(tiny_bf16):
    llm = LLM(str(tiny_bf16), speculative_config=MTP, **KW)
    llm.graph_runs = with_draft_graphs(llm)
    return llm


@pytest.fixture(scope="module")
def plain(tiny_bf16):
    return LLM(str(tiny_bf16), **KW)


@pytest.mark.parametrize("engine_name", ["mtp", "mtp_graphed"])
def test_drafts_equal_full_recompute_of_the_nextn_chain(tiny_bf16, engine_name, request, monkeypatch):
    mtp = request.getfixturevalue(engine_name)
    cfg = load_model_config(tiny_bf16)
    ref_model = build_model(cfg, torch.device("cpu"), torch.float32, with_mtp=True, progress=False)
    eng = mtp.engine
    seen: list[tuple[list[int], list[int]]] = []
    real = eng.drafter.propose

    def propose(slots):
        out = real(slots)
        by_key = {r.seq_key: r for r in eng.scheduler.running}
        for slot, draft in zip(slots, out):
            req = by_key[slot.seq_id]
            seen.append((req.prompt_token_ids + req.output_token_ids, list(draft)))
        return out

    monkeypatch.setattr(eng.drafter, "propose", propose)
    monkeypatch.setattr(eng.drafter, "budget", None)  # fixed k: every step drafts (cut chains: test_spec_budget_engine)
    rng = random.Random(4)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(n)]} for n in (70, 5, 33)]  # 70: 2 chunks
    mtp.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert len(seen) >= 20
    checked = 0
    for tokens, draft in seen[::3]:
        assert draft == reference_drafts(ref_model, cfg, tokens, len(draft)), len(tokens)
        checked += bool(draft)
    assert checked >= 5
    assert_pages_clean(eng)
    if engine_name == "mtp_graphed":  # decode and verify steps drafted through the graph path (prefill chunks
        assert len(mtp.graph_runs) >= 10  # eagerly), batches of up to 3 requests padded to a bucket of 4
        assert max(mtp.graph_runs) == 3


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert (cx.token_ids, cx.text, cx.finish_reason) == (cy.token_ids, cy.text, cy.finish_reason)


@pytest.mark.parametrize("engine_name", ["mtp", "mtp_graphed"])
def test_mtp_greedy_and_seeded_identity_chunking_preemption_prefix_hits(plain, engine_name, request):
    mtp = request.getfixturevalue(engine_name)
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(rng.randint(5, 100))]} for _ in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    _same(plain.generate(prompts, greedy, use_tqdm=False), mtp.generate(prompts, greedy, use_tqdm=False))
    hits = mtp.stats()["prefix_cache_hit_tokens"]
    seeded = [SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=40, ignore_eos=True)] * len(prompts)
    _same(plain.generate(prompts, seeded, use_tqdm=False), mtp.generate(prompts, seeded, use_tqdm=False))
    stats = mtp.stats()
    assert stats["prefix_cache_hit_tokens"] > hits and stats["num_preemptions"] > 0
    assert stats["spec_draft_tokens"] > 0
    assert_pages_clean(mtp.engine)
    assert engine_name == "mtp" or mtp.graph_runs


def test_checkpoint_without_mtp_layer_is_a_clear_error(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "no_mtp", fmt="bf16", num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP"):
        LLM(str(path), device="cpu", speculative_config=MTP)


@pytest.mark.parametrize("graphed", [False, True])
def test_hybrid_uses_both_sources_in_one_batch_and_keeps_plain_tokens(tiny_bf16, plain, graphed):
    hybrid = LLM(str(tiny_bf16), speculative_config={"method": "hybrid", "num_speculative_tokens": 8,
                                                     "num_mtp_tokens": 2}, **KW)
    runs = with_draft_graphs(hybrid) if graphed else [0]
    rng = random.Random(6)
    repetitive = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(8)] * 5} for _ in range(2)]
    fresh = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(30)]} for _ in range(2)]
    sp = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    _same(plain.generate(repetitive + fresh, sp, use_tqdm=False), hybrid.generate(repetitive + fresh, sp, use_tqdm=False))
    proposed = hybrid.engine.drafter.proposed
    assert proposed["suffix"] > 0 and proposed["mtp"] > 0, proposed
    assert hybrid.stats()["spec_accepted_tokens"] > 0
    assert_pages_clean(hybrid.engine)
    assert runs


def test_hybrid_skips_the_mtp_chain_where_it_does_not_pay(tiny_bf16, plain):
    """With draft graphs the chain is paid once per step: priced high, hybrid takes suffix drafts where it has
    them and most steps replay the NextN extend alone; priced near zero, MTP drafts often. Tokens stay plain."""
    rng = random.Random(8)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(8)] * 5} for _ in range(2)]
    prompts += [{"prompt_token_ids": [rng.randrange(1400) for _ in range(30)]} for _ in range(2)]
    sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    want = plain.generate(prompts, sp, use_tqdm=False)
    proposed, chained = {}, {}
    for price in (1e-4, 1e4):
        # the GPU price alone (no wall-clock learning, no retirement: CPU step times would decide instead)
        hybrid = LLM(str(tiny_bf16), speculative_config={"method": "hybrid", "num_speculative_tokens": 8,
                                                         "num_mtp_tokens": 2, "measure_wall_clock": False,
                                                         "mtp_retire_steps": 0}, **KW)
        with_draft_graphs(hybrid)
        graphs, budget = hybrid.engine.worker.runner.mtp_graphs, hybrid.engine.drafter.budget
        budget.chain_step_ms, budget.chain_fixed = 0.0, StepCost([1], [price])  # as measured_step_costs gives
        budget.clock.chain_prior = budget.chain_fixed
        drafting = []
        real = graphs.run
        graphs.run = lambda batch, hidden: drafting.append(max(batch.max_drafts) > 0) or real(batch, hidden)
        _same(want, hybrid.generate(prompts, sp, use_tqdm=False))
        proposed[price], chained[price] = hybrid.engine.drafter.proposed["mtp"], sum(drafting) / len(drafting)
        assert_pages_clean(hybrid.engine)
    assert proposed[1e-4] > 3 * proposed[1e4], (proposed, chained)
    assert chained[1e4] < 0.5 * chained[1e-4], chained


@pytest.mark.parametrize("limits", [(3, 2, 3), (0, 0, 0)], ids=["chain", "extend-alone"])
def test_draft_graph_layout_equals_the_eager_chain(tiny_bf16, limits, monkeypatch):
    """The graph path's padding-first layout against the eager extend + chain, on one batch of requests that
    kept 1, 3 and 4 positions (padded to 4 rows) with different draft limits: the same drafts and the same
    NextN KV afterwards (pages past a request's limit untouched). With every limit 0 the graph path runs the
    extend alone: no LM head, no chain."""
    llm = LLM(str(tiny_bf16), speculative_config=MTP, **KW)
    cfg, w = llm.config, llm.engine.worker
    nextn = cfg.model.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    views, row, page = [], 0, 1
    for seq_id, (start, kept, limit) in enumerate(zip((40, 17, 60), (1, 3, 4), limits)):
        pages = -(-(start + kept + 3) // 16)
        views.append(StepView(seq_id=seq_id, start=start,
                              next_tokens=torch.randint(0, 1400, (kept,), generator=gen).tolist(),
                              hidden_rows=list(range(row, row + kept)), block_table=list(range(page, page + pages)),
                              max_drafts=limit))
        row, page = row + kept, page + pages
    w.runner.target_hidden = torch.randn(row, cfg.model.hidden_size, generator=gen)
    cache = w.runner.kv_caches[nextn]
    for t in cache:
        t.copy_(torch.randn(t.shape, generator=gen))
    before = [t.clone() for t in cache]
    slots = [DraftSlot(v.seq_id, 3) for v in views]

    eager = MtpDrafter(cfg.speculative, 16, MtpCalls(w.execute_mtp))
    eager.after_step(views)
    want, want_kv = eager.propose(slots), [t.clone() for t in cache]
    for t, b in zip(cache, before):
        t.copy_(b)
    runs = with_draft_graphs(llm)
    graphed = MtpDrafter(cfg.speculative, 16, MtpCalls(w.execute_mtp, w.mtp_graph_rows, w.execute_mtp_draft))
    heads = []
    real_head = w.model.compute_logits
    monkeypatch.setattr(w.model, "compute_logits", lambda h: heads.append(len(h)) or real_head(h))
    graphed.after_step(views)
    got = graphed.propose(slots)
    assert runs == [3]
    assert [len(d) for d in want] == list(limits)
    assert got == want
    assert len(heads) == (3 if any(limits) else 0)  # first draft + 2 chain steps, or none
    for t, ref, b in zip(cache, want_kv, before):
        assert torch.allclose(t, ref, atol=1e-5)
        assert not torch.equal(t, b)  # the extend wrote something


@pytest.mark.parametrize("method", ["mtp", "hybrid"])
def test_requests_retired_from_mtp_decode_plainly_overlapped_with_plain_tokens(tiny_bf16, plain, method):
    """Rows priced so that no draft pays: every request is held at 0 MTP drafts, retires after 3 steps, and
    from then on its steps keep no hidden states, run no NextN work and overlap (overlap scheduling on).
    The tokens stay the plain engine's; a request's NextN layer is never run again once retired."""
    spec = {"method": method, "num_speculative_tokens": 3, "mtp_retire_steps": 3, "measure_wall_clock": False,
            "step_cost_rows": [1, 2], "step_cost_ms": [1.0, 1000.0], "probe_interval": 8}
    if method == "hybrid":
        spec.update(num_speculative_tokens=8, num_mtp_tokens=3)
    llm = LLM(str(tiny_bf16), speculative_config=spec, overlap_scheduling=True, **KW)
    rng = random.Random(11)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(30)]} for _ in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    mtp_rows: list[int] = []
    real = llm.engine.worker.execute_mtp
    drafter = llm.engine.drafter
    target = drafter.mtp if method == "hybrid" else drafter
    target.run = lambda batch: mtp_rows.append(max(batch.positions)) or real(batch)
    _same(plain.generate(prompts, sp, use_tqdm=False), llm.generate(prompts, sp, use_tqdm=False))
    assert target.num_retired == len(prompts)
    stats = llm.stats()
    assert stats["num_overlapped_steps"] > 20, stats["num_overlapped_steps"]
    assert stats["spec_mtp_retired_requests"] == len(prompts)
    # the NextN layer ran over the prompts and the first steps only: never near the end of the 40 tokens
    assert mtp_rows and max(mtp_rows) < 30 + 10, max(mtp_rows)
    assert_pages_clean(llm.engine)


def test_the_engine_times_its_decode_steps_for_the_wall_clock(tiny_bf16, plain):
    """On CPU the budget keeps its configured costs (deterministic tests); turned on, the engine feeds it the
    decode-only step cycles: every MTP chain step, and once every request retired (the drafter idle) one plain
    overlapped step in IDLE_TIMING_EVERY."""
    spec = {"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 3, "probe_interval": 8,
            "step_cost_rows": [1, 2], "step_cost_ms": [1.0, 1000.0]}
    llm = LLM(str(tiny_bf16), speculative_config=spec, overlap_scheduling=True, **KW)
    clock = llm.engine.drafter.budget.clock
    assert not clock.enabled
    clock.enabled = True
    rng = random.Random(12)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(30)]} for _ in range(3)]
    sp = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    _same(plain.generate(prompts, sp, use_tqdm=False), llm.generate(prompts, sp, use_tqdm=False))
    learnt = clock.snapshot()
    assert learnt["plain"], learnt  # retired requests' overlapped steps
    assert 160 // IDLE_TIMING_EVERY - 5 <= clock.observed <= 160 // IDLE_TIMING_EVERY + 5, clock.observed
    assert all(v > 0 for d in learnt.values() for v in d.values())


def test_an_idle_drafter_gets_no_per_step_calls(tiny_bf16, plain, monkeypatch):
    """Once every request retired from MTP the engine skips the drafter's per-step hooks and its per-token
    `accepted`, so a retired request's step costs what a plain engine's does (session 16: +7.7% TPOT at batch 1
    on the H200 otherwise); tokens stay the plain greedy ones and no draft is verified again after the retirement."""
    spec = {"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 3,
            "step_cost_rows": [1, 2], "step_cost_ms": [1.0, 1000.0]}  # the chain never pays: every request retires
    llm = LLM(str(tiny_bf16), speculative_config=spec, overlap_scheduling=True, **KW)
    drafter = llm.engine.drafter
    calls = {"propose": 0, "wants_sync": 0, "accepted": 0, "steps_while_idle": 0}
    for name in ("propose", "wants_sync", "accepted"):
        real = getattr(drafter, name)

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)
        monkeypatch.setattr(drafter, name, counted)
    step = llm.engine.step

    def counting_step():
        calls["steps_while_idle"] += drafter.idle
        return step()
    monkeypatch.setattr(llm.engine, "step", counting_step)
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(30)]} for _ in range(2)]
    sp = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    _same(plain.generate(prompts, sp, use_tqdm=False), llm.generate(prompts, sp, use_tqdm=False))
    stats = llm.stats()
    assert stats["spec_mtp_retired_requests"] == 2
    assert calls["steps_while_idle"] > 100  # most of the run
    assert calls["propose"] + calls["wants_sync"] < 20  # only before the retirement
    assert 0 < calls["accepted"] < 40  # per request and step until the retirement (both requests: 2 per step)
    assert stats["num_overlapped_steps"] > 100
