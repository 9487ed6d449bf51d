"""Adversarial inputs to the offline API (LLM.generate / LLM.chat / SamplingParams): each is refused at submission
with a ValueError or TypeError naming the parameter, and afterwards the same LLM has every KV page back and gives
exactly the greedy tokens of a fresh LLM."""
from __future__ import annotations

import llguidance
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import MAX_N, StructuredOutput, ThinkingBudget
from engine_checks import assert_pages_clean

KW = dict(device="cpu", kv_block_size=16, num_kv_blocks=64, max_model_len=256)
GOOD = [{"prompt_token_ids": list(range(40, 70))}, "a prompt as text"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
INF, NAN = float("inf"), float("nan")


@pytest.fixture(scope="module")
def expected(tiny_bf16):
    fresh = LLM(str(tiny_bf16), **KW)
    return [o.outputs[0].token_ids for o in fresh.generate(GOOD, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(tiny_bf16, expected):
    return LLM(str(tiny_bf16), **KW)


@pytest.fixture(autouse=True)
def _still_serves(request, expected):
    yield
    if "llm" not in request.fixturenames:
        return
    llm = request.getfixturevalue("llm")
    assert_pages_clean(llm.engine)
    assert [o.outputs[0].token_ids for o in llm.generate(GOOD, GREEDY, use_tqdm=False)] == expected
    assert_pages_clean(llm.engine)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"temperature": NAN}, "temperature"),
    ({"temperature": INF}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"temperature": None}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": NAN}, "top_p"), ({"top_p": None}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.1}, "min_p"), ({"min_p": NAN}, "min_p"), ({"min_p": "0.1"}, "min_p"),
    ({"presence_penalty": 2.1}, "presence_penalty"), ({"presence_penalty": NAN}, "presence_penalty"),
    ({"frequency_penalty": -INF}, "frequency_penalty"), ({"frequency_penalty": None}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": NAN}, "repetition_penalty"),
    ({"repetition_penalty": INF}, "repetition_penalty"),
    ({"n": 0}, "n"), ({"n": 10**12}, "n"), ({"n": MAX_N + 1}, "n"), ({"n": True}, "n"), ({"n": 2.0}, "n"),
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": True}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": ""}, "stop"), ({"stop": ["ok", ""]}, "stop"), ({"stop": [1]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"logit_bias": {5: NAN}}, "logit_bias"), ({"logit_bias": {5: INF}}, "logit_bias"),
    ({"logit_bias": {5: -1e300}}, "logit_bias"), ({"logit_bias": {5: 1e300}}, "logit_bias"),
    ({"logit_bias": {1.5: 1.0}}, "logit_bias"), ({"logit_bias": {True: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: "1"}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"prompt_logprobs": 10**9}, "prompt_logprobs"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


def _grammar(tiny_bf16, grammar, after=()):
    so = StructuredOutput(grammar, str(tiny_bf16), after)
    return SamplingParams(temperature=0, max_tokens=4, structured_output=so)


@pytest.mark.parametrize("case, exc, field", [
    ("stop id out of vocab", ValueError, "stop_token_ids"),
    ("bias id out of vocab", ValueError, "logit_bias"),
    ("max_tokens past the context", ValueError, "max_tokens"),
    ("min_tokens past the context", ValueError, "min_tokens"),
    ("id out of vocab", ValueError, "prompt_token_ids"),
    ("negative id", ValueError, "prompt_token_ids"),
    ("float id", TypeError, "prompt_token_ids"),  # was int(1.5) = 1: another prompt, silently
    ("str id", TypeError, "prompt_token_ids"),  # was int("5"), silently
    ("None id", TypeError, "prompt_token_ids"),
    ("bool id", TypeError, "prompt_token_ids"),  # operator.index(True) == 1
    ("ids a string", TypeError, "prompt_token_ids"),
    ("ids not a list", TypeError, "prompt_token_ids"),
    ("empty ids", ValueError, "prompt is empty"),
    ("empty text", ValueError, "prompt is empty"),
    ("prompt too long", ValueError, "prompt is too long"),
    ("unknown dict key", ValueError, "unknown key"),  # was ignored: {"prompt": .., "prompt_token_id": ..} ran the text
    ("prompt None in dict", TypeError, "prompt must be a str"),
    ("prompts None", TypeError, "prompts"),
    ("not a prompt", ValueError, "each prompt"),
    ("params not SamplingParams", TypeError, "sampling_params"),
    ("params None in a list", TypeError, "sampling_params"),
    ("invalid grammar", ValueError, "structured_output"),  # was finish_reason "error" at the first sampled token
    ("grammar after id out of vocab", ValueError, "after_token_ids"),  # was accepted: the grammar never started
    ("grammar after id negative", ValueError, "after_token_ids"),
    ("budget end the grammar forbids", ValueError, "after_token_ids must hold"),  # the row had no token left
])
def test_bad_request_refused_at_submission(llm, tiny_bf16, case, exc, field):
    vocab, ctx = llm.engine.model_config.vocab_size, llm.engine.max_model_len
    valid = llguidance.LLMatcher.grammar_from_regex("[a-z]+")
    prompt, params = {"prompt_token_ids": [5, 6, 7]}, GREEDY
    if case == "stop id out of vocab":
        params = SamplingParams(stop_token_ids=[vocab])
    elif case == "bias id out of vocab":
        params = SamplingParams(logit_bias={vocab: 1.0})
    elif case == "max_tokens past the context":
        params = SamplingParams(max_tokens=ctx)
    elif case == "min_tokens past the context":
        params = SamplingParams(min_tokens=ctx)
    elif case in ("id out of vocab", "negative id", "float id", "str id", "None id", "bool id"):
        prompt = {"prompt_token_ids": [5, {"id out of vocab": vocab, "negative id": -1, "float id": 1.5,
                                           "str id": "5", "None id": None, "bool id": True}[case]]}
    elif case == "ids a string":
        prompt = {"prompt_token_ids": "567"}
    elif case == "ids not a list":
        prompt = {"prompt_token_ids": 5}
    elif case == "empty ids":
        prompt = {"prompt_token_ids": []}
    elif case == "empty text":
        prompt = ""
    elif case == "prompt too long":
        prompt = {"prompt_token_ids": [5] * ctx}
    elif case == "unknown dict key":
        prompt = {"prompt": "some text", "prompt_token_id": [5, 6]}
    elif case == "prompt None in dict":
        prompt = {"prompt": None}
    elif case == "prompts None":
        prompt = None
    elif case == "not a prompt":
        prompt = [[5, 6]]
    elif case == "params not SamplingParams":
        params = {"temperature": 0}
    elif case == "params None in a list":
        params = [None]
    elif case == "invalid grammar":
        params = _grammar(tiny_bf16, llguidance.LLMatcher.grammar_from_regex("[a-"))
    elif case == "grammar after id out of vocab":
        params = _grammar(tiny_bf16, valid, (vocab,))
    elif case == "grammar after id negative":
        with pytest.raises(exc, match=field):
            _grammar(tiny_bf16, valid, (-1,))
        return
    elif case == "budget end the grammar forbids":
        with pytest.raises(exc, match=field):
            SamplingParams(thinking_budget=ThinkingBudget(2, 7),
                           structured_output=StructuredOutput(valid, str(tiny_bf16), ()))
        assert SamplingParams(thinking_budget=ThinkingBudget(2, 7),  # the grammar starts after it: fine
                              structured_output=StructuredOutput(valid, str(tiny_bf16), (7,)))
        return
    with pytest.raises(exc, match=field):
        llm.generate(prompt, params, use_tqdm=False)


MIXED = [{"prompt_token_ids": list(range(10, 60))}, "hello world", {"prompt_token_ids": [3, 4]}]


@pytest.mark.parametrize("bad_at", [0, 1, 2])
def test_one_bad_prompt_fails_the_call_and_holds_nothing(llm, bad_at):
    # vLLM's contract: the call raises; requests already added are aborted (their pages freed, nothing left queued)
    prompts = list(MIXED)
    prompts[bad_at] = {"prompt_token_ids": [5, llm.engine.model_config.vocab_size]}
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate(prompts, SamplingParams(temperature=0, n=2, max_tokens=6, ignore_eos=True), use_tqdm=False)


@pytest.mark.parametrize("bad_at", [0, 2])
def test_one_bad_params_entry_fails_the_call_and_holds_nothing(llm, bad_at):
    params = [GREEDY, SamplingParams(n=2, max_tokens=6), SamplingParams(temperature=0, max_tokens=3)]
    params[bad_at] = "not params"  # was AttributeError: 'str' object has no attribute 'verify_token_ids'
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate(MIXED, params, use_tqdm=False)


@pytest.mark.parametrize("messages, exc, field", [
    ([], ValueError, "messages"),
    ([[]], ValueError, "messages"),
    (None, ValueError, "messages"),
    ("hello", ValueError, "messages"),
    ({"role": "user", "content": "hi"}, ValueError, "messages"),  # was KeyError: 0
    (["hello"], TypeError, r"messages\[0\]"),
    ([{}], ValueError, r"messages\[0\]\['role'\]"),  # was rendered without the message, silently
    ([{"content": "hi"}], ValueError, r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}], ValueError, r"messages\[1\]\['role'\]"),
    ([{"role": "user", "content": None}], TypeError, r"messages\[0\]\['content'\]"),
    ([{"role": "user", "content": 5}], TypeError, r"messages\[0\]\['content'\]"),
    ([[{"role": "user", "content": "hi"}], [{"role": "user"}]], TypeError, r"messages\[0\]\['content'\]"),
])
def test_malformed_chat_messages(llm, messages, exc, field):
    with pytest.raises(exc, match=field):
        llm.chat(messages, GREEDY, use_tqdm=False)


def test_valid_edges_still_work(llm):
    vocab = llm.engine.model_config.vocab_size
    ids = list(range(40, 70))
    base = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    # token ids as numpy ints / a tuple, top_k past the vocabulary (= off), a tiny top_p (= greedy), +-100 biases
    same = [
        ({"prompt_token_ids": np.array(ids)}, GREEDY),
        ({"prompt_token_ids": tuple(ids), "prompt": "echoed"}, GREEDY),
        ({"prompt_token_ids": ids}, SamplingParams(temperature=1.0, top_p=1e-9, seed=3, max_tokens=8, ignore_eos=True)),
        ({"prompt_token_ids": ids}, SamplingParams(temperature=0, top_k=vocab + 1, max_tokens=8, ignore_eos=True,
                                                   stop=[f"never{i}" for i in range(5000)])),
    ]
    outs = llm.generate([p for p, _ in same], [sp for _, sp in same], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [base] * len(same)
    assert outs[0].prompt_token_ids == ids and outs[1].prompt == "echoed"
    forced = llm.generate({"prompt_token_ids": ids}, SamplingParams(
        temperature=0.7, seed=1, max_tokens=3, ignore_eos=True, logit_bias={np.int64(5): 100, "6": -100.0}),
        use_tqdm=False)[0].outputs[0].token_ids
    assert forced == [5, 5, 5]
    banned = llm.generate({"prompt_token_ids": ids}, SamplingParams(  # -inf bans the greedy choice, nothing else
        temperature=0, max_tokens=1, ignore_eos=True, logit_bias={base[0]: -INF}), use_tqdm=False)[0]
    assert banned.outputs[0].token_ids[0] != base[0]
    assert SamplingParams(logit_bias={"7": 100}).logit_bias == {7: 100.0}
    chat = llm.chat([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": None}, {"role": "user", "content": "more"}],
                    GREEDY, use_tqdm=False)[0]
    assert len(chat.outputs[0].token_ids) == 8


@pytest.mark.parametrize("spec", [
    {"method": "bogus"}, {"method": "suffix", "num_speculative_tokens": 0},
    {"method": "suffix", "num_speculative_tokens": -1}, {"method": "suffix", "bogus": 1}, "suffix",
])
def test_bad_speculative_config(tiny_bf16, spec):
    with pytest.raises(ValueError, match="speculative_config"):
        LLM(str(tiny_bf16), speculative_config=spec, **KW)
