"""Tokenizing an agentic chat prompt on the server's host: the whole prompt as before vs server/prompt_encoder.py.

    python -m bench.prompt_encode [--turns 60] [--reps 5]

An agentic conversation like Claude Code's late in a task (a ~12K-character system prompt, 20 tools, `--turns`
rounds of reasoning + a tool call + a ~2K-character tool result; ~150K characters at 60 turns), rendered by the tiny
checkpoint's GLM-4.7 chat template, then tokenized by two tokenizers: the tiny checkpoint's (a 1.5K-vocab byte-level
BPE) and a GLM-like one trained here (a byte-level BPE of --vocab tokens over the Python standard library's sources,
with GLM-4's pre-tokenizer split pattern and GLM's special tokens; the real GLM-4.7 tokenizer cannot be downloaded
here). Per tokenizer, median ms of --reps:

  encode       the whole prompt through Tokenizer.encode (the server's path before: holds the GIL)
  batch        the whole prompt through Tokenizer.encode_batch (releases the GIL)
  cold         PromptEncoder on an empty cache (every message piece tokenized, through encode_batch)
  next turn    PromptEncoder on the prompt with one more round, the previous prompt cached

and "stall": the longest a thread sleeping 1 ms at a time (the server's event loop, which streams every other
request's tokens) waited while another thread ran that tokenization. CPU only.
"""
from __future__ import annotations

import argparse
import glob
import random
import statistics
import sysconfig
import threading
import time
from collections.abc import Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.tiny import tiny_model_dir
from server.prompt_encoder import ROLE_MARKERS, PromptEncoder

GLM_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", *ROLE_MARKERS, "<think>",
                "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>",
                "</arg_key>", "<arg_value>", "</arg_value>"]


def glm_like_tokenizer(vocab: int, corpus_chars: int) -> PreTrainedTokenizerFast:
    texts, n = [], 0
    for path in sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/**/*.py", recursive=True)):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError):
            continue
        n += len(texts[-1])
        if n > corpus_chars:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GLM_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def conversation(turns: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    words = ("the of and to in is that for it with as was on be by this are from or have an which code file def "
             "return import class self value None True if else for while try except raise").split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    tools = [{"type": "function", "function": {"name": f"tool{i}", "description": text(80), "parameters": {
        "type": "object", "properties": {f"p{j}": {"type": "string", "description": text(15)} for j in range(5)},
        "required": ["p0"]}}} for i in range(20)]
    msgs: list[dict] = [{"role": "system", "content": text(3000)}, {"role": "user", "content": text(200)}]
    for t in range(turns):
        msgs.append({"role": "assistant", "content": text(30), "reasoning_content": text(60), "tool_calls": [
            {"id": f"c{t}", "type": "function", "function": {"name": "tool1", "arguments": {"p0": text(5)}}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{t}", "content": text(350)})
    return msgs, tools


def timed(fn: Callable[[object], object], reps: int, setup: Callable[[], object] = lambda: None
          ) -> tuple[float, float]:
    """(median ms of `reps` calls fn(setup()), setup untimed; the longest a thread sleeping 1 ms at a time waited
    for a wake-up that fell due during one of those calls, ms)."""
    calls: list[tuple[float, float]] = []
    wakeups: list[tuple[float, float]] = []  # (when the sleeper was due, when it ran)
    done = threading.Event()

    def work() -> None:
        for _ in range(reps):
            arg = setup()
            time.sleep(0.02)  # the sleeper catches up after the setup (which may hold the GIL itself)
            t0 = time.perf_counter()
            fn(arg)
            calls.append((t0, time.perf_counter()))
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        due = time.perf_counter() + 0.001
        time.sleep(0.001)
        wakeups.append((due, time.perf_counter()))
    worker.join()
    late = [ran - due for due, ran in wakeups if any(a <= due <= b for a, b in calls)]
    return statistics.median((b - a) * 1e3 for a, b in calls), max(late, default=0.0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=50000, help="the GLM-like tokenizer's vocabulary")
    ap.add_argument("--corpus-chars", type=int, default=12_000_000, help="its training text (stdlib sources)")
    args = ap.parse_args()
    tiny = AutoTokenizer.from_pretrained(tiny_model_dir("bf16"))
    msgs, tools = conversation(args.turns + 1)
    render = lambda n: tiny.apply_chat_template(msgs[:n], tools=tools, tokenize=False,  # noqa: E731
                                                add_generation_prompt=True)
    prev, prompt = render(len(msgs) - 2), render(len(msgs))
    print(f"{args.turns + 1} rounds: {len(prompt):,} characters ({len(prev):,} the turn before)")
    print(f"{'tokenizer':34} {'tokens':>7} | {'encode':>7} {'stall':>6} | {'batch':>7} {'stall':>6} | "
          f"{'cold':>7} {'stall':>6} | {'next turn':>9} {'stall':>6}   (ms)")
    for name, tok in (("tiny (1.5K byte-level BPE)", tiny),
                      (f"GLM-like ({args.vocab // 1000}K BPE, GLM split)", glm_like_tokenizer(args.vocab,
                                                                                           args.corpus_chars))):
        backend = tok.backend_tokenizer
        ids = backend.encode(prompt, add_special_tokens=False).ids
        whole = timed(lambda _: backend.encode(prompt, add_special_tokens=False), args.reps)
        batch = timed(lambda _: backend.encode_batch([prompt], add_special_tokens=False), args.reps)
        cold = timed(lambda enc: enc.encode(prompt), args.reps, lambda: PromptEncoder(tok, 1 << 30))

        def previous_turn_cached() -> PromptEncoder:
            enc = PromptEncoder(tok, 1 << 30)
            assert enc.encode(prev) == backend.encode(prev, add_special_tokens=False).ids
            return enc

        warm = timed(lambda enc: enc.encode(prompt), args.reps, previous_turn_cached)  # the new round's pieces miss
        enc = previous_turn_cached()
        assert enc.encode(prompt) == ids and enc.cuts
        print(f"{name:34} {len(ids):>7,} | {whole[0]:7.1f} {whole[1]:6.1f} | {batch[0]:7.1f} {batch[1]:6.1f} | "
              f"{cold[0]:7.1f} {cold[1]:6.1f} | {warm[0]:9.1f} {warm[1]:6.1f}", flush=True)


if __name__ == "__main__":
    main()
