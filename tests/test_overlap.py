"""Overlap scheduling (step N+1 planned and launched before step N's tokens reach the host) must give
exactly the outputs of the synchronous loop: same tokens, stops, lengths, logprobs, page accounting."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine_checks import assert_pages_clean


@pytest.fixture(scope="module")
def pair(tiny_bf16):
    kw = dict(device="cpu", kv_block_size=16, num_kv_blocks=24, max_model_len=256, max_num_batched_tokens=48)
    return LLM(str(tiny_bf16), overlap_scheduling=False, **kw), LLM(str(tiny_bf16), overlap_scheduling=True, **kw)


def _compare(pair, prompts, params):
    sync, ovl = pair
    a = sync.generate(prompts, params, use_tqdm=False)
    b = ovl.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        for cx, cy in zip(x.outputs, y.outputs):
            assert (cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == (
                cy.token_ids, cy.text, cy.finish_reason, cy.stop_reason)
            if cx.logprobs is not None:
                assert [list(d) for d in cx.logprobs] == [list(d) for d in cy.logprobs]
    assert_pages_clean(sync.engine)
    assert_pages_clean(ovl.engine)
    return a


def test_greedy_mixed_batch_with_chunking_and_preemption(pair):
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(0, 1470) for _ in range(rng.randint(2, 120))]} for _ in range(12)]
    _compare(pair, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert pair[1].stats()["num_preemptions"] > 0


def test_stops_lengths_and_min_tokens(pair):
    base = pair[0].generate("overlap stops", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    stop_tok = base.token_ids[5]
    stop_str = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    prompts = ["overlap stops"] * 3
    params = [
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok]),
        SamplingParams(temperature=0, max_tokens=16, stop=[stop_str], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, min_tokens=3, ignore_eos=True),
    ]
    outs = _compare(pair, prompts, params)
    assert len(outs[2].outputs[0].token_ids) == 7


def test_sampling_seeds_penalties_logprobs_n(pair):
    params = [
        SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.2),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1),
    ]
    _compare(pair, ["seeded", "penalized", "prompt logprobs here"], params)


def test_abort_in_flight_frees_pages(pair):
    eng = pair[1].engine
    eng.add_request("a", list(range(10, 40)), SamplingParams(max_tokens=30, ignore_eos=True))
    eng.add_request("b", list(range(50, 70)), SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(3):
        eng.step()
        assert eng._inflight is not None  # a step is always in flight between calls
    eng.abort_request("a")
    finished = set()
    for _ in range(60):
        finished |= {d.request_id for d in eng.step() if d.finished}
        if not eng.has_unfinished_requests():
            break
    assert finished == {"a", "b"}
    assert_pages_clean(eng)
