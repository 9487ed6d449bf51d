"""Lossless verification of point-mass drafts (χ² on a toy vocabulary whose logits we set): the tokens a
verify step emits follow the target distribution at every chain position, for sampled requests with
temperature, top-k and penalties; greedy verification equals argmax decoding; padding is never accepted."""
from __future__ import annotations

import torch

from engine.sampler import SampleRow, Sampler, SamplingState
from engine.sampling_params import SamplingParams
from spec import accept_chain

V = 6
# target logits at the draft position 0, at position 1 (after draft x0), and at the bonus position
LOGITS = torch.tensor([[1.0, 0.2, 0.0, -0.5, 1.4, 0.3], [0.0, 1.5, -1.0, 0.5, 0.2, 0.9], [0.3, 0.3, 1.2, 0.0, -0.4, 0.8]])
DRAFT = [4, 3]  # x0 is likely under p0, x1 is unlikely under p1
CRIT_5DF = 20.52  # chi-square, 5 degrees of freedom, p = 0.001


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was emitted"
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum())


def _targets(params: SamplingParams, history: list[int]) -> list[torch.Tensor]:
    """The filtered target distribution at each chain row, with the drafts before it as history."""
    sampler = Sampler()
    out = []
    for j in range(3):
        state = SamplingState(params, [], list(history))
        x = sampler.apply_logits_processors(LOGITS[j : j + 1], [SampleRow(state, tuple(DRAFT[:j]))])
        out.append(Sampler.filtered_probs(x, [params])[0].double())
    return out


def _emit(params: SamplingParams, n: int, history: list[int], verify=accept_chain) -> list[list[int]]:
    states = [SamplingState(params, [], list(history)) for _ in range(n)]
    rows = [SampleRow(s, tuple(DRAFT[:j])) for s in states for j in range(3)]
    sampled = Sampler(torch.Generator().manual_seed(7)).sample(LOGITS.repeat(n, 1), rows).token_ids
    return [verify(DRAFT, sampled[3 * i : 3 * i + 3]) for i in range(n)]


def _check_positions(emitted: list[list[int]], targets: list[torch.Tensor]) -> list[float]:
    """χ² of the first emitted token against p0, of the second given the first was x0 against p1, ..."""
    stats = []
    for j in range(3):
        reached = [e for e in emitted if len(e) > j and e[:j] == DRAFT[:j]]
        counts = torch.bincount(torch.tensor([e[j] for e in reached], dtype=torch.long), minlength=V).double()
        stats.append(_chi2(counts, targets[j]) if reached else float("nan"))
    return stats


def test_sampled_verify_keeps_target_distribution_at_every_position():
    for params, history in [
        (SamplingParams(temperature=0.8), []),
        (SamplingParams(temperature=1.3, top_k=4), []),
        (SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5), [4, 1]),
    ]:
        emitted = _emit(params, 30000, history)
        stats = _check_positions(emitted, _targets(params, history))
        assert all(s < CRIT_5DF for s in stats), (params, stats)  # nan (a position never reached) fails too


def test_greedy_verification_of_a_sampled_request_is_caught():
    # the trap other engines fell into: accept a draft when it is the argmax. The same χ² test must fail.
    params = SamplingParams(temperature=1.0)

    def greedy_verify(drafts, sampled):
        n = 0
        while n < len(drafts) and drafts[n] == int(LOGITS[n].argmax()):
            n += 1
        return list(drafts[:n]) + [sampled[n]]

    stats = _check_positions(_emit(params, 30000, [], greedy_verify), _targets(params, []))
    assert stats[0] > 10 * CRIT_5DF


def test_greedy_rows_accept_exactly_the_argmax_prefix():
    params = SamplingParams(temperature=0)
    emitted = _emit(params, 4, [])
    argmax = [int(LOGITS[j].argmax()) for j in range(3)]
    expected = [argmax[0]] if argmax[0] != DRAFT[0] else DRAFT[:1] + ([argmax[1]] if argmax[1] != DRAFT[1] else DRAFT + [argmax[2]])
    assert all(e == expected for e in emitted)
    assert expected == [4, 1]  # x0 = 4 is the argmax of row 0, x1 = 3 is not that of row 1


def test_padding_slots_are_never_accepted():
    # sampled rows past the real drafts (graph padding) equal nothing the verifier looks at
    assert accept_chain([5], [5, 9, 9, 9]) == [5, 9]
    assert accept_chain([], [2, 2, 2]) == [2]
    assert accept_chain([1, 2], [1, 2, 3, 3]) == [1, 2, 3]
