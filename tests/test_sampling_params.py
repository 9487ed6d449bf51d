import pickle

import pytest

from engine.sampling_params import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0
    assert p.max_tokens is None  # not vLLM's 16: the engine clamps to the context
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.is_greedy and not p.has_penalties


def test_normalization():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(logit_bias={"12": -100}).logit_bias == {12: -100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"n": 2, "best_of": 3}, "best_of"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": 5}, "stop must be a str or a list of str"),  # was a bare "'int' object is not iterable"
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of int"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids must be a list of int"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_valid_edges():
    SamplingParams(top_p=1.0, min_p=1.0, min_tokens=3, max_tokens=3, logprobs=20, prompt_logprobs=0)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.5, n=3, best_of=3)


def test_verify_token_ids():
    p = SamplingParams(stop_token_ids=[5], logit_bias={7: 1.0})
    p.verify_token_ids(8)
    with pytest.raises(ValueError, match="logit_bias"):
        p.verify_token_ids(7)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[9]).verify_token_ids(8)


def test_pickles():
    p = SamplingParams(temperature=0.7, stop=["a"], logit_bias={1: 2.0}, seed=3)
    q = pickle.loads(pickle.dumps(p))
    assert q == p
