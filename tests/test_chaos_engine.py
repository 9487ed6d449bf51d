"""Seeded chaos: random mixes of engine features driven through the step-level API, checked against a plain engine.

Per seed, one engine gets a random configuration (small KV pool that forces preemption, small step budget for
chunked prefill, prefix caching on or off, suffix / MTP / hybrid speculation or none, overlap scheduling, few
seats) and a random stream of requests arriving over several steps: shared prefixes and repeated prompts
(prefix-cache hits), repetitive prompts (suffix drafts), greedy and seeded sampling with n > 1, stop strings and
stop token ids taken from the plain continuation, max_tokens 1, min_tokens, logprobs and prompt logprobs,
unseeded sampling, aborts of random requests mid-flight, and bad requests mixed in (refused at once with
ValueError, or failed alone with finish_reason "error" when the parameters slipped past validation).

Invariants: every sequence gets exactly one finished delta within a bounded number of steps; greedy and seeded
sequences equal a plain engine's (no speculation, no chunking, big pool, no overlap) in tokens, text, finish and
stop reasons, logprobs; an aborted one emitted a prefix of them; afterwards no page is held and the stats
counters agree with what the deltas carried."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine import LLM, SamplingParams
from engine.outputs import RequestDelta
from engine_checks import assert_pages_clean

MAX_LEN = 128  # the chaos engines' context: a request fits a pool of MAX_LEN / block_size pages
VOCAB = 1400  # prompt ids drawn below the tiny tokenizer's special tokens
MAX_STEPS = 1500
# more seeds: CHAOS_SEEDS=100,101,... (seeds 0-400 pass)
SEEDS = [int(s) for s in os.environ.get("CHAOS_SEEDS", ",".join(map(str, range(12)))).split(",")]
PLAIN_KW = dict(device="cpu", kv_block_size=16, num_kv_blocks=256, max_model_len=512, max_num_batched_tokens=4096,
                enable_prefix_caching=False, overlap_scheduling=False)


@dataclass
class Req:
    rid: str
    prompt: list[int]
    params: SamplingParams | None  # None: the request is refused before it has parameters (bad SamplingParams)
    arrival: int  # step before which it is added
    kind: str  # greedy | seeded | unseeded | bad | slipped
    deltas: dict[int, list[RequestDelta]] = field(default_factory=dict)
    aborted_at: int | None = None  # step after which abort_request was called

    @property
    def done(self) -> bool:
        return len(self.deltas) == self.params.n and all(s[-1].finished for s in self.deltas.values())

    @property
    def compared(self) -> bool:
        return self.kind in ("greedy", "seeded")


def _engine_options(rng: random.Random) -> dict[str, Any]:
    block = rng.choice([8, 16])
    min_pages = MAX_LEN // block
    spec = rng.choice([
        None,
        {"method": "suffix", "num_speculative_tokens": rng.choice([2, 4, 8])},
        {"method": "mtp", "num_speculative_tokens": rng.choice([1, 2, 3])},
        {"method": "hybrid", "num_speculative_tokens": 6, "num_mtp_tokens": 2},
    ])
    if spec is not None:
        spec["draft_budget"] = rng.random() < 0.5
    return dict(
        device="cpu", kv_block_size=block, num_kv_blocks=rng.randint(min_pages, 2 * min_pages),
        max_model_len=MAX_LEN, max_num_batched_tokens=rng.choice([8, 16, 24, 48, 128]),
        max_num_seqs=rng.choice([2, 3, 8, 64]), enable_prefix_caching=rng.random() < 0.8,
        overlap_scheduling=rng.random() < 0.5, speculative_config=spec,
        max_prefill_tokens_while_decoding=rng.choice([None, None, 8]),
    )


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(16, 40))] for _ in range(2)]
    out: list[list[int]] = []
    for _ in range(n):
        shape = rng.random()
        if shape < 0.35:  # shared prefix: prefix-cache hits among requests
            p = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
        elif shape < 0.5 and out:  # an exact repeat: a full-prompt hit
            p = list(rng.choice(out))
        elif shape < 0.55:  # long: with its max_tokens it fills the whole context (and a minimal pool)
            p = [rng.randrange(VOCAB) for _ in range(rng.randint(MAX_LEN - 40, MAX_LEN - 1))]
        elif shape < 0.7:  # repetitive: suffix trees draft it
            p = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 8))] * rng.randint(3, 6)
        else:
            p = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 70))]
        out.append(p)
    return out


def _good_params(rng: random.Random, kind: str, prompt: list[int], continuation: Any) -> SamplingParams:
    """Random parameters; stops are cut from the prompt's plain greedy continuation so that they can match."""
    room = MAX_LEN - len(prompt)
    kw: dict[str, Any] = dict(max_tokens=1 if rng.random() < 0.15 else min(rng.randint(2, 32), room),
                              ignore_eos=rng.random() < 0.7, n=rng.choice([1, 1, 1, 2, 3]))
    if room <= 40:
        kw["max_tokens"] = room
    if kind == "greedy":
        kw["temperature"] = 0
    else:
        kw.update(temperature=rng.choice([0.6, 1.0]), top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]))
        if kind == "seeded":
            kw["seed"] = rng.choice([0, 7, 2**64 - 1, -(2**63), rng.randrange(2**32)])
        if rng.random() < 0.3:
            kw.update(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.1)
        if rng.random() < 0.2:
            kw.update(min_p=0.05, logit_bias={rng.choice(continuation.token_ids): -5.0, rng.randrange(VOCAB): 3.0})
    roll = rng.random()
    text, ids = continuation.text, continuation.token_ids
    if roll < 0.2 and len(text) > 4:
        at = rng.randrange(len(text) - 3)
        kw["stop"] = [text[at : at + rng.randint(1, 3)]]
        kw["include_stop_str_in_output"] = rng.random() < 0.3
    elif roll < 0.35:
        kw["stop_token_ids"] = [rng.choice(ids)]
    if rng.random() < 0.2:
        kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
    if rng.random() < 0.2:
        kw["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.1:
        kw["prompt_logprobs"] = 1
    if rng.random() < 0.1:
        kw["skip_special_tokens"] = False
    elif rng.random() < 0.1 and "stop" not in kw:
        kw["detokenize"] = False
    return SamplingParams(**kw)


def _bad_request(rng: random.Random, rid: str, arrival: int) -> Req:
    """A request add_request must refuse with ValueError (or SamplingParams refuses to build)."""
    ok = [rng.randrange(VOCAB) for _ in range(10)]
    case = rng.randrange(7)
    if case == 0:
        return Req(rid, ok + [10**6], SamplingParams(max_tokens=4), arrival, "bad")  # id outside the vocabulary
    if case == 1:
        return Req(rid, [5] * (MAX_LEN + rng.randint(0, 20)), SamplingParams(max_tokens=4), arrival, "bad")
    if case == 2:
        return Req(rid, ok, SamplingParams(max_tokens=MAX_LEN), arrival, "bad")  # prompt + max_tokens too long
    if case == 3:
        return Req(rid, ok, SamplingParams(max_tokens=4, stop_token_ids=[10**6]), arrival, "bad")
    if case == 4:
        return Req(rid, [], SamplingParams(max_tokens=4), arrival, "bad")
    for bad in ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_p": 0.0}, {"temperature": -1.0}, {"n": 0},
                {"max_tokens": 0}, {"logprobs": 99}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    if case == 5:
        return Req(rid, ok, None, arrival, "bad")
    params = SamplingParams(temperature=0.5, max_tokens=8, ignore_eos=True)
    params.top_k = "many"  # set after validation: the sampler fails this request alone
    return Req(rid, ok, params, arrival, "slipped")


def _workload(rng: random.Random, plain: LLM) -> list[Req]:
    prompts = _prompts(rng, rng.randint(8, 14))
    conts = plain.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    reqs = []
    for i, (p, c) in enumerate(zip(prompts, conts)):
        kind = rng.choice(["greedy", "greedy", "seeded", "seeded", "unseeded"])
        reqs.append(Req(f"r{i}", p, _good_params(rng, kind, p, c.outputs[0]), rng.randint(0, 12), kind))
    reqs += [_bad_request(rng, f"bad{i}", rng.randint(0, 12)) for i in range(rng.randint(1, 3))]
    return sorted(reqs, key=lambda r: r.arrival)


def _add(eng: Any, r: Req, live: list[Req]) -> None:
    if r.kind == "bad":
        with pytest.raises(ValueError):
            if r.params is None:
                SamplingParams(seed=2**64)
            eng.add_request(r.rid, r.prompt, r.params)
        return
    running = [x.rid for x in live if x.aborted_at is None]  # an aborted id is free at once
    if running and random.Random(r.rid).random() < 0.3:  # a duplicate id is refused, the live request untouched
        with pytest.raises(ValueError, match="already in use"):
            eng.add_request(running[0], r.prompt, r.params)
    eng.add_request(r.rid, r.prompt, r.params)
    live.append(r)


def _drive(eng: Any, reqs: list[Req], rng: random.Random) -> None:
    """Add, step and abort until every sequence finished; at most MAX_STEPS steps (a hang fails)."""
    by_id = {r.rid: r for r in reqs}
    live: list[Req] = []
    queue = list(reqs)
    abort_p = rng.choice([0.0, 0.03, 0.1])
    for step in range(MAX_STEPS):
        while queue and queue[0].arrival <= step:
            _add(eng, queue.pop(0), live)
        if live and rng.random() < abort_p:
            victim = rng.choice(live)
            victim.aborted_at = step
            eng.abort_request(victim.rid)
        if rng.random() < 0.02:
            eng.abort_request("no-such-request")  # a no-op
        for d in eng.step():
            r = by_id[d.request_id]
            seq = r.deltas.setdefault(d.index, [])
            assert not (seq and seq[-1].finished), f"delta after the finish of {d.request_id}#{d.index}"
            seq.append(d)
        live = [r for r in live if not r.done]
        if not queue and not live:
            _drain(eng)
            return
    pytest.fail(f"not done after {MAX_STEPS} steps: live {[r.rid for r in live]}, stats {eng.stats()}")


def _drain(eng: Any) -> None:
    """Every sequence finished; a step may still be in flight (overlap scheduling): it emits nothing."""
    for _ in range(2):
        if not eng.has_unfinished_requests():
            return
        assert eng.step() == []
    assert not eng.has_unfinished_requests()


def _choice(deltas: list[RequestDelta]) -> dict[str, Any]:
    logprobs = [lp for d in deltas if d.new_logprobs for lp in d.new_logprobs]
    prompt_lp = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None)
    return dict(tokens=[t for d in deltas for t in d.new_token_ids], text="".join(d.new_text for d in deltas),
                finish=deltas[-1].finish_reason, stop=deltas[-1].stop_reason, logprobs=logprobs,
                prompt_logprobs=prompt_lp, error=deltas[-1].error)


def _same_logprobs(got: list, want: list, tokens: list[int]) -> None:
    assert len(got) == len(want)
    for g, w, t in zip(got, want, tokens):
        if t is None:  # prompt logprobs: position 0 has none
            assert g is None and w is None
            continue
        assert math.isclose(g[t].logprob, w[t].logprob, abs_tol=1e-3), (t, g[t], w[t])


def _check(r: Req, ref: Any, label: str) -> None:
    assert sorted(r.deltas) == list(range(r.params.n)), label
    for i, deltas in r.deltas.items():
        got = _choice(deltas)
        what = f"{label}: {r.rid}#{i} ({r.kind}, {r.params})"
        if r.kind == "slipped" and got["finish"] != "abort":
            assert got["finish"] == "error" and got["error"], what
            continue
        if got["finish"] == "abort":
            assert r.aborted_at is not None, what
            if r.compared:
                want = ref.outputs[i].token_ids
                assert got["tokens"] == want[: len(got["tokens"])], what
            continue
        assert got["finish"] in ("stop", "length"), what
        assert 1 <= len(got["tokens"]) <= r.params.max_tokens, what
        if not r.compared:
            continue
        want = ref.outputs[i]
        assert (got["tokens"], got["text"], got["finish"], got["stop"]) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason), what
        if r.params.logprobs is not None:
            _same_logprobs(got["logprobs"], want.logprobs, want.token_ids)
        if r.params.prompt_logprobs is not None:
            _same_logprobs(got["prompt_logprobs"], ref.prompt_logprobs, [None] + r.prompt[1:])


def _check_stats(eng: Any, before: dict[str, Any], reqs: list[Req]) -> None:
    after = eng.stats()
    added = [r for r in reqs if r.kind != "bad"]
    choices = [_choice(ds) for r in added for ds in r.deltas.values()]
    assert after["num_prompt_tokens_total"] - before["num_prompt_tokens_total"] == sum(len(r.prompt) for r in added)
    generated = after["num_generated_tokens_total"] - before["num_generated_tokens_total"]
    assert generated == sum(len(c["tokens"]) for c in choices)
    failed = after["num_failed_requests"] - before["num_failed_requests"]
    assert failed == sum(c["finish"] == "error" for c in choices)
    assert after["prefix_cache_hit_tokens"] <= after["prefix_cache_queried_tokens"]
    if "spec_draft_tokens" in after:
        assert 0 <= after["spec_accepted_tokens"] <= after["spec_draft_tokens"]
    assert_pages_clean(eng)
    for r in added:  # every id was forgotten: it can be used again
        eng.add_request(r.rid, r.prompt[:1], SamplingParams(max_tokens=1))
        eng.abort_request(r.rid)
    eng.step()
    assert_pages_clean(eng)


@pytest.fixture(scope="module")
def plain(tiny_bf16):
    return LLM(str(tiny_bf16), **PLAIN_KW)


@pytest.mark.parametrize("seed", SEEDS)
def test_chaos(tiny_bf16, plain, seed):
    rng = random.Random(seed)
    options = _engine_options(rng)
    reqs = _workload(rng, plain)
    label = f"seed {seed}, options {options}"
    llm = LLM(str(tiny_bf16), **options)
    before = llm.stats()
    _drive(llm.engine, reqs, rng)
    compared = [r for r in reqs if r.compared]
    refs = plain.generate([{"prompt_token_ids": r.prompt} for r in compared], [r.params for r in compared],
                          use_tqdm=False)
    ref_of = {r.rid: ref for r, ref in zip(compared, refs)}
    for r in reqs:
        if r.kind != "bad":
            _check(r, ref_of.get(r.rid), label)
    _check_stats(llm.engine, before, reqs)
    assert_pages_clean(plain.engine)
