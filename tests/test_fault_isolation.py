"""One request's failure inside the engine fails that request only: a fault injected at each per-request
stage (drafting, sampling, a request whose parameters slipped past validation, detokenizing, stop checks)
ends it with finish_reason "error" and its pages freed, while the other requests in the same steps give
exactly the tokens they give alone, and the engine keeps serving."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.sampler import Sampler
from engine.stop_strings import StopStringMatcher
from engine_checks import assert_pages_clean

KW = dict(device="cpu", kv_block_size=16, num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=64)
GOOD = [{"prompt_token_ids": list(range(40, 80))}, {"prompt_token_ids": [7, 8, 9] * 10}]
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
BAD_PROMPT = {"prompt_token_ids": list(range(300, 340))}


@pytest.fixture(scope="module")
def llm(tiny_bf16):
    return LLM(str(tiny_bf16), speculative_config={"method": "suffix", "num_speculative_tokens": 4}, **KW)


@pytest.fixture(scope="module")
def expected(llm):
    return [o.outputs[0].token_ids for o in llm.generate(GOOD, GREEDY, use_tqdm=False)]


def _drafting(monkeypatch, llm):
    real = llm.engine.drafter.propose
    bad_key = {}

    def propose(slots):
        if any(s.seq_id == bad_key.get("k") for s in slots):
            raise RuntimeError("injected drafter fault")
        return real(slots)

    monkeypatch.setattr(llm.engine.drafter, "propose", propose)
    real_add = llm.engine.drafter.add

    def add(seq_id, prompt, tenant=""):
        if list(prompt) == BAD_PROMPT["prompt_token_ids"]:
            bad_key["k"] = seq_id
        real_add(seq_id, prompt, tenant)

    monkeypatch.setattr(llm.engine.drafter, "add", add)
    return GREEDY


def _sampling(monkeypatch, llm):
    real = Sampler.apply_logits_processors

    def apply(self, logits, rows):
        if any(getattr(r, "params", getattr(r, "state", None)).temperature == 0.123 for r in rows):
            raise RuntimeError("injected sampler fault")
        return real(self, logits, rows)

    monkeypatch.setattr(Sampler, "apply_logits_processors", apply)
    return SamplingParams(temperature=0.123, max_tokens=30, ignore_eos=True)


def _slipped_validation(monkeypatch, llm):
    params = SamplingParams(temperature=0.5, max_tokens=30, ignore_eos=True)
    params.top_k = "many"  # set after validation: the sampler meets a value it cannot use
    return params


def _detokenizing(monkeypatch, llm):
    real = IncrementalDetokenizer.add_tokens

    def add_tokens(self, ids):
        if not self.spaces_between_special_tokens:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return real(self, ids)

    monkeypatch.setattr(IncrementalDetokenizer, "add_tokens", add_tokens)
    return SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, spaces_between_special_tokens=False)


def _stop_checks(monkeypatch, llm):
    def feed(self, text):
        raise RuntimeError("injected stop-string fault")

    monkeypatch.setattr(StopStringMatcher, "feed", feed)
    return SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["never-matches"])


@pytest.mark.parametrize("inject", [_drafting, _sampling, _slipped_validation, _detokenizing, _stop_checks])
def test_fault_fails_only_its_request(llm, expected, monkeypatch, inject):
    bad_params = inject(monkeypatch, llm)
    failed_before = llm.stats()["num_failed_requests"]
    outs = llm.generate([BAD_PROMPT, *GOOD], [bad_params, GREEDY, GREEDY], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert [o.outputs[0].token_ids for o in outs[1:]] == expected
    assert llm.stats()["num_failed_requests"] == failed_before + 1
    assert_pages_clean(llm.engine)
    monkeypatch.undo()
    again = llm.generate(GOOD, GREEDY, use_tqdm=False)  # the engine still serves
    assert [o.outputs[0].token_ids for o in again] == expected
    assert_pages_clean(llm.engine)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0, 2**63])
def test_extreme_seeds_work(llm, seed):
    out = llm.generate(GOOD[:1], SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=8), use_tqdm=False)
    assert all(len(c.token_ids) >= 1 for c in out[0].outputs)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, True, 1.5])
def test_out_of_range_seed_is_a_clear_error(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)
