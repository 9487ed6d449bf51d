"""server/prompt_encoder.py: chat prompts tokenized in message pieces, cached, give exactly the ids of tokenizing the
whole prompt, turn after turn and after evictions; tokenizers the cut does not hold for fall back to whole prompts."""
from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import server.prompt_encoder as pe
from bench.prompt_encode import GLM_SPECIALS, GLM_SPLIT
from model.tiny import tiny_model_dir
from server.chat_template import ChatTemplate
from server.prompt_encoder import ROLE_MARKERS, PromptEncoder, cut_markers

WORDS = ("def", "return", "the", "file", " ", "\n", "\n\n", "  ", "\t", "é", "中文", "'ll", "123", "x=1;", "<|user",
         "|>", "<", "|", "assistant", "{\"a\": [1, 2]}", "</think", "<tool_call", "!!", "\r\n")


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(("", " ")) for _ in range(n))


def _conversation(rng: random.Random, turns: int) -> tuple[list[dict], list[dict]]:
    tools = [{"type": "function", "function": {"name": f"tool{i}", "description": _text(rng, 12), "parameters": {
        "type": "object", "properties": {"p": {"type": "string", "description": _text(rng, 4)}}}}} for i in range(3)]
    msgs: list[dict] = [{"role": "system", "content": _text(rng, 60)}, {"role": "user", "content": _text(rng, 20)}]
    for t in range(turns):
        msgs.append({"role": "assistant", "content": _text(rng, 8), "reasoning_content": _text(rng, 10),
                     "tool_calls": [{"id": f"c{t}", "type": "function",
                                     "function": {"name": "tool1", "arguments": {"p": _text(rng, 3)}}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{t}", "content": _text(rng, rng.randrange(1, 80))})
        if rng.random() < 0.3:
            msgs.append({"role": "user", "content": _text(rng, 6)})
    return msgs, tools


def _glm_like_tokenizer(lstrip_user: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GLM_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [_text(rng, 200) for _ in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=lstrip_user and t == "<|user|>")
                            for t in GLM_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _whole(tok, text: str) -> list[int]:
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(tiny_model_dir("bf16"))


@pytest.mark.parametrize("which", ["tiny", "glm_split"])
def test_pieces_give_the_whole_prompts_ids_turn_after_turn(tiny_tok, which):
    """Conversations growing turn by turn (the agentic pattern), rendered by the chat template: every turn's ids
    equal the whole prompt's, the cache serves the earlier turns' messages, and a small cache evicts yet stays
    exact."""
    tok = tiny_tok if which == "tiny" else _glm_like_tokenizer()
    template = ChatTemplate(tiny_tok).template or tiny_tok.chat_template
    for max_chars in (1 << 20, 300):
        enc = PromptEncoder(tok, max_chars)
        assert enc.cuts
        rng = random.Random(7)
        for _ in range(3):
            msgs, tools = _conversation(rng, 6)
            for n in range(2, len(msgs) + 1):
                text = tok.apply_chat_template(msgs[:n], tools=tools, chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
                assert enc.encode(text) == _whole(tok, text)
            assert enc.cached_chars() <= max_chars
        if max_chars > 300:
            assert enc.hit_chars > 3 * enc.miss_chars  # later turns mostly came from the cache


def test_a_repeated_prompt_is_served_from_the_cache(tiny_tok):
    enc = PromptEncoder(tiny_tok, 1 << 20)
    text = "[gMASK]<sop><|system|>be brief<|user|>hi there<|assistant|><think>"
    first = enc.encode(text)
    assert enc.miss_chars == len(text) and enc.hit_chars == 0
    assert enc.encode(text) == first == _whole(tiny_tok, text)
    assert enc.miss_chars == len(text) and enc.hit_chars == len(text)
    assert enc.pieces(text) == ["[gMASK]<sop>", "<|system|>be brief", "<|user|>hi there", "<|assistant|><think>"]
    for odd in ("<|<|user|>x", "<|user|><|user|>", "a<|use<|assistant|>", "<|", "", "<|observation|>"):
        assert "".join(enc.pieces(odd)) == odd and enc.encode(odd) == _whole(tiny_tok, odd)
    assert enc.pieces("<|<|user|>x<|user") == ["<|", "<|user|>x<|user"]


def test_off_and_fallbacks(tiny_tok, monkeypatch):
    """0 chars: every prompt whole, nothing kept. A marker that strips whitespace: no cut (the flags say so), and
    were it used anyway the start-up probe finds the cut inexact and turns it off; the ids stay the whole text's."""
    text = "[gMASK]<sop><|system|>a b <|user|>  hi\n<|assistant|>"
    off = PromptEncoder(tiny_tok, 0)
    assert off.encode(text) == _whole(tiny_tok, text) and off.cached_chars() == 0 and not off.cuts
    stripping = _glm_like_tokenizer(lstrip_user=True)
    assert cut_markers(stripping) == ()
    assert cut_markers(_glm_like_tokenizer()) == ROLE_MARKERS
    enc = PromptEncoder(stripping, 1 << 20)
    assert not enc.cuts and enc.encode(text) == _whole(stripping, text)
    monkeypatch.setattr(pe, "cut_markers", lambda tok: ROLE_MARKERS)  # the flags ignored: the probe must catch it
    forced = PromptEncoder(stripping, 1 << 20)
    assert not forced.cuts and forced.encode(text) == _whole(stripping, text)
    # the probe really tells them apart: cutting this tokenizer's text changes its ids
    pieces = [p for p in ("[gMASK]<sop><|system|>a b ", "<|user|>  hi\n", "<|assistant|>")]
    assert [i for p in pieces for i in _whole(stripping, p)] != _whole(stripping, text)
