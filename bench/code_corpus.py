"""Real code every machine has: the Python standard library's source, split into training and held-out
modules, cut into whole-line chunks, and edited the way an agentic coding tool asks a model to edit.

Shared by bench.train_small (the training split, and the edit/continuation episodes it trains on) and the
agentic-edit / plain-code serving workloads (the held-out split), so that both speak the same prompt format.
Standard library only.
"""

from __future__ import annotations

import builtins
import hashlib
import keyword
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PERCENT = 8  # of module groups, by a hash of the group name
MAX_FILE_BYTES = 200_000  # bigger files are data tables, not code
# Top-level entries that are not code a model should learn from (tables, generated data, third-party code).
_SKIP_TOP = frozenset(
    {"site-packages", "dist-packages", "encodings", "pydoc_data", "__pycache__", "__phello__"}
)


@dataclass(frozen=True)
class SourceFile:
    rel: str  # path relative to the stdlib root, "/"-separated
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_group(rel: str) -> str:
    """The module a file belongs to, for the held-out split: its top-level package or module, and for a test
    of the test suite the module it tests (test/test_json/x.py -> json), so a module's tests are held out
    with it."""
    parts = rel.split("/")
    if parts[0] == "test" and len(parts) > 1:
        parts = parts[1:]
    name = parts[0].removesuffix(".py")
    return name.removeprefix("test_").strip("_") or name


def is_heldout(rel: str, percent: int = HELDOUT_PERCENT) -> bool:
    digest = hashlib.sha256(f"glint-stdlib-split:{module_group(rel)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < percent


def stdlib_files(
    split: str = "train", root: str | Path | None = None, max_bytes: int = MAX_FILE_BYTES
) -> list[SourceFile]:
    """The .py files of the standard library (sorted by path) of `split`: "train", "heldout" or "all".
    Files that are not UTF-8, empty, or larger than max_bytes are left out; line ends become "\\n"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    base = Path(root) if root is not None else stdlib_root()
    out = []
    for rel in _py_files(base):
        if split != "all" and is_heldout(rel) != (split == "heldout"):
            continue
        path = base / rel
        try:
            if path.stat().st_size > max_bytes:
                continue
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            out.append(SourceFile(rel, text if text.endswith("\n") else text + "\n"))
    return out


def extra_code_files(root: str | Path, max_total_bytes: int, seed: int = 0,
                     max_bytes: int = MAX_FILE_BYTES) -> list[SourceFile]:
    """More training code (e.g. this Python's site-packages, which unlike the stdlib differs per machine): a
    seeded sample of the .py files under root up to max_total_bytes, sorted by path. Packages named like a
    held-out stdlib module (typing_extensions for typing, importlib_metadata for importlib) are left out."""
    base = Path(root)
    held = {module_group(f.rel) for f in stdlib_files("heldout")}
    rels = _py_files(base)
    random.Random(seed).shuffle(rels)
    out, total = [], 0
    for rel in rels:
        top = rel.split("/")[0].removesuffix(".py").strip("_")
        if any(top == g or top.startswith(g + "_") for g in held):
            continue
        path = base / rel
        try:
            if path.stat().st_size > max_bytes:
                continue
            text = path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        if total + len(text) > max_total_bytes:
            break
        total += len(text)
        out.append(SourceFile(rel, text if text.endswith("\n") else text + "\n"))
    return sorted(out, key=lambda f: f.rel)


def _py_files(base: Path) -> list[str]:
    """Sorted "/"-separated paths of the .py files under base, not descending into skipped folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = Path(dirpath).relative_to(base).as_posix()
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in _SKIP_TOP]
            rel_dir = ""
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out += [f"{rel_dir}/{f}".lstrip("/") for f in filenames if f.endswith(".py")]
    return sorted(out)


def line_chunk(text: str, rng: random.Random, max_lines: int, min_lines: int = 8) -> str:
    """A random run of whole lines (between min_lines and max_lines of them), ending with a newline."""
    lines = text.splitlines(keepends=True)
    n = min(len(lines), max(min_lines, rng.randint(min_lines, max(min_lines, max_lines))))
    start = rng.randint(0, len(lines) - n) if len(lines) > n else 0
    return "".join(lines[start:start + n])


# --------------------------------------------------------------------------------------------------------
# edits

_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")
_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")
_AVOID = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"self", "cls"}
_WORDS = ("value item entry result buffer state count index name path data token cache limit offset size "
          "total record handle field parts chunk level flag").split()
_COMMENTS = ("keep the order stable", "checked by the caller", "see the module docstring", "cheap path first",
             "must not raise here", "the common case", "kept for compatibility", "avoid a second lookup",
             "matches the documented behaviour", "callers rely on this")  # fmt: skip


def _new_name(old: str, rng: random.Random, taken: set[str]) -> str:
    for _ in range(20):
        how = rng.randrange(4)
        if how == 0:
            new = f"{old}_{rng.choice(_WORDS)}"
        elif how == 1:
            new = f"{rng.choice(_WORDS)}_{old.lstrip('_')}"
            new = "_" + new if old.startswith("_") else new
        elif how == 2 and "_" in old.strip("_"):
            parts = old.split("_")
            i = rng.choice([k for k, p in enumerate(parts) if p])
            parts[i] = rng.choice(_WORDS)
            new = "_".join(parts)
        else:
            new = old[0].upper() + old[1:] if old[0].islower() else old[0].lower() + old[1:]
        if new != old and new not in taken and not keyword.iskeyword(new):
            return new
    return f"{old}_{len(taken)}"


def _unique_lines(lines: list[str], used: set[int]) -> list[int]:
    counts: dict[str, int] = {}
    for ln in lines:
        counts[ln.strip()] = counts.get(ln.strip(), 0) + 1
    return [i for i, ln in enumerate(lines)
            if i not in used and len(ln.strip()) >= 6 and counts[ln.strip()] == 1 and "`" not in ln]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


_CONTINUED = ("(", "[", "{", ",", "\\", "+", "=")


def _complete(line: str) -> bool:
    """Whether a line looks like a whole simple statement: brackets balanced, no triple quote, not
    continued."""
    t = line.strip()
    if t.endswith((":",) + _CONTINUED) or t.startswith((")", "]", "}")) or '"""' in t or "'''" in t:
        return False
    return all(t.count(a) == t.count(b) for a, b in ("()", "[]", "{}"))


def _deletable(lines: list[str], i: int) -> bool:
    """A simple statement whose block keeps another statement: not a block opener or a continued line, and
    not the only line of its block."""
    if not _complete(lines[i]):
        return False
    prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), None)
    nxt = next((ln for ln in lines[i + 1:] if ln.strip()), None)
    if prev is not None and prev.rstrip().endswith(_CONTINUED):
        return False
    if prev is not None and prev.rstrip().endswith(":"):
        return nxt is not None and _indent(nxt) == _indent(lines[i])
    return True


def make_edits(code: str, rng: random.Random, n_edits: int) -> tuple[str, list[str]]:
    """Apply n_edits small edits to `code` (whole lines, ending with a newline): renaming an identifier
    everywhere, changing an integer constant in one line, deleting a line, inserting a line. Returns the
    edited code and one instruction per edit; every instruction refers to the original code (each edited
    line is quoted and occurs once in it), and the edits touch different lines."""
    lines = code.splitlines(keepends=True)
    used: set[int] = set()
    instructions: list[str] = []
    replace: dict[int, str] = {}
    insert_after: dict[int, str] = {}
    rename: tuple[str, str] | None = None
    kinds = ["rename", "constant", "delete", "insert"]
    for _ in range(n_edits):
        rng.shuffle(kinds)
        for kind in kinds:
            cand = _unique_lines(lines, used)
            if kind == "rename" and rename is None:
                names = _IDENT.findall(code)
                counts: dict[str, int] = {}
                for nm in names:
                    counts[nm] = counts.get(nm, 0) + 1
                pool = sorted(nm for nm, c in counts.items() if c >= 2 and nm not in _AVOID)
                if pool:
                    old = rng.choice(pool)
                    rename = (old, _new_name(old, rng, set(names)))
                    instructions.append(f"Rename `{rename[0]}` to `{rename[1]}` everywhere.")
                    break
            elif kind == "constant":
                with_int = [i for i in cand
                            if _INT.search(lines[i]) and not lines[i].lstrip().startswith("#")]
                if with_int:
                    i = rng.choice(with_int)
                    m = rng.choice(list(_INT.finditer(lines[i])))
                    old_v = m.group()
                    new_v = str(int(old_v) + rng.choice((1, 2, 8, 10, 100)) if rng.random() < 0.7 else
                                max(0, int(old_v) - 1) if int(old_v) > 0 else 1)
                    replace[i] = lines[i][:m.start()] + new_v + lines[i][m.end():]
                    used.add(i)
                    instructions.append(f"In the line `{lines[i].strip()}`, change `{old_v}` to `{new_v}`.")
                    break
            elif kind == "delete":
                simple = [i for i in cand if _deletable(lines, i)]
                if simple:
                    i = rng.choice(simple)
                    replace[i] = ""
                    used.add(i)
                    instructions.append(f"Delete the line `{lines[i].strip()}`.")
                    break
            elif kind == "insert":
                if cand:
                    i = rng.choice(cand)
                    ln = lines[i]
                    indent = ln[: len(ln) - len(ln.lstrip())]
                    if ln.rstrip().endswith(":"):
                        indent += "    "
                    new = f"{indent}# {rng.choice(_COMMENTS)}\n"
                    insert_after[i] = new
                    used.add(i)
                    instructions.append(f"After the line `{ln.strip()}`, insert the line `{new.strip()}`.")
                    break
    out = []
    for i, ln in enumerate(lines):
        out.append(replace.get(i, ln))
        if i in insert_after:
            out.append(insert_after[i])
    edited = "".join(out)
    if rename is not None:
        edited = re.sub(rf"\b{re.escape(rename[0])}\b", rename[1], edited)
    return edited, instructions


# --------------------------------------------------------------------------------------------------------
# prompt format (the same in training and in the workloads)


def edit_request(path: str, code: str, instructions: list[str]) -> str:
    return (f"Here is `{path}`:\n```python\n{code}```\n\n"
            "Apply these edits and reply with the complete updated file only:\n"
            + "\n".join(f"- {s}" for s in instructions))


def code_answer(code: str) -> str:
    return f"```python\n{code}```"


def continue_request(path: str, head: str) -> str:
    return f"Continue `{path}` from where it stops; reply with code only.\n```python\n{head}```"


def glm_chat_text(
    messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = True
) -> str:
    """What the GLM-4.7 chat template (model/tiny_assets/chat_template.jinja) renders for plain-text system,
    user and assistant messages without tools or reasoning: each assistant turn as `<|assistant|></think>`
    plus its trimmed content; the generation prompt ends with `<think>` (thinking on) or `</think>`."""
    out = ["[gMASK]<sop>"]
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "system":
            out.append("<|system|>" + content)
        elif role == "user":
            out.append("<|user|>" + content)
        elif role == "assistant":
            out.append("<|assistant|></think>" + content.strip())
        else:
            raise ValueError(f"glm_chat_text renders system/user/assistant messages, not {role!r}")
    if add_generation_prompt:
        out.append("<|assistant|>" + ("<think>" if enable_thinking else "</think>"))
    return "".join(out)
