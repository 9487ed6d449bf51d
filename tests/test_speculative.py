"""Speculative decoding through the whole engine: greedy tokens identical to plain decoding (suffix drafts and
scripted drafts that are right, partly right and wrong), under chunked prefill, prefix hits, preemption,
n > 1, aborts and stops; seeded sampling identical to plain; page invariants after every test."""
from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import ThinkingBudget
from engine_checks import assert_pages_clean
from model.tiny import write_tiny_checkpoint
from spec import DraftSlot, Drafter

KW = dict(device="cpu", kv_block_size=16, num_kv_blocks=48, max_model_len=512, max_num_batched_tokens=64)
SUFFIX = {"method": "suffix", "num_speculative_tokens": 8}


def _repetitive_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1400) for _ in range(8)] * 5} for _ in range(n)]


def _random_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1400) for _ in range(rng.randint(3, 90))]} for _ in range(n)]


@pytest.fixture(scope="module")
def plain(tiny_bf16):
    return LLM(str(tiny_bf16), **KW)


@pytest.fixture(scope="module")
def suffix(tiny_bf16):
    return LLM(str(tiny_bf16), speculative_config=SUFFIX, **KW)


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert cx.token_ids == cy.token_ids
            assert (cx.text, cx.finish_reason, cx.stop_reason) == (cy.text, cy.finish_reason, cy.stop_reason)


def test_suffix_greedy_identity_with_repetition_chunking_preemption(plain, suffix):
    # long greedy outputs of the tiny model fall into loops: the suffix trees draft them and get accepted
    prompts = _repetitive_prompts(4, 0) + _random_prompts(2, 1)
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    before = suffix.stats()
    _same(plain.generate(prompts, sp, use_tqdm=False), suffix.generate(prompts, sp, use_tqdm=False))
    after = suffix.stats()
    assert after["spec_accepted_tokens"] - before["spec_accepted_tokens"] > 50
    assert after["spec_draft_tokens"] > after["spec_accepted_tokens"]  # some drafts were also rejected
    assert after["num_preemptions"] > before["num_preemptions"]  # 6 x ~250 tokens > 48 pages of 16
    assert_pages_clean(suffix.engine)


def test_suffix_greedy_identity_without_repetition_and_prefix_hits(plain, suffix):
    prompts = _random_prompts(5, 2)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    first = suffix.generate(prompts, sp, use_tqdm=False)
    _same(plain.generate(prompts, sp, use_tqdm=False), first)
    hits = suffix.stats()["prefix_cache_hit_tokens"]
    _same(first, suffix.generate(prompts, sp, use_tqdm=False))  # again: prompts now hit the prefix cache
    assert suffix.stats()["prefix_cache_hit_tokens"] > hits
    assert_pages_clean(suffix.engine)


def test_thinking_budget_forced_end_identical_under_speculation(plain, suffix):
    """A thinking budget forces its end token at output position `budget` (unless it came earlier); the tokens
    before it are the unbudgeted run's, and suffix speculation (drafts running past the forced position, some
    rejected there) gives exactly the plain run's tokens, greedy and seeded."""
    prompts = _repetitive_prompts(3, 5)
    end, budget = 1399, 100
    free = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=160, ignore_eos=True), use_tqdm=False)
    before = suffix.stats()
    for sp in (SamplingParams(temperature=0, max_tokens=160, ignore_eos=True,
                              thinking_budget=ThinkingBudget(budget, end)),
               SamplingParams(temperature=0.8, seed=5, max_tokens=160, ignore_eos=True,
                              thinking_budget=ThinkingBudget(budget, end))):
        ref = plain.generate(prompts, sp, use_tqdm=False)
        _same(ref, suffix.generate(prompts, sp, use_tqdm=False))
        for o, f in zip(ref, free):
            toks = o.outputs[0].token_ids
            assert end not in toks[:budget] and toks[budget] == end and len(toks) == 160
            if sp.is_greedy:
                assert toks[:budget] == f.outputs[0].token_ids[:budget]
    after = suffix.stats()
    drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert accepted > 20 and drafted > accepted  # the loops were drafted, and some drafts rejected
    assert_pages_clean(suffix.engine)


def test_seeded_sampling_and_n_identical_to_plain(plain, suffix):
    # a seeded row's noise depends only on (seed, sequence, position): speculation cannot change its tokens
    prompts = _repetitive_prompts(2, 3)
    params = [
        SamplingParams(temperature=0.7, seed=11, n=2, max_tokens=120, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=5, seed=2**64 - 1, max_tokens=120, ignore_eos=True,
                       repetition_penalty=1.1, presence_penalty=0.2, logprobs=2),
    ]
    a = plain.generate(prompts, params, use_tqdm=False)
    b = suffix.generate(prompts, params, use_tqdm=False)
    _same(a, b)
    for x, y in zip(a[1].outputs[0].logprobs, b[1].outputs[0].logprobs):
        assert list(x) == list(y) and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    assert_pages_clean(suffix.engine)


class ScriptedDrafter(Drafter):
    """Drafts the known plain continuation of each prompt, with every `wrong`-th draft token corrupted."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], wrong: int, vocab: int) -> None:
        self.answers, self.wrong, self.vocab = answers, wrong, vocab
        self.seqs: dict[int, tuple[tuple[int, ...], list[int]]] = {}
        self.calls = 0

    def add(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        self.seqs[seq_id] = (tuple(prompt), [])

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        self.seqs[seq_id][1].extend(tokens)

    def finish(self, seq_id: int, completed: bool) -> None:
        del self.seqs[seq_id]

    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        out = []
        for slot in slots:
            prompt, done = self.seqs[slot.seq_id]
            draft = list(self.answers.get(prompt, [])[len(done) : len(done) + slot.max_drafts])
            for i in range(len(draft)):
                self.calls += 1
                if self.wrong and self.calls % self.wrong == 0:
                    draft[i] = (draft[i] + 1) % self.vocab
            out.append(draft)
        return out


@pytest.mark.parametrize("wrong", [0, 3, 1], ids=["all-right", "every-3rd-wrong", "all-wrong"])
def test_scripted_drafts_give_plain_tokens_stops_and_lengths(plain, suffix, wrong):
    prompts = _random_prompts(4, 5)
    base = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    answers = {tuple(p["prompt_token_ids"]): o.outputs[0].token_ids for p, o in zip(prompts, base)}
    eng = suffix.engine
    real, eng.drafter = eng.drafter, ScriptedDrafter(answers, wrong, eng.model_config.vocab_size)
    try:
        text = base[1].outputs[0].text
        params = [
            SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),  # max_tokens exact under 8-token drafts
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,  # a stop string spanning tokens
                           stop=[text[len(text) // 3 : len(text) // 3 + 6]]),
            SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[base[2].outputs[0].token_ids[17]]),
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, min_tokens=30, logprobs=1),
        ]
        before = eng.spec_stats.accepted_tokens
        _same(plain.generate(prompts, params, use_tqdm=False), out := suffix.generate(prompts, params, use_tqdm=False))
        assert len(out[0].outputs[0].token_ids) == 13
        assert out[1].outputs[0].finish_reason == "stop" and isinstance(out[1].outputs[0].stop_reason, str)
        accepted = eng.spec_stats.accepted_tokens - before
        assert accepted == 0 if wrong == 1 else accepted > 20
    finally:
        eng.drafter = real
    assert_pages_clean(eng)


class ShortDrafts(ScriptedDrafter):
    """ScriptedDrafter with at most `cap` drafts per step."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], cap: int, vocab: int) -> None:
        super().__init__(answers, 0, vocab)
        self.cap = cap

    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        return super().propose([DraftSlot(s.seq_id, min(s.max_drafts, self.cap)) for s in slots])


def test_verify_chains_padded_for_a_graph_stay_inside_the_context(tmp_path):
    """A verify step padded for a captured CUDA graph (forced here: the CPU has none) puts filler rows after each
    request's chain. A request at the end of a context as long as the model's RoPE table (max_model_len defaults
    to max_position_embeddings) must get no filler position past it: the table (and the block table) would be
    read out of bounds. Tokens and logprobs stay the plain ones."""
    ckpt = write_tiny_checkpoint(tmp_path / "short_context", max_position_embeddings=128)
    kw = dict(device="cpu", kv_block_size=16, num_kv_blocks=32, max_num_batched_tokens=64)
    rng = random.Random(11)
    prompts = [{"prompt_token_ids": [rng.randrange(1400) for _ in range(n)]} for n in (120, 10)]
    params = [SamplingParams(temperature=0, ignore_eos=True, logprobs=1),  # its 8 tokens end the context
              SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, logprobs=1)]
    base = LLM(str(ckpt), **kw).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(ckpt), speculative_config=SUFFIX, **kw)
    eng = llm.engine
    # only the short request drafts: the long one decodes one row per step, padded to the other's chain
    eng.drafter = ShortDrafts({tuple(prompts[1]["prompt_token_ids"]): base[1].outputs[0].token_ids}, 3,
                              eng.model_config.vocab_size)
    eng.worker.graph_rows_for = lambda batch, max_chain: 4 if max_chain <= 4 else 0
    padded, execute = [], eng.worker.execute

    def record(inputs, prev_tokens=None):
        if len(inputs.seq_lens) > 1 and len(inputs.positions) == 4 * len(inputs.seq_lens):
            padded.append(max(inputs.positions))
        assert max(inputs.positions) < 128
        return execute(inputs, prev_tokens)
    eng.worker.execute = record
    out = llm.generate(prompts, params, use_tqdm=False)
    _same(base, out)
    for x, y in zip(base, out):
        for a, b in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            assert list(a) == list(b) and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    assert len(out[0].outputs[0].token_ids) == 8 and padded  # both decoded side by side, in padded steps
    assert_pages_clean(eng)


def test_abort_between_verify_steps_frees_pages(suffix):
    eng = suffix.engine
    prompts = _repetitive_prompts(2, 7)
    eng.add_request("x", prompts[0]["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
    eng.add_request("y", prompts[1]["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
    drafted = eng.spec_stats.draft_tokens
    for _ in range(200):
        eng.step()
        if eng.spec_stats.draft_tokens > drafted + 20:
            break
    eng.abort_request("x")
    finished = []
    while eng.has_unfinished_requests():
        finished += [d for d in eng.step() if d.finished]
    assert [d.request_id for d in finished] == ["x", "y"] or {d.request_id for d in finished} == {"x", "y"}
    assert_pages_clean(eng)


def test_config_errors_name_the_key(tiny_bf16):
    for bad, key in [
        ({"method": "nope"}, "method"),
        ({"method": "suffix", "max_tree_depth": 0}, "max_tree_depth"),
        ({"method": "suffix", "min_token_prob": 2}, "min_token_prob"),
        ({"method": "suffix", "max_spec_factor": -1.0}, "max_spec_factor"),
        ({"method": "suffix", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "suffix", "depth": 3}, "depth"),
    ]:
        with pytest.raises(ValueError, match=key):
            LLM(str(tiny_bf16), device="cpu", speculative_config=bad)
    with pytest.raises(ValueError, match="mtp_retire_steps"):
        LLM(str(tiny_bf16), device="cpu", speculative_config={"method": "mtp", "mtp_retire_steps": -1})
    with pytest.raises(ValueError, match="num_mtp_tokens"):
        LLM(str(tiny_bf16), device="cpu", speculative_config={"method": "hybrid", "num_speculative_tokens": 4,
                                                              "num_mtp_tokens": 5})


def _run(eng, rid: str, prompt: list[int], tenant: str) -> tuple[list[int], int]:
    """Run one request alone to completion; its tokens and how many draft tokens were accepted for it."""
    before = eng.spec_stats.accepted_tokens
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), tenant=tenant)
    tokens: list[int] = []
    while eng.has_unfinished_requests():
        tokens += [t for d in eng.step() for t in d.new_token_ids]
    return tokens, eng.spec_stats.accepted_tokens - before


def test_tenants_never_draft_from_each_others_responses(tiny_bf16):
    llm = LLM(str(tiny_bf16), speculative_config=SUFFIX, **KW)
    eng = llm.engine
    prompt = _random_prompts(1, 9)[0]["prompt_token_ids"]
    first, _ = _run(eng, "a1", prompt, tenant="alice")
    other, accepted_other = _run(eng, "b1", prompt, tenant="bob")  # alice's response is not bob's to draft from
    again, accepted_same = _run(eng, "a2", prompt, tenant="alice")  # alice's own finished response is
    assert first == other == again
    assert accepted_same >= 60, accepted_same  # nearly the whole response drafted from alice's global tree
    assert accepted_same > accepted_other + 30, (accepted_same, accepted_other)
    assert_pages_clean(eng)


def test_suffix_with_overlap_scheduling_overlaps_quiet_steps_only(tiny_bf16, plain):
    """Overlap scheduling with suffix speculation: steps without drafts overlap (the budget holds requests whose
    drafts fail at 0), verify steps do not; greedy and seeded tokens stay the plain ones, and repetitive text
    still gets drafted and accepted."""
    eng = LLM(str(tiny_bf16), speculative_config=SUFFIX, overlap_scheduling=True, **KW)
    prompts = _repetitive_prompts(3, 5) + _random_prompts(3, 6)
    greedy = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=60, ignore_eos=True)
    for sp in (greedy, seeded):
        _same(plain.generate(prompts, sp, use_tqdm=False), eng.generate(prompts, sp, use_tqdm=False))
    stats = eng.stats()
    assert stats["num_overlapped_steps"] > 20
    assert stats["spec_accepted_tokens"] > 20
    assert_pages_clean(eng.engine)
