import math

import pytest
import torch

from engine.logprobs import compute_prompt_logprobs
from engine.sampler import Sampler, SampleRow, SamplingState
from engine.sampling_params import SamplingParams, ThinkingBudget


def st(prompt=(), output=None, eos=(), **kw) -> SamplingState:
    return SamplingState(SamplingParams(**kw), list(prompt), list(output or []), eos_token_ids=eos)


def kept(logits: list[float], **kw) -> set[int]:
    probs = Sampler.filtered_probs(torch.tensor([logits]), [SamplingParams(**kw)])
    return set(torch.nonzero(probs[0] > 0).flatten().tolist())


def log_probs(p: list[float]) -> list[float]:
    return [math.log(x) for x in p]


def test_greedy_argmax_and_ties():
    logits = torch.tensor([[0.1, 3.0, 2.0, 3.0], [5.0, 1.0, 1.0, 0.0]])
    out = Sampler().sample(logits, [st(temperature=0), st(temperature=0)])
    assert out.token_ids == [1, 0]  # first maximal index wins ties
    assert out.logprobs == [None, None]


def test_top_k_exact_set():
    logits = [0.5, 2.0, -1.0, 3.0, 1.0, 2.5]
    assert kept(logits, top_k=1) == {3}
    assert kept(logits, top_k=3) == {3, 5, 1}
    assert kept(logits, top_k=0) == set(range(6))
    assert kept(logits, top_k=100) == set(range(6))
    # ties: exactly k tokens, lower token id first
    assert kept([1.0, 1.0, 1.0, 0.0], top_k=2) == {0, 1}


def test_top_p_exact_set():
    lp = log_probs([0.125, 0.5, 0.0625, 0.25, 0.0625])  # sorted: 1 (.5), 3 (.25), 0 (.125), 2/4
    assert kept(lp, top_p=0.4) == {1}
    assert kept(lp, top_p=0.5) == {1}  # 0.5 >= 0.5: smallest prefix reaching top_p
    assert kept(lp, top_p=0.6) == {1, 3}
    assert kept(lp, top_p=0.8) == {1, 3, 0}
    assert kept(lp, top_p=0.9) == {1, 3, 0, 2}  # tie between 2 and 4: lower id first
    assert kept(lp, top_p=1.0) == {0, 1, 2, 3, 4}
    assert kept(lp, top_p=1e-6) == {1}  # always at least one token


def test_top_k_then_top_p_renormalises():
    lp = log_probs([0.4, 0.3, 0.2, 0.1])
    # after top-k=2 the kept mass is .4/.7=.571, .3/.7=.429: top_p=0.6 needs both
    assert kept(lp, top_k=2, top_p=0.6) == {0, 1}
    assert kept(lp, top_p=0.6) == {0, 1}
    assert kept(lp, top_k=2, top_p=0.55) == {0}


def test_min_p_exact_set():
    lp = log_probs([0.5, 0.3, 0.12, 0.08])
    assert kept(lp, min_p=0.5) == {0, 1}  # p >= 0.25
    assert kept(lp, min_p=0.2) == {0, 1, 2}  # p >= 0.1
    assert kept(lp, min_p=1.0) == {0}
    assert kept(lp, min_p=0.61, top_k=3) == {0}


def test_temperature_in_filters():
    # top-p is applied after temperature: a low temperature concentrates the mass
    lp = log_probs([0.5, 0.3, 0.2])
    assert kept(lp, top_p=0.7) == {0, 1}
    assert kept(lp, top_p=0.7, temperature=0.2) == {0}


def test_sampling_only_draws_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(2000, 1)
    states = [st(top_k=5, top_p=0.9, min_p=0.05, temperature=1.3) for _ in range(2000)]
    allowed = kept(logits[0].tolist(), top_k=5, top_p=0.9, min_p=0.05, temperature=1.3)
    out = Sampler(torch.Generator().manual_seed(1)).sample(logits, states)
    assert set(out.token_ids) == allowed  # all allowed ones appear, nothing else


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_chi_square():
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.3, -1.0, 1.5])
    temperature, n = 0.7, 20000
    states = [st(temperature=temperature) for _ in range(n)]
    out = Sampler(torch.Generator().manual_seed(1234)).sample(base.repeat(n, 1), states)
    counts = torch.bincount(out.token_ids_tensor, minlength=8).double()
    crit = 24.32  # chi-square, 7 degrees of freedom, p = 0.001
    assert _chi2(counts, torch.softmax(base.double() / temperature, -1)) < crit
    # a wrong temperature must be rejected by the same test
    assert _chi2(counts, torch.softmax(base.double() / 1.0, -1)) > 10 * crit
    assert _chi2(counts, torch.softmax(base.double() / 0.6, -1)) > crit


def test_seed_reproducible_and_batch_independent():
    torch.manual_seed(0)
    vocab, steps = 64, 6
    step_logits = [torch.randn(vocab) for _ in range(steps)]

    def run(batch_extra: int, extra_kw: dict) -> list[int]:
        seeded = st(seed=42, temperature=0.9, top_p=0.95)
        others = [st(**extra_kw) for _ in range(batch_extra)]
        sampler = Sampler()
        got = []
        for t in range(steps):
            states = others[: batch_extra // 2] + [seeded] + others[batch_extra // 2 :]
            logits = torch.stack([step_logits[t]] + [torch.randn(vocab) for _ in others])
            # put the seeded row where it sits in `states`
            logits = torch.cat([logits[1 : 1 + batch_extra // 2], logits[:1], logits[1 + batch_extra // 2 :]])
            out = sampler.sample(logits, states)
            tok = out.token_ids[batch_extra // 2]
            seeded.output_token_ids.append(tok)
            got.append(tok)
        return got

    ref = run(0, {})
    assert run(0, {}) == ref
    assert run(3, {"temperature": 1.0}) == ref
    assert run(4, {"temperature": 0.0}) == ref
    assert run(5, {"top_k": 3, "temperature": 0.5, "seed": 7}) == ref
    assert run(2, {"min_p": 0.2, "repetition_penalty": 1.3}) == ref
    # a different seed gives a different sequence (with overwhelming probability)
    other = st(seed=43, temperature=0.9, top_p=0.95)
    s = Sampler()
    assert [s.sample(step_logits[t][None], [other]).token_ids[0] for t in range(steps)] != ref


def test_seed_offset_distinguishes_n_sequences():
    logits = torch.zeros(1, 1000)
    a = SamplingState(SamplingParams(seed=5), [], [], seed_offset=0)
    b = SamplingState(SamplingParams(seed=5), [], [], seed_offset=1)
    s = Sampler()
    ta = [s.sample(logits, [a]).token_ids[0] for _ in range(4)]
    tb = [s.sample(logits, [b]).token_ids[0] for _ in range(4)]
    assert ta != tb


def test_mixed_greedy_and_random_rows():
    logits = torch.tensor([[0.0, 10.0, 0.0], [0.0, 0.0, 50.0], [7.0, 0.0, 0.0]])
    out = Sampler().sample(logits, [st(temperature=0), st(temperature=1.0), st(temperature=0)])
    assert out.token_ids == [1, 2, 0]


def test_logit_bias():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = Sampler().sample(logits, [st(temperature=0, logit_bias={0: 5.0, 2: -100.0})])
    assert out.token_ids == [0]


def test_repetition_penalty_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    s = st(prompt=[0], output=[1], repetition_penalty=2.0)
    x = Sampler().apply_logits_processors(logits, [s])
    assert x.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]
    assert logits.tolist() == [[2.0, -2.0, 2.0, -2.0, 1.0]]  # input untouched


def test_presence_frequency_penalties_output_only():
    logits = torch.zeros(1, 5)
    s = st(prompt=[4, 4], output=[1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)
    x = Sampler().apply_logits_processors(logits, [s])
    assert x[0].tolist() == pytest.approx([0.0, -1.25, -0.75, 0.0, 0.0])


def test_penalties_only_touch_their_rows():
    logits = torch.ones(3, 4)
    states = [st(output=[0]), st(output=[0], frequency_penalty=1.0), st(output=[0])]
    x = Sampler().apply_logits_processors(logits, states)
    assert x.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]


def test_min_tokens_masks_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 7.0]])
    s = st(eos=[2], stop_token_ids=[3], min_tokens=2, temperature=0)
    assert s.all_stop_token_ids == {2, 3}
    assert Sampler().sample(logits, [s]).token_ids == [4]
    s.output_token_ids.append(4)
    assert Sampler().sample(logits, [s]).token_ids == [4]
    s.output_token_ids.append(4)
    assert Sampler().sample(logits, [s]).token_ids == [2]  # min_tokens reached


def test_min_tokens_with_ignore_eos():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 7.0]])
    s = st(eos=[2], stop_token_ids=[3], min_tokens=1, ignore_eos=True, temperature=0)
    assert s.all_stop_token_ids == {3}
    assert Sampler().sample(logits, [s]).token_ids == [2]


def test_thinking_budget_forces_the_end_token_once():
    """Budget 2, end token 1 (the least likely one, even banned by logit_bias -inf): the third token is forced,
    in greedy and in sampled rows; after it (or once the model ends the reasoning itself) nothing is forced."""
    logits = torch.tensor([[0.0, -5.0, 9.0, 8.0]])
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0, "logit_bias": {1: -math.inf}}):
        s = st(thinking_budget=ThinkingBudget(max_tokens=2, end_token_id=1), **kw)
        out = []
        for _ in range(5):
            tok = Sampler().sample(logits, [s]).token_ids[0]
            s.output_token_ids.append(tok)
            out.append(tok)
        assert out[2] == 1 and 1 not in out[:2] + out[3:], (kw, out)
    # the model ended its reasoning before the budget: not forced again
    s = st(output=[2, 1, 2], temperature=0, thinking_budget=ThinkingBudget(max_tokens=2, end_token_id=1))
    assert Sampler().sample(logits, [s]).token_ids == [2]
    # budget 0: the first token; rows of a verify chain count the drafts before them
    s = st(temperature=0, thinking_budget=ThinkingBudget(max_tokens=0, end_token_id=3))
    assert Sampler().sample(logits, [s]).token_ids == [3]
    s = st(output=[2], temperature=0, thinking_budget=ThinkingBudget(max_tokens=2, end_token_id=1))
    rows = [SampleRow(s, ()), SampleRow(s, (2,)), SampleRow(s, (2, 1)), SampleRow(s, (2, 2))]
    assert Sampler().sample(logits.expand(4, -1), rows).token_ids == [2, 1, 2, 1]


@pytest.mark.parametrize("bad", [ThinkingBudget(-1, 1), ThinkingBudget(2, -1), ThinkingBudget(True, 1), 5])
def test_thinking_budget_validated(bad):
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(thinking_budget=bad)
    with pytest.raises(ValueError, match="thinking_budget.end_token_id out of vocabulary"):
        SamplingParams(thinking_budget=ThinkingBudget(1, 10)).verify_token_ids(10)


def test_logprobs_raw_distribution_and_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]])
    raw = torch.log_softmax(logits, -1)[0]
    # temperature and penalties don't change the reported logprobs; bias forces token 4
    s = st(temperature=0, logprobs=2, logit_bias={4: 100.0}, repetition_penalty=1.5, output=[1])
    out = Sampler().sample(logits, [s])
    assert out.token_ids == [4]
    d = out.logprobs[0]
    assert list(d) == [4, 1, 3] or list(d) == [4, 3, 1]
    assert d[4].rank == 5 and d[4].logprob == pytest.approx(float(raw[4]))
    assert d[1].rank == 1 and d[3].rank == 1  # tie: both have no strictly larger token
    assert d[1].logprob == pytest.approx(float(raw[1]))


def test_logprobs_sampled_token_in_top_k_and_zero():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]]).repeat(3, 1)
    out = Sampler().sample(
        logits, [st(temperature=0, logprobs=3), st(temperature=0, logprobs=0), st(temperature=0)]
    )
    assert list(out.logprobs[0]) == [1, 2, 0]
    assert [lp.rank for lp in out.logprobs[0].values()] == [1, 2, 3]
    assert list(out.logprobs[1]) == [1] and out.logprobs[1][1].rank == 1
    assert out.logprobs[2] is None


def test_prompt_logprobs_helper():
    torch.manual_seed(0)
    logits = torch.randn(7, 11)
    nxt = [3, 1, 4, 1, 5, 9, 2]
    res = compute_prompt_logprobs(logits, nxt, 2, chunk_rows=3)
    raw = torch.log_softmax(logits, -1)
    assert len(res) == 7
    for i, d in enumerate(res):
        assert next(iter(d)) == nxt[i]
        assert d[nxt[i]].logprob == pytest.approx(float(raw[i, nxt[i]]))
        assert d[nxt[i]].rank == int((raw[i] > raw[i, nxt[i]]).sum()) + 1
        top = torch.topk(raw[i], 2).indices.tolist()
        assert set(top) <= set(d) and len(d) in (2, 3)
    assert compute_prompt_logprobs(torch.zeros(0, 11), [], 2) == []  # a run of no rows


def test_filtered_probs_normalised():
    probs = Sampler.filtered_probs(
        torch.randn(3, 20), [SamplingParams(top_k=4), SamplingParams(), SamplingParams(min_p=0.3)]
    )
    assert torch.allclose(probs.sum(-1), torch.ones(3))
