"""Workloads for the serving benchmark: ``random`` single-turn prompts, ``agentic`` multi-turn sessions,
``agentic-edit`` multi-turn sessions that ask for held-out standard-library files back with small edits, and
``plain-code`` single-turn continuations of held-out files (no answer in the prompt).

Everything here is deterministic from the seed. With a tokenizer (any object with ``encode``/``decode``,
normally a transformers AutoTokenizer) lengths are counted in its tokens; without one they are estimated
(one token per word of the random prompt, one per word-or-punctuation run of synthetic code/JSON/logs).
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.code_corpus import (SourceFile, code_answer, continue_request, edit_request, glm_chat_text,
                               make_edits, stdlib_files)

# --------------------------------------------------------------------------------------------------------
# token counting


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


_WORDISH = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str, tokenizer: TokenizerLike | None) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return len(_WORDISH.findall(text))


def trim_to_tokens(text: str, n: int, tokenizer: TokenizerLike | None) -> str:
    """Cut text to at most n tokens (exactly n if it is longer, as far as re-encoding allows)."""
    if tokenizer is None:
        matches = list(_WORDISH.finditer(text))
        if len(matches) <= n:
            return text
        return text[: matches[n - 1].end()] if n > 0 else ""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= n:
        return text
    return tokenizer.decode(ids[:n])


def sample_len(rng: random.Random, target: int, range_ratio: float) -> int:
    """sglang's random-length rule: uniform integer in [max(int(target * ratio), 1), target]."""
    lo = max(int(target * range_ratio), 1)
    return rng.randint(lo, max(lo, target))


# --------------------------------------------------------------------------------------------------------
# request specs


@dataclass
class RequestSpec:
    """What one HTTP request sends: ``messages`` for the chat endpoint or ``prompt`` for completions."""

    prompt_len: int
    output_len: int
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    tools: list[dict] | None = None


# --------------------------------------------------------------------------------------------------------
# random dataset

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more what up out can "
    "about into than them some could only other time new these two may first then do any like my now over "
    "such our man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last might "
    "us great old year off come since against go came right used take three system model token cache server "
    "request layer value number small large group order point water place high start found open found light"
).split()


_CLEAN_WORD = re.compile(r"^ [A-Za-z]{2,}$")


def random_prompt(rng: random.Random, n: int, tokenizer: TokenizerLike | None,
                  vocab_ids: list[int] | None, word_ids: list[int] | None = None) -> tuple[str, int]:
    """A prompt of n tokens; returns (text, its token count).

    Without a tokenizer: n random common words (about one token each). With one: n random ids decoded,
    re-encoded and trimmed or topped up until the text re-encodes to exactly n tokens. When ``word_ids``
    (see ``clean_word_ids``) is given, the ids are " word" tokens that do not merge with their neighbours,
    so the first decode already re-encodes to n; arbitrary ids (byte fragments) need the correction rounds.
    """
    if tokenizer is None or not (vocab_ids or word_ids):
        return " ".join(rng.choice(_WORDS) for _ in range(n)), n
    pool = word_ids if word_ids else vocab_ids
    assert pool is not None
    ids = [pool[rng.randrange(len(pool))] for _ in range(n)]
    text, got = "", 0
    for _ in range(16):
        text = tokenizer.decode(ids)
        re_ids = tokenizer.encode(text, add_special_tokens=False)
        got = len(re_ids)
        if got == n:
            break
        if got > n:
            ids = re_ids[:n]
        else:
            ids = re_ids + [pool[rng.randrange(len(pool))] for _ in range(n - got)]
    return text, got


def plain_vocab_ids(tokenizer: Any) -> list[int]:
    """Token ids that are ordinary vocabulary: no special or added tokens (chat markers, <think>, ...)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 0)
    banned = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        banned.update(tokenizer.get_added_vocab().values())
    except Exception:  # noqa: BLE001 - not every tokenizer has it
        pass
    return [i for i in range(size) if i not in banned]


def roundtrip_ids(tokenizer: Any, vocab_ids: list[int]) -> tuple[list[int], list[int]]:
    """(ids whose decoded text re-encodes to exactly that id, the subset that decodes to " <letters>").

    Ids of the second kind are the best prompt material: with a whitespace-splitting pre-tokenizer
    (GPT-2/cl100k-style byte-level BPE, GLM's included) a text made of them tokenizes back to the same ids.
    Byte fragments (partial UTF-8) are excluded from both, since they decode to U+FFFD."""
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode([[i] for i in vocab_ids])
    else:
        texts = [tokenizer.decode([i]) for i in vocab_ids]
    cand = [(i, t) for i, t in zip(vocab_ids, texts) if t and "\ufffd" not in t]
    probe = [t for _, t in cand]
    if callable(tokenizer) and hasattr(tokenizer, "batch_decode") and probe:
        enc = tokenizer(probe, add_special_tokens=False)["input_ids"]
    else:
        enc = [tokenizer.encode(t, add_special_tokens=False) for t in probe]
    ok = [(i, t) for (i, t), e in zip(cand, enc) if list(e) == [i]]
    return [i for i, _ in ok], [i for i, t in ok if _CLEAN_WORD.match(t)]


def make_random_dataset(num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                        tokenizer: TokenizerLike | None = None, endpoint: str = "chat",
                        tokenize_prompt: bool = False) -> list[RequestSpec]:
    rng = random.Random(seed)
    vocab = plain_vocab_ids(tokenizer) if tokenizer is not None else None
    words = None
    if tokenizer is not None and vocab:
        clean, words = roundtrip_ids(tokenizer, vocab)
        vocab = clean or vocab
        if len(words) < 32:
            words = None  # too few to look random: arbitrary ids with correction rounds instead
    specs = []
    for _ in range(num_prompts):
        n_in = sample_len(rng, input_len, range_ratio)
        n_out = sample_len(rng, output_len, range_ratio)
        text, got = random_prompt(rng, n_in, tokenizer, vocab, words)
        if endpoint == "chat":
            specs.append(RequestSpec(got, n_out, messages=[{"role": "user", "content": text}]))
        elif tokenize_prompt and tokenizer is not None:
            ids = tokenizer.encode(text, add_special_tokens=False)[:n_in]
            specs.append(RequestSpec(len(ids), n_out, prompt=ids))
        else:
            specs.append(RequestSpec(got, n_out, prompt=text))
    return specs


# --------------------------------------------------------------------------------------------------------
# synthetic agent text: code, JSON, logs (deterministic from an rng)

_NOUNS = ("cache user request token batch page config session worker queue buffer index record event "
          "handler block tensor router metric client stream schedule shard layer result payload").split()
_VERBS = ("get load build parse update compute resolve flush merge apply fetch encode decode validate "
          "emit").split()
_ADJS = "pending active stale local remote cached partial default raw final next prev max min".split()
_DIRS = ("src", "lib", "core", "engine", "server", "utils", "api", "tests", "internal", "pkg")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARNING", "ERROR")
_EXCEPTIONS = ("KeyError", "ValueError", "TimeoutError", "AssertionError", "RuntimeError", "IndexError")

TOOLS: list[dict] = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file from the repository and return its contents.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "Path relative to the repository root."},
            "start_line": {"type": "integer"}, "end_line": {"type": "integer"}},
            "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "run_command", "description": "Run a shell command in the repository and return its output.",
        "parameters": {"type": "object", "properties": {
            "command": {"type": "string"}, "timeout_s": {"type": "integer"}}, "required": ["command"]}}},
    {"type": "function", "function": {
        "name": "search_code", "description": "Search the repository for a pattern; returns JSON matches.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "path": {"type": "string"}}, "required": ["query"]}}},
]


def _ident(rng: random.Random, parts: int = 2) -> str:
    words = [rng.choice(_VERBS)] + [rng.choice(_ADJS + _NOUNS) for _ in range(parts - 1)]
    return "_".join(words)


def _path(rng: random.Random, ext: str = "py") -> str:
    return f"{rng.choice(_DIRS)}/{rng.choice(_NOUNS)}/{rng.choice(_NOUNS)}_{rng.choice(_VERBS)}.{ext}"


def _code_lines(rng: random.Random) -> list[str]:
    """A Python function with a docstring, branches and a loop."""
    fn, a, b = _ident(rng), rng.choice(_NOUNS), rng.choice(_NOUNS) + "s"
    lines = [
        f"def {fn}(self, {a}: \"{a.capitalize()}\", {b}: list[int] | None = None) -> dict[str, int]:",
        f"    \"\"\"{rng.choice(_VERBS).capitalize()} the {rng.choice(_ADJS)} {a} and return "
        f"per-{rng.choice(_NOUNS)} counts.\"\"\"",
        f"    if {b} is None:",
        f"        {b} = self._{_ident(rng)}({a})",
        "    counts: dict[str, int] = {}",
        f"    for i, item in enumerate({b}):",
        f"        key = f\"{{{a}.{rng.choice(_NOUNS)}_id}}:{{i % {rng.randint(2, 64)}}}\"",
        f"        if item > self.{rng.choice(_ADJS)}_{rng.choice(_NOUNS)}:",
        "            counts[key] = counts.get(key, 0) + item",
        "        else:",
        "            logger.debug(\"skip %s (%d)\", key, item)",
        f"    self.{rng.choice(_NOUNS)}_{rng.choice(_NOUNS)}.update(counts)",
        "    return counts",
        "",
    ]
    if rng.random() < 0.5:
        exc, noun = rng.choice(_EXCEPTIONS), rng.choice(_NOUNS)
        lines[7:7] = ["        if item < 0:",
                      f"            raise {exc}(f\"negative {noun}: {{item}}\")"]
    return lines


def _file_text(rng: random.Random, path: str, n_funcs: int) -> list[str]:
    mod = path.rsplit("/", 1)[-1][:-3]
    title = mod.replace("_", " ").capitalize()
    lines = [f"\"\"\"{title}: helpers for the {rng.choice(_NOUNS)} pipeline.\"\"\"",
             "", "from __future__ import annotations", "", "import logging",
             f"from .{rng.choice(_NOUNS)} import {rng.choice(_NOUNS).capitalize()}, {_ident(rng)}", "",
             "logger = logging.getLogger(__name__)", "", "",
             f"class {rng.choice(_ADJS).capitalize()}{rng.choice(_NOUNS).capitalize()}Manager:"]
    for _ in range(n_funcs):
        lines += ["    " + ln if ln else "" for ln in _code_lines(rng)]
    return lines


def _log_lines(rng: random.Random, n: int) -> list[str]:
    t = rng.randint(0, 80_000_000)
    day = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    out = []
    for _ in range(n):
        t += rng.randint(1, 900)
        lvl = rng.choice(_LEVELS)
        msg = rng.choice([
            f"{rng.choice(_VERBS)} {rng.choice(_NOUNS)} id={rng.randint(1, 99999)} "
            f"took {rng.uniform(0.1, 900):.1f}ms",
            f"{rng.choice(_NOUNS)} queue depth={rng.randint(0, 512)} running={rng.randint(0, 64)}",
            f"retrying {rng.choice(_NOUNS)} after {rng.choice(_EXCEPTIONS)} (attempt {rng.randint(1, 5)}/5)",
            f"{_path(rng)}:{rng.randint(1, 800)} {rng.choice(_ADJS)} {rng.choice(_NOUNS)} ignored",
        ])
        logger = f"{rng.choice(_NOUNS)}.{rng.choice(_NOUNS)}"
        out.append(f"{day} {t // 3600000:02d}:{t // 60000 % 60:02d}:"
                   f"{t // 1000 % 60:02d}.{t % 1000:03d} {lvl:<7} [{logger}] {msg}")
    return out


def _pytest_lines(rng: random.Random, n: int) -> list[str]:
    out = ["============================= test session starts ==============================",
           f"collected {n} items", ""]
    failed = []
    for _ in range(n):
        name = f"tests/test_{rng.choice(_NOUNS)}.py::test_{_ident(rng, 3)}"
        ok = rng.random() < 0.85
        out.append(f"{name} {'PASSED' if ok else 'FAILED'} [{rng.randint(1, 99):>3}%]")
        if not ok:
            failed.append(name)
    for name in failed:
        exc = rng.choice(_EXCEPTIONS)
        out += ["", f"___________________ {name.split('::')[1]} ___________________",
                f">       assert result[{rng.randint(0, 9)}] == {rng.randint(0, 999)}",
                f"E       {exc}: {rng.choice(_ADJS)} {rng.choice(_NOUNS)} mismatch", "",
                f"{_path(rng)}:{rng.randint(10, 500)}: {exc}"]
    secs = rng.uniform(0.5, 60)
    out.append(f"======== {len(failed)} failed, {n - len(failed)} passed in {secs:.2f}s ========")
    return out


def _json_lines(rng: random.Random, n: int) -> list[str]:
    matches = [{"path": _path(rng), "line": rng.randint(1, 900),
                "text": (f"{_ident(rng)}(self.{rng.choice(_NOUNS)}, "
                         f"{rng.choice(_NOUNS)}_id={rng.randint(0, 999)})"),
                "score": round(rng.random(), 3)} for _ in range(n)]
    doc = {"query": _ident(rng), "total": n, "truncated": False, "matches": matches}
    return json.dumps(doc, indent=2).splitlines()


def _tool_call(rng: random.Random, turn: int) -> tuple[str, dict]:
    kind = rng.choice(("read_file", "read_file", "run_command", "search_code"))
    if kind == "read_file":
        return kind, {"path": _path(rng)}
    if kind == "run_command":
        return kind, {"command": rng.choice([f"pytest -x -q tests/test_{rng.choice(_NOUNS)}.py",
                                             f"tail -n 80 logs/{rng.choice(_NOUNS)}.log"])}
    return kind, {"query": _ident(rng), "path": rng.choice(_DIRS)}


def tool_result_text(rng: random.Random, name: str, args: dict, n_tokens: int,
                     tokenizer: TokenizerLike | None) -> str:
    """Realistic-looking output of a synthetic tool call, about n_tokens long (cut at a line boundary)."""
    lines: list[str] = []
    budget = 0
    while budget < n_tokens * 1.3 + 20:
        if name == "read_file":
            block = _file_text(rng, args.get("path", "x.py"), 2) if not lines else \
                ["    " + ln if ln else "" for ln in _code_lines(rng)]
        elif name == "run_command":
            if "pytest" in args.get("command", "") and not lines:
                block = _pytest_lines(rng, rng.randint(4, 10))
            else:
                block = _log_lines(rng, 8)
        else:
            block = _json_lines(rng, 3)
        lines += block
        budget += count_tokens("\n".join(block), None)
    out: list[str] = []
    used = 0
    for ln in lines:
        c = count_tokens(ln + "\n", tokenizer)
        if used + c > n_tokens and out:
            break
        out.append(ln)
        used += c
    return "\n".join(out)


def system_prompt_text(seed: int, n_tokens: int, tokenizer: TokenizerLike | None) -> str:
    """Shared agent instructions (identical for every session of a run), about n_tokens long."""
    if n_tokens <= 0:
        return ""
    rng = random.Random(f"system-{seed}")
    head = ("You are a coding agent working in a software repository. Use the tools to read files, search "
            "the code and run commands. Keep changes minimal, run the tests after every edit, and report "
            "what you changed and why. Never invent file contents; read them first.\n\n"
            "Repository conventions:\n")
    rules = []
    while count_tokens(head + "\n".join(rules), None) < n_tokens * 1.3 + 20:
        rules.append(f"- {rng.choice(_VERBS).capitalize()} {rng.choice(_ADJS)} {rng.choice(_NOUNS)}s "
                     f"through `{_path(rng)}`; never {rng.choice(_VERBS)} the {rng.choice(_NOUNS)} "
                     f"{rng.choice(_NOUNS)} directly (see `{_ident(rng)}`).")
    return trim_to_tokens(head + "\n".join(rules), n_tokens, tokenizer)


def task_text(rng: random.Random, n_tokens: int, tokenizer: TokenizerLike | None) -> str:
    """The first user turn of a session: a bug report with a pasted traceback and file, n_tokens long."""
    path = _path(rng)
    intro = (f"The {rng.choice(_NOUNS)} {rng.choice(_VERBS)} step fails intermittently in CI with "
             f"{rng.choice(_EXCEPTIONS)} when the {rng.choice(_NOUNS)} is {rng.choice(_ADJS)}. Find the "
             f"cause in `{path}`, fix it, and add a regression test. Log excerpt:\n")
    parts = [intro]
    parts += _log_lines(rng, 6)
    parts += ["", f"Current contents of {path}:", "```python"]
    while count_tokens("\n".join(parts), None) < n_tokens * 1.3 + 20:
        parts += _code_lines(rng)
    return trim_to_tokens("\n".join(parts), n_tokens, tokenizer)


# --------------------------------------------------------------------------------------------------------
# agentic sessions


@dataclass
class AgenticSession:
    """One multi-turn agent conversation. Turn k+1's prompt = turn k's prompt + the model's output + a
    synthetic tool call's result. Call ``next_request()`` then ``record_output()`` for each turn.

    On the chat endpoint the output goes back as an assistant message (``content``, plus
    ``reasoning_content`` when the model streamed reasoning, plus a synthetic ``tool_calls`` entry with
    tool_format "tool"), followed by the tool result. Whether past reasoning stays in the rendered prompt is
    up to the server's chat template (GLM-4.7 drops it by default), exactly as for a real agent."""

    session_id: int
    num_turns: int
    output_lens: list[int]
    tool_result_lens: list[int]
    seed: int
    tokenizer: TokenizerLike | None = None
    endpoint: str = "chat"  # "chat" → messages; "completions" → one growing text prompt
    tool_format: str = "tool"  # "tool": assistant tool_calls + role "tool"; "user": result as a user message
    messages: list[dict] = field(default_factory=list)
    text: str = ""
    prompt_len: int = 0  # running token estimate of the conversation (contents only, no template)
    turn: int = 0

    @classmethod
    def create(cls, session_id: int, num_turns: int, input_len: int, output_len: int, tool_result_len: int,
               range_ratio: float, seed: int, system_prompt: str, tokenizer: TokenizerLike | None = None,
               endpoint: str = "chat", tool_format: str = "tool") -> "AgenticSession":
        rng = random.Random(f"session-{seed}-{session_id}")
        n_in = sample_len(rng, input_len, range_ratio)
        out_lens = [sample_len(rng, output_len, range_ratio) for _ in range(num_turns)]
        tool_lens = [rng.randint(max(1, tool_result_len // 2), max(1, tool_result_len * 3 // 2))
                     for _ in range(num_turns)]
        s = cls(session_id, num_turns, out_lens, tool_lens, seed, tokenizer, endpoint, tool_format)
        task = task_text(rng, n_in, tokenizer)
        if system_prompt:
            s.messages.append({"role": "system", "content": system_prompt})
            s.text = system_prompt + "\n\n"
            s.prompt_len += count_tokens(system_prompt, tokenizer)
        s.messages.append({"role": "user", "content": task})
        s.text += f"User: {task}\n\nAssistant: "
        s.prompt_len += count_tokens(task, tokenizer)
        return s

    @property
    def done(self) -> bool:
        return self.turn >= self.num_turns

    def next_request(self) -> RequestSpec:
        if self.done:
            raise IndexError("session finished")
        n_out = self.output_lens[self.turn]
        if self.endpoint == "chat":
            return RequestSpec(self.prompt_len, n_out, messages=copy.deepcopy(self.messages),
                               tools=TOOLS if self.tool_format == "tool" else None)
        return RequestSpec(self.prompt_len, n_out, prompt=self.text)

    def record_output(self, content: str, reasoning: str = "") -> None:
        """Append the model's output of the current turn and the synthetic tool result for the next one."""
        rng = random.Random(f"turn-{self.seed}-{self.session_id}-{self.turn}")
        name, args = _tool_call(rng, self.turn)
        result = tool_result_text(rng, name, args, self.tool_result_lens[self.turn], self.tokenizer)
        call_id = f"call_{self.session_id}_{self.turn}"
        out_tokens = count_tokens(reasoning + content, self.tokenizer)
        if self.endpoint == "chat":
            assistant: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                assistant["reasoning_content"] = reasoning
            if self.tool_format == "tool":
                assistant["tool_calls"] = [{"id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": json.dumps(args)}}]
                self.messages += [assistant, {"role": "tool", "tool_call_id": call_id, "content": result}]
            else:
                self.messages += [assistant, {"role": "user",
                                              "content": f"Output of {name}({json.dumps(args)}):\n{result}"}]
        else:
            self.text += content + f"\n\nTool result of {name}({json.dumps(args)}):\n{result}\n\nAssistant: "
        self.prompt_len += out_tokens + count_tokens(result, self.tokenizer) + 8
        self.turn += 1


def make_agentic_sessions(num_sessions: int, num_turns: int, input_len: int, output_len: int,
                          tool_result_len: int, system_prompt_len: int, range_ratio: float, seed: int,
                          tokenizer: TokenizerLike | None = None, endpoint: str = "chat",
                          tool_format: str = "tool") -> list[AgenticSession]:
    system = system_prompt_text(seed, system_prompt_len, tokenizer)
    return [AgenticSession.create(i, num_turns, input_len, output_len, tool_result_len, range_ratio, seed,
                                  system, tokenizer, endpoint, tool_format) for i in range(num_sessions)]


# --------------------------------------------------------------------------------------------------------
# agentic-edit sessions and plain-code continuations (held-out standard-library files)

EDIT_SAME_FILE_PROB = 0.5  # a later turn edits the previous turn's file again (re-sent, as re-read)
EDIT_MAX_EDITS = 4  # edits per turn: 1..EDIT_MAX_EDITS
EDIT_OUTPUT_MARGIN = 4  # max_tokens = the expected answer's tokens + this (the `</think>` and end of turn)
_MIN_FILE_LINES = 12


def _code_chunk(rng: random.Random, files: list[SourceFile], n_tokens: int,
                tokenizer: TokenizerLike | None) -> tuple[str, str]:
    """(path, whole lines of one file totalling about n_tokens tokens), from a random line of a random file
    (one long enough, where there is one)."""
    long_enough = [f for f in files if len(f.text) >= 3 * n_tokens and f.text.count("\n") >= _MIN_FILE_LINES]
    f = rng.choice(long_enough or files)
    lines = f.text.splitlines(keepends=True)
    per_line = max(1.0, len(f.text) / max(1, len(lines)) / 3.5)  # rough tokens per line, to place the start
    start = rng.randint(0, max(0, len(lines) - int(n_tokens / per_line) - 1))
    end, used = start, 0
    while end < len(lines) and used < n_tokens:
        used += count_tokens(lines[end], tokenizer)
        end += 1
    while start > 0 and used < n_tokens:
        start -= 1
        used += count_tokens(lines[start], tokenizer)
    return f.rel, "".join(lines[start:end])


def heldout_code_files() -> list[SourceFile]:
    """The held-out standard-library files of this machine (the modules bench.train_small never trains on)."""
    files = stdlib_files("heldout")
    if not files:
        raise RuntimeError("no held-out standard-library source files (is the stdlib source installed?)")
    return files


@dataclass
class EditSession:
    """A multi-turn agentic editing session over held-out standard-library files. Each turn's user message
    gives a file (a run of whole lines) and asks for it back with a few small edits; the next turn carries the
    previous turns (the model's own answers as assistant messages) and either edits the same file again (its
    expected current version re-sent) or moves to a new one. Same interface as AgenticSession."""

    session_id: int
    num_turns: int
    user_texts: list[str]  # the user message of every turn, planned up front (independent of the outputs)
    expected: list[str]  # the answer each turn asks for: the edited file in a code fence
    paths: list[str]
    output_lens: list[int]
    tokenizer: TokenizerLike | None = None
    endpoint: str = "chat"
    messages: list[dict] = field(default_factory=list)
    prompt_len: int = 0
    turn: int = 0

    @classmethod
    def create(cls, session_id: int, num_turns: int, chunk_len: int, output_len: int, range_ratio: float,
               seed: int, system_prompt: str, files: list[SourceFile], tokenizer: TokenizerLike | None = None,
               endpoint: str = "chat") -> "EditSession":
        rng = random.Random(f"edit-session-{seed}-{session_id}")
        users, expected, paths, out_lens = [], [], [], []
        path, code = "", ""
        for k in range(num_turns):
            if k == 0 or rng.random() >= EDIT_SAME_FILE_PROB:
                path, code = _code_chunk(rng, files, sample_len(rng, chunk_len, range_ratio), tokenizer)
            edited, instructions = make_edits(code, rng, rng.randint(1, EDIT_MAX_EDITS))
            users.append(edit_request(path, code, instructions))
            expected.append(code_answer(edited))
            paths.append(path)
            out_lens.append(min(output_len, count_tokens(expected[-1], tokenizer) + EDIT_OUTPUT_MARGIN))
            code = edited
        s = cls(session_id, num_turns, users, expected, paths, out_lens, tokenizer, endpoint)
        if system_prompt:
            s.messages.append({"role": "system", "content": system_prompt})
            s.prompt_len += count_tokens(system_prompt, tokenizer)
        s._add_user()
        return s

    def _add_user(self) -> None:
        self.messages.append({"role": "user", "content": self.user_texts[self.turn]})
        self.prompt_len += count_tokens(self.user_texts[self.turn], self.tokenizer)

    @property
    def done(self) -> bool:
        return self.turn >= self.num_turns

    def next_request(self) -> RequestSpec:
        if self.done:
            raise IndexError("session finished")
        n_out = self.output_lens[self.turn]
        if self.endpoint == "chat":
            return RequestSpec(self.prompt_len, n_out, messages=copy.deepcopy(self.messages))
        return RequestSpec(self.prompt_len, n_out, prompt=glm_chat_text(self.messages))

    def record_output(self, content: str, reasoning: str = "") -> None:
        """Append the model's answer of the current turn (reasoning is dropped, as GLM-4.7's template does for
        turns before the last user message) and the next turn's request."""
        self.messages.append({"role": "assistant", "content": content})
        self.prompt_len += count_tokens(content, self.tokenizer) + 4
        self.turn += 1
        if not self.done:
            self._add_user()


def make_edit_sessions(num_sessions: int, num_turns: int, chunk_len: int, output_len: int,
                       system_prompt_len: int, range_ratio: float, seed: int,
                       tokenizer: TokenizerLike | None = None, endpoint: str = "chat",
                       files: list[SourceFile] | None = None) -> list[EditSession]:
    """agentic-edit: sessions whose turns give files of about chunk_len tokens; max_tokens per turn is the
    expected answer's length (+ EDIT_OUTPUT_MARGIN), at most output_len."""
    files = heldout_code_files() if files is None else files
    system = system_prompt_text(seed, system_prompt_len, tokenizer)
    return [EditSession.create(i, num_turns, chunk_len, output_len, range_ratio, seed, system, files,
                               tokenizer, endpoint) for i in range(num_sessions)]


def make_plain_code_dataset(num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                            tokenizer: TokenizerLike | None = None, endpoint: str = "chat",
                            files: list[SourceFile] | None = None) -> list[RequestSpec]:
    """plain-code: a run of whole lines of a held-out file (about input_len tokens) to continue for
    output_len tokens, each request from a different file while files last. Chat: a continuation request;
    completions: the raw code."""
    files = heldout_code_files() if files is None else files
    files = [f for f in files if len(f.text) >= 4 * input_len] or files  # long enough to give input_len
    rng = random.Random(f"plain-code-{seed}")
    order = list(range(len(files)))
    rng.shuffle(order)
    specs = []
    for i in range(num_prompts):
        f = files[order[i % len(order)]]
        path, head = _code_chunk(random.Random(f"plain-code-{seed}-{i}"), [f],
                                 sample_len(rng, input_len, range_ratio), tokenizer)
        n_out = sample_len(rng, output_len, range_ratio)
        if endpoint == "chat":
            text = continue_request(path, head)
            specs.append(RequestSpec(count_tokens(text, tokenizer), n_out,
                                     messages=[{"role": "user", "content": text}]))
        else:
            specs.append(RequestSpec(count_tokens(head, tokenizer), n_out, prompt=head))
    return specs
