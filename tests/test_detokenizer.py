import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from engine.outputs import Logprob

SPECIALS = ["<|endoftext|>", "<|user|>", "<|observation|>"]
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Inference engines batch requests and page the KV cache.",
    "def add(a: int, b: int) -> int:\n    return a + b",
    "我们今天在北京吃了烤鸭，味道非常好。",
    "机器学习模型需要大量的数据来训练。",
    "日本語のテキストも少し入れておきます。",
    "한국어 문장도 하나 있습니다.",
    "Emoji time 😀🎉🚀 and a family 👨‍👩‍👧 plus flags 🇫🇷🇯🇵.",
    "Ünïcödé àccents: café, naïve, São Paulo, Ελληνικά, русский текст.",
    "Numbers 12345 67890 and symbols ~!@#$%^&*()_+{}|:<>?",
]


def _byte_tokens() -> dict[int, str]:
    """GPT-2 byte -> printable character mapping used by ByteLevel (to name single-byte tokens)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    corpus = []
    for i in range(400):
        a, b = rng.sample(LINES, 2)
        corpus.append(f"{a} {i} {b}")
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    t.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=t, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    return fast


def run_incremental(tok, ids, prompt=(), skip=True, rng=None) -> tuple[str, list[str]]:
    d = IncrementalDetokenizer(tok, list(prompt), skip_special_tokens=skip)
    chunks, i = [], 0
    while i < len(ids):
        step = rng.randint(1, 3) if rng else 1
        chunks.append(d.add_tokens(ids[i : i + step]))
        i += step
    chunks.append(d.flush())
    assert "".join(chunks) == d.output_text
    assert d.output_token_ids == list(ids)
    return "".join(chunks), chunks


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_one_shot_decode(tok, skip):
    rng = random.Random(1)
    vocab = len(tok)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        prompt = tok.encode(rng.choice(LINES))
        got, _ = run_incremental(tok, ids, prompt=prompt, skip=skip, rng=rng)
        assert got == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_real_text_streams_without_replacement_chars(tok, skip):
    rng = random.Random(2)
    for line in LINES:
        text = line + " <|user|> " + rng.choice(LINES) + "<tool_call>x</tool_call>"
        ids = tok.encode(text)
        got, chunks = run_incremental(tok, ids, skip=skip)
        assert got == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in c for c in chunks)  # never emits half a character
    assert "<|user|>" in tok.decode(tok.encode("a <|user|> b"), skip_special_tokens=False)


def test_multibyte_char_split_across_tokens(tok):
    b2c = _byte_tokens()
    char = "𝄞"  # 4 UTF-8 bytes, not in the training data: one token per byte
    byte_ids = [tok.convert_tokens_to_ids(b2c[b]) for b in char.encode()]
    assert len(byte_ids) == 4 and tok.decode(byte_ids) == char
    d = IncrementalDetokenizer(tok, tok.encode("hi "))
    assert [d.add_tokens([i]) for i in byte_ids] == ["", "", "", char]
    assert d.add_tokens(tok.encode("ok")) == "ok"
    assert d.flush() == ""


def test_invalid_bytes_become_replacement_chars(tok):
    b2c = _byte_tokens()
    lone = tok.convert_tokens_to_ids(b2c[0x80])  # a continuation byte without a lead byte
    lead = tok.convert_tokens_to_ids(b2c[0xE4])  # a lead byte that never gets its continuation
    d = IncrementalDetokenizer(tok, [])
    assert d.add_tokens([lone]) == ""  # can't tell yet
    assert d.add_tokens(tok.encode("a")) == "\ufffda"
    assert d.add_tokens([lead]) == ""
    assert d.flush() == "\ufffd"
    assert d.output_text == tok.decode([lone] + tok.encode("a") + [lead])


def test_special_tokens_skipped_or_verbatim(tok):
    ids = tok.encode("hello") + [tok.convert_tokens_to_ids("<|observation|>")] + tok.encode(" world")
    assert run_incremental(tok, ids, skip=True)[0] == "hello world"
    assert run_incremental(tok, ids, skip=False)[0] == "hello<|observation|> world"


def test_window_stays_small(tok):
    ids = tok.encode(" ".join(LINES) * 3)
    d = IncrementalDetokenizer(tok, [])
    for i in ids:
        d.add_tokens([i])
        # a held-back character spans at most 4 byte tokens: the decoded window stays small
        assert len(d._ids) - d._prefix_offset <= 8


def test_decode_logprob_tokens(tok):
    i = tok.encode("fox")[0]
    lps = [None, {i: Logprob(-0.1, 1)}]
    decode_logprob_tokens(tok, lps)
    assert lps[1][i].decoded_token == tok.decode([i])
