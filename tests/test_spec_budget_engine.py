"""The draft budget through the engine on the tiny checkpoint: greedy tokens stay exactly the plain ones (suffix,
MTP, hybrid; budget on and off), and where drafts never match, the budget cuts the drafted tokens per step far
below the fixed-k run's (spec counters in llm.stats()).

The trap prompts: a shuffle of the tokens the tiny model likes to emit, each once, and a suffix factor of 8, so
nearly every emitted token matches the prompt and the trees draft the 8 tokens after it with probability 1 --
confidently and wrongly. The tiny model's NextN layer (random weights) never predicts the next token either."""
from __future__ import annotations

import random
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine_checks import assert_pages_clean, reference_drafts
from model.builder import build_model
from model.config import load_model_config


KW = dict(device="cpu", kv_block_size=16, num_kv_blocks=64, max_model_len=512, max_num_batched_tokens=64)
CONFIGS = {
    "suffix": {"method": "suffix", "num_speculative_tokens": 8, "max_spec_factor": 8.0},
    "mtp": {"method": "mtp", "num_speculative_tokens": 3},
    "hybrid": {"method": "hybrid", "num_speculative_tokens": 8, "num_mtp_tokens": 3, "max_spec_factor": 8.0},
}
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_bf16):
    return LLM(str(tiny_bf16), **KW)


@pytest.fixture(scope="module")
def traps(plain) -> list[dict]:
    rng = random.Random(3)
    seeds = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(30)]} for _ in range(3)]
    outs = plain.generate(seeds, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    liked = sorted({t for o in outs for t in o.outputs[0].token_ids})
    prompts = []
    for i in range(2):
        order = liked[:]
        random.Random(i).shuffle(order)
        prompts.append({"prompt_token_ids": order})
    return prompts


def _tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def _run(llm: LLM, prompts: list[dict], sp: SamplingParams) -> tuple[list[list[int]], dict[str, float]]:
    before = llm.stats()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    after = llm.stats()
    delta = {k: after[k] - before[k] for k in ("spec_draft_tokens", "spec_accepted_tokens", "num_generated_tokens_total")}
    return _tokens(outs), delta


@pytest.mark.parametrize("method", list(CONFIGS))
def test_budget_cuts_rejected_drafts_and_keeps_greedy_tokens(tiny_bf16, plain, traps, method):
    fixed = LLM(str(tiny_bf16), speculative_config={**CONFIGS[method], "draft_budget": False}, **KW)
    budgeted = LLM(str(tiny_bf16), speculative_config=CONFIGS[method], **KW)
    assert budgeted.engine.drafter.budget is not None and fixed.engine.drafter.budget is None
    want = _tokens(plain.generate(traps, GREEDY, use_tqdm=False))
    got_fixed, fixed_stats = _run(fixed, traps, GREEDY)
    got, stats = _run(budgeted, traps, GREEDY)
    assert got_fixed == want and got == want
    # the trap works: at fixed k nearly every step drafts, and nearly nothing is accepted
    fixed_rate = fixed_stats["spec_draft_tokens"] / fixed_stats["num_generated_tokens_total"]
    assert fixed_rate >= 1.5, fixed_stats
    assert fixed_stats["spec_accepted_tokens"] <= 0.05 * fixed_stats["spec_draft_tokens"], fixed_stats
    # the budget: a few drafts to learn that (each source of a hybrid request on its own), then probes only
    rate = stats["spec_draft_tokens"] / stats["num_generated_tokens_total"]
    assert rate <= 0.5 and rate <= fixed_rate / 5, (stats, fixed_stats)
    assert stats["spec_draft_tokens"] > 0  # it did try (new requests draft, then probes)
    assert_pages_clean(budgeted.engine)


@pytest.mark.parametrize("method", ["suffix", "hybrid"])
def test_budget_drafts_again_when_text_turns_repetitive(tiny_bf16, plain, traps, method):
    # a request on a trap prompt whose output, from token M on, is already a finished response in the global
    # tree: its first M tokens reject every draft (held at 0 drafts, probed), then the global tree drafts it
    # exactly, and the budget must let the drafts back in
    prompt = traps[0]["prompt_token_ids"]
    n, m = 100, 30
    full = _tokens(plain.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=n,
                                                                                  ignore_eos=True), use_tqdm=False))[0]
    llm = LLM(str(tiny_bf16), speculative_config=CONFIGS[method], **KW)
    tail, _ = _run(llm, [{"prompt_token_ids": prompt + full[:m]}],
                   SamplingParams(temperature=0, max_tokens=n - m, ignore_eos=True))
    assert tail == [full[m:]]  # greedy decoding is deterministic here: the global tree now holds full[m:]
    budget = llm.engine.drafter.budget
    probes = budget.probes
    got, stats = _run(llm, [{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert got == [full]
    assert budget.probes > probes  # held at 0 drafts during the first M tokens, probed
    assert stats["spec_accepted_tokens"] >= 30, stats  # of the 70 repeated tokens
    assert_pages_clean(llm.engine)


def test_mtp_drafts_after_cut_chains_equal_the_full_recompute(tiny_bf16):
    # while the budget holds a request at 0 drafts only the NextN extend runs; the drafts of its later probes
    # must still be the full recompute's (the layer's KV stayed aligned)
    llm = LLM(str(tiny_bf16), speculative_config=CONFIGS["mtp"], kv_block_size=16, num_kv_blocks=48,
              max_model_len=512, max_num_batched_tokens=48, device="cpu")
    eng = llm.engine
    seen, real = [], eng.drafter.propose

    def propose(slots):
        out = real(slots)
        by_key = {r.seq_key: r for r in eng.scheduler.running}
        seen.extend((by_key[s.seq_id].prompt_token_ids + by_key[s.seq_id].output_token_ids, list(d))
                    for s, d in zip(slots, out))
        return out

    eng.drafter.propose = propose
    rng = random.Random(4)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(n)]} for n in (70, 5, 33)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    cfg = load_model_config(tiny_bf16)
    with torch.no_grad():
        ref_model = build_model(cfg, torch.device("cpu"), torch.float32, with_mtp=True, progress=False)
    held = 0
    checked = 0
    for tokens, draft in seen:
        held += not draft
        if draft and held:  # a draft after steps at 0 drafts
            assert draft == reference_drafts(ref_model, cfg, tokens, len(draft)), len(tokens)
            checked += 1
    # (held counts the empty proposals; once every request retired the idle drafter is not asked any more)
    assert held >= 15 and checked >= 3, (held, checked)


def test_step_timings_leave_out_the_callers_time_between_steps(tiny_bf16):
    """The wall-clock budget prices a decode step by the step() call that launched it: what the caller does
    between calls (a benchmark driver preparing its next turn) is no kind of step and must not inflate one."""
    llm = LLM(str(tiny_bf16), speculative_config=CONFIGS["suffix"], **KW)
    core = llm.engine
    calls: list[float] = []
    seen = []
    # the drafter's wall-clock model, spied on: each timing with the index of the step() call it came in
    core.drafter.observe_step = lambda t: seen.append((len(calls), t))
    core.add_request("r", list(range(10, 30)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        core.step()
        calls.append(1000 * (time.perf_counter() - t0))
        time.sleep(0.05)  # the caller's own work
    assert len(seen) >= 8 and all(t.num_seqs == 1 for _, t in seen)
    # each timing is within its own call, timed from outside; had the caller's 50 ms between calls been counted,
    # every timing would exceed its call by that much (a check that holds however loaded the machine is)
    assert all(0 < t.wall_ms <= calls[i] for i, t in seen), [(t.wall_ms, calls[i]) for i, t in seen]
    assert_pages_clean(core)
