"""Constrained decoding (engine/grammar.py): outputs follow the grammar, sampled and greedy, with n > 1, with
suffix speculative decoding (same greedy tokens as without; every verify row masked with the grammar state
after its drafts), and only after the trigger token when one is given."""

from __future__ import annotations

import json

import llguidance
import pytest
import torch
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.grammar import SequenceGrammar, apply_grammar_masks
from engine.sampler import SampleRow, SamplingState
from engine.sampling_params import StructuredOutput
from model.tiny import tiny_model_dir

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(tiny_model_dir("bf16"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, device="cpu", max_model_len=2048)


def spec(model_dir: str, schema=SCHEMA, after=()) -> StructuredOutput:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    return StructuredOutput(grammar, model_dir, tuple(after))


def check(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"name", "n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    return value


def test_sampled_and_greedy_outputs_follow_the_schema(llm, model_dir):
    prompts = [{"prompt_token_ids": [5, 6, 7, 8 + i]} for i in range(3)]
    sampled = llm.generate(prompts, SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=200,
                                                    structured_output=spec(model_dir)))
    for out in sampled:
        for o in out.outputs:
            assert o.finish_reason == "stop", o
            check(o.text)
    greedy = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=200, structured_output=spec(model_dir)))
    check(greedy[0].outputs[0].text)
    # without the grammar the tiny model writes no JSON at all
    free = llm.generate(prompts[:1], SamplingParams(temperature=1.0, seed=1, max_tokens=40))
    with pytest.raises(ValueError):
        json.loads(free[0].outputs[0].text)


def test_speculative_verify_rows_follow_the_grammar(model_dir):
    plain = LLM(model_dir, device="cpu", max_model_len=2048)
    spec_llm = LLM(model_dir, device="cpu", max_model_len=2048, speculative_config={"method": "suffix"})
    # a prompt that repeats JSON-ish text, so the suffix drafter has something to propose
    tok = plain.get_tokenizer()
    ids = tok.encode('{"name": "ab", "n": 1, "ok": true} ' * 6, add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=120, structured_output=spec(model_dir))
    a = plain.generate([{"prompt_token_ids": ids}] * 2, params)
    b = spec_llm.generate([{"prompt_token_ids": ids}] * 2, params)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        check(y.outputs[0].text)
    stats = spec_llm.stats()
    assert stats["spec_draft_tokens"] > 0  # drafts were verified under the grammar


def test_verify_rows_get_the_state_after_their_drafts(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = 1536
    so = spec(model_dir)
    good = tok.encode('{"name":"xy', add_special_tokens=False)
    bad = [tok.convert_tokens_to_ids("<tool_call>")]  # a special token: never inside JSON
    state = SamplingState(SamplingParams(structured_output=so), [1, 2], [good[0]], eos_token_ids=[tok.eos_token_id])
    rows = [SampleRow(state, tuple(good[1:j])) for j in range(1, len(good))] + [SampleRow(state, tuple(good[1:]) + tuple(bad))]
    x = torch.zeros(len(rows), vocab)
    apply_grammar_masks(x, rows)
    # reference: a fresh matcher fed the same history, one row at a time
    for r, row in enumerate(rows[:-1]):
        ref = SequenceGrammar(so, vocab, state.all_stop_token_ids)
        ref.sync(state.output_token_ids, row.drafts)
        words = torch.full((1, vocab // 32), -1, dtype=torch.int32)
        assert ref.fill_mask(words, 0)
        bits = ((words[0][:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten().bool()
        assert torch.equal(x[r] == 0, bits), r
        assert 0 < int(bits.sum()) < vocab
    assert torch.all(x[-1] == 0)  # after a rejected draft: unmasked (verification discards the row)
    # the matcher still follows the committed output: a plain row now gets the first row's mask again
    x2 = torch.zeros(1, vocab)
    apply_grammar_masks(x2, [SampleRow(state)])
    assert torch.equal(x2[0], x[0])


def test_grammar_starts_after_the_trigger_token(llm, model_dir):
    tok = llm.get_tokenizer()
    think_end = tok.convert_tokens_to_ids("</think>")
    prompt = [{"prompt_token_ids": [5, 6, 7]}]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=200, skip_special_tokens=False,
                            structured_output=spec(model_dir, after=[think_end]),
                            logit_bias={think_end: 8.0})  # make the free part end soon
    out = llm.generate(prompt, params)[0].outputs[0]
    ids = out.token_ids
    assert think_end in ids and out.finish_reason == "stop"
    cut = ids.index(think_end)
    check(tok.decode(ids[cut + 1 :], skip_special_tokens=True))


def test_special_token_spelled_by_a_grammar_is_not_allowed_when_the_matcher_refuses_it(model_dir):
    """A regex that spells GLM's <tool_call> literally: llguidance's mask allows the special token, its matcher
    refuses it. The row must not allow it (sampling it would end the constraint); with nothing else allowed the
    output ends (stop tokens only). A grammar that goes on through ordinary text keeps its mask unchanged."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = 1536
    special = tok.convert_tokens_to_ids("<tool_call>")
    abc = tok.encode("abc", add_special_tokens=False)

    def mask_after_abc(pattern: str) -> tuple[SamplingState, torch.Tensor]:
        so = StructuredOutput(llguidance.grammar_from("regex", pattern), model_dir, ())
        state = SamplingState(SamplingParams(structured_output=so), [1, 2], list(abc), eos_token_ids=[tok.eos_token_id])
        x = torch.zeros(1, vocab)
        apply_grammar_masks(x, [SampleRow(state)])
        return state, x[0] == 0

    state, allowed = mask_after_abc("abc<tool_call>f")
    assert not allowed[special]
    assert set(allowed.nonzero().flatten().tolist()) == set(state.all_stop_token_ids)
    _, allowed = mask_after_abc("abc<x>f")  # ordinary text: the mask is llguidance's, "<" allowed
    assert allowed[tok.convert_tokens_to_ids("<")] and not allowed[special]
    assert not any(allowed[t] for t in state.all_stop_token_ids)


def test_output_ends_where_a_grammar_needs_a_special_tokens_text(llm, model_dir):
    so = StructuredOutput(llguidance.grammar_from("regex", "abc<tool_call>f"), model_dir, ())
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0.0, max_tokens=20,
                                                                         structured_output=so))[0].outputs[0]
    assert out.text == "abc" and out.finish_reason == "stop"
