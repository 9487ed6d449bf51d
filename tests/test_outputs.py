import math
import pickle

import pytest

from engine.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput, RequestOutputAccumulator


def delta(index=0, ids=(), text="", lps=None, **kw) -> RequestDelta:
    return RequestDelta(
        request_id="r1", index=index, new_token_ids=list(ids), new_text=text, new_logprobs=lps, **kw
    )


def test_accumulates_text_tokens_and_finish():
    acc = RequestOutputAccumulator("r1", "Hi", [1, 2, 3])
    plp = [None, {2: Logprob(-0.5, 1)}, {3: Logprob(-1.0, 2), 9: Logprob(-0.2, 1)}]
    acc.add(delta(ids=[5], text="Hel", prompt_logprobs=plp, num_prompt_tokens=3, num_cached_tokens=2))
    out = acc.get_output()
    assert not out.finished and out.outputs[0].text == "Hel" and out.outputs[0].finish_reason is None
    acc.add(delta(ids=[6, 7], text="lo!"))
    acc.add(delta(ids=[8], text="", finished=True, finish_reason="stop", stop_reason="!!"))
    out = acc.get_output()
    assert isinstance(out, RequestOutput) and out.finished
    assert out.request_id == "r1" and out.prompt == "Hi" and out.prompt_token_ids == [1, 2, 3]
    assert out.prompt_logprobs == plp and out.num_cached_tokens == 2
    c = out.outputs[0]
    assert isinstance(c, CompletionOutput)
    assert (c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) == (
        0,
        "Hello!",
        [5, 6, 7, 8],
        "stop",
        "!!",
    )
    assert c.logprobs is None and c.cumulative_logprob is None


def test_logprobs_and_cumulative():
    acc = RequestOutputAccumulator("r1", None, [1])
    acc.add(delta(ids=[4], text="a", lps=[{4: Logprob(-0.5, 2), 3: Logprob(-0.1, 1)}]))
    acc.add(
        delta(
            ids=[5, 6],
            text="bc",
            lps=[{5: Logprob(-1.0, 1)}, {6: Logprob(-2.0, 1)}],
            finished=True,
            finish_reason="length",
        )
    )
    c = acc.get_output().outputs[0]
    assert len(c.logprobs) == 3 and c.logprobs[0][3].logprob == -0.1
    assert math.isclose(c.cumulative_logprob, -3.5)


def test_n_sequences_finish_independently():
    acc = RequestOutputAccumulator("r1", "p", [1], n=2)
    acc.add(delta(index=1, ids=[3], text="x", finished=True, finish_reason="stop", stop_reason=3))
    assert not acc.finished
    acc.add(delta(index=0, ids=[4], text="y"))
    acc.add(delta(index=0, ids=[], text="", finished=True, finish_reason="abort"))
    out = acc.get_output()
    assert out.finished
    assert [(c.index, c.text, c.finish_reason, c.stop_reason) for c in out.outputs] == [
        (0, "y", "abort", None),
        (1, "x", "stop", 3),
    ]


def test_snapshots_are_independent():
    acc = RequestOutputAccumulator("r1", "p", [1])
    acc.add(delta(ids=[2], text="a"))
    first = acc.get_output()
    acc.add(delta(ids=[3], text="b"))
    assert first.outputs[0].token_ids == [2] and first.outputs[0].text == "a"


def test_rejects_bad_deltas():
    acc = RequestOutputAccumulator("r1", "p", [1])
    with pytest.raises(ValueError):
        acc.add(RequestDelta("other", 0, [1], "x"))
    with pytest.raises(ValueError):
        acc.add(delta(index=1, ids=[1]))
    with pytest.raises(ValueError):
        acc.add(delta(ids=[1, 2], lps=[{1: Logprob(0.0, 1)}]))
    with pytest.raises(ValueError):
        acc.add(delta(ids=[1], finished=True))  # finished without a reason
    assert acc.get_output().outputs[0].token_ids == []  # rejected deltas left no trace
    acc.add(delta(ids=[1], finished=True, finish_reason="length"))
    with pytest.raises(ValueError):
        acc.add(delta(ids=[2]))


def test_outputs_pickle():
    acc = RequestOutputAccumulator("r1", "p", [1])
    acc.add(delta(ids=[2], text="a", lps=[{2: Logprob(-0.3, 1, "a")}], finished=True, finish_reason="stop"))
    out = acc.get_output()
    assert pickle.loads(pickle.dumps(out)) == out
    d = delta(ids=[2], text="a")
    assert pickle.loads(pickle.dumps(d)) == d
