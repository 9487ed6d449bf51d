"""Training data of bench.train_small: standard-library code as one token stream, and chat episodes packed
into rows. An episode is what the agentic-edit / plain-code workloads send, rendered as GLM-4.7's chat
template does, followed by the ideal answer and the end of turn:

    edit        a file chunk and a few edit instructions -> the edited chunk
    edit-multi  2-3 such turns, later turns often re-editing the previous turn's result (re-sent)
    continue    the start of a chunk -> its continuation

Episode texts are made in worker processes (plain Python, before any GPU work); chunk sizes are chosen in
characters (CHARS_PER_TOKEN) so that an episode about fits one training row.
"""

from __future__ import annotations

import multiprocessing
import random

import torch

from bench.code_corpus import (SourceFile, code_answer, continue_request, edit_request, glm_chat_text,
                               make_edits)
from bench.datasets import EDIT_MAX_EDITS, EDIT_SAME_FILE_PROB, system_prompt_text

CHARS_PER_TOKEN = 3.7  # standard-library code under an 8K byte-level BPE (measured: 3.70)
EPISODE_KINDS = ("edit", "edit-multi", "continue")
EPISODE_WEIGHTS = (0.45, 0.35, 0.2)
SYSTEM_PROB = 0.3  # episodes that start with a system prompt (a synthetic one, as the workloads send)
END_OF_TURN = "<|user|>"  # the first EOS id of the GLM template: what follows an assistant answer


def _lines(text: str, rng: random.Random, n_chars: int, start: int | None = None) -> tuple[str, int]:
    """(whole lines from line `start` (random if None) totalling about n_chars characters, the next line)."""
    lines = text.splitlines(keepends=True)
    if start is None:
        start = rng.randrange(len(lines))
    end, used = start, 0
    while end < len(lines) and (used < n_chars or end == start):
        used += len(lines[end])
        end += 1
    return "".join(lines[start:end])[: 4 * n_chars + 200], end


def episode_text(rng: random.Random, files: list[SourceFile], row_tokens: int) -> str:
    """One training episode (see the module docstring), about at most row_tokens tokens long."""
    kind = rng.choices(EPISODE_KINDS, EPISODE_WEIGHTS)[0]
    messages: list[dict] = []
    budget = row_tokens
    if rng.random() < SYSTEM_PROB:
        n = rng.randint(16, max(16, row_tokens // 8))
        messages.append({"role": "system", "content": system_prompt_text(rng.randrange(1 << 30), n, None)})
        budget -= n
    if kind == "continue":
        f = rng.choice(files)
        head_tok = rng.randint(16, max(16, budget // 2))
        head, nxt = _lines(f.text, rng, int(head_tok * CHARS_PER_TOKEN))
        rest_tok = rng.randint(16, max(16, budget - head_tok - 40))
        has_more = nxt < f.text.count("\n")
        rest = _lines(f.text, rng, int(rest_tok * CHARS_PER_TOKEN), nxt)[0] if has_more else ""
        messages.append({"role": "user", "content": continue_request(f.rel, head)})
        answer = code_answer(rest or "pass\n")
    else:
        turns = 1 if kind == "edit" else rng.randint(2, 3)
        chunk_tok = max(16, (budget - 70 * turns) // (2 * turns))
        path, code = "", ""
        for k in range(turns):
            if k == 0 or rng.random() >= EDIT_SAME_FILE_PROB:
                f = rng.choice(files)
                path = f.rel
                code = _lines(f.text, rng, int(rng.randint(16, chunk_tok) * CHARS_PER_TOKEN))[0]
            edited, instructions = make_edits(code, rng, rng.randint(1, EDIT_MAX_EDITS))
            messages.append({"role": "user", "content": edit_request(path, code, instructions)})
            answer = code_answer(edited)
            if k < turns - 1:
                messages.append({"role": "assistant", "content": answer})
            code = edited
    thinking = rng.random() < 0.5  # the prompt ends with <think> (the model closes it) or with </think>
    return glm_chat_text(messages, True, thinking) + ("</think>" if thinking else "") + answer + END_OF_TURN


_WORK: tuple[list[SourceFile], int] | None = None  # (files, row tokens) of the forked episode workers


def _episodes(seed_count: tuple[int, int]) -> list[str]:
    assert _WORK is not None
    seed, n = seed_count
    rng = random.Random(seed)
    return [episode_text(rng, _WORK[0], _WORK[1]) for _ in range(n)]


def make_episodes(files: list[SourceFile], n: int, row_tokens: int, seed: int, workers: int = 1) -> list[str]:
    """n episode texts (deterministic for a seed and worker count), made in `workers` forked processes."""
    global _WORK
    _WORK = (files, row_tokens)
    per = -(-n // max(1, workers))
    jobs = [(seed * 100003 + i, min(per, n - i * per)) for i in range(max(1, workers)) if n - i * per > 0]
    if workers <= 1:
        return [t for job in jobs for t in _episodes(job)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return [t for part in pool.map(_episodes, jobs) for t in part]


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (special-token strings such as <|user|> become their ids)."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def token_stream(docs: list[list[int]], sep_id: int) -> torch.Tensor:
    """The documents joined with `sep_id` after each, int64 [N]."""
    out: list[int] = []
    for d in docs:
        out += d
        out.append(sep_id)
    return torch.tensor(out, dtype=torch.long)


def raw_windows(stream: torch.Tensor, rows: int, row_len: int, gen: torch.Generator) -> torch.Tensor:
    """`rows` windows of row_len tokens at random offsets of the stream, [rows, row_len]."""
    if len(stream) <= row_len:
        stream = stream.repeat(row_len // max(1, len(stream)) + 2)
    starts = torch.randint(0, len(stream) - row_len, (rows,), generator=gen)
    return torch.stack([stream[s:s + row_len] for s in starts.tolist()])


def pack_episodes(
    episodes: list[list[int]], stream: torch.Tensor, row_len: int, gen: torch.Generator
) -> torch.Tensor:
    """Whole episodes packed into rows of row_len tokens, each row starting at an episode start (an episode
    longer than a row is cut); the space left in a row is filled with raw code. [rows, row_len]"""
    rows: list[torch.Tensor] = []
    cur: list[int] = []

    def close() -> None:
        fill = raw_windows(stream, 1, row_len - len(cur), gen)[0] if len(cur) < row_len else torch.empty(0)
        rows.append(torch.cat([torch.tensor(cur, dtype=torch.long), fill.long()]))

    for ep in episodes:
        ep = ep[:row_len]
        if cur and len(cur) + len(ep) > row_len:
            close()
            cur = []
        cur += ep
    if cur:
        close()
    return torch.stack(rows)
