"""The standard-library code corpus (bench/code_corpus.py), the agentic-edit and plain-code workloads built on
it (bench/datasets.py) and the training episodes of bench.train_small (bench/train_data.py): CPU, fast."""

from __future__ import annotations

import random
import re

import pytest
import torch

from bench.code_corpus import (SourceFile, code_answer, edit_request, extra_code_files, glm_chat_text,
                               is_heldout, make_edits, module_group, stdlib_files)
from bench.datasets import (EDIT_OUTPUT_MARGIN, count_tokens, make_edit_sessions, make_plain_code_dataset)
from bench.train_data import END_OF_TURN, episode_text, make_episodes, pack_episodes, token_stream

_CODE_RE = re.compile(r"```python\n(.*?)```", re.S)


def _fake_files(n: int = 6) -> list[SourceFile]:
    rng = random.Random(5)
    files = []
    for k in range(n):
        body = []
        for f in range(12):
            body += [f"def func_{k}_{f}(value, limit={rng.randint(1, 99)}):",
                     f"    total_{f} = value * {rng.randint(2, 9)}",
                     f"    if total_{f} > limit:",
                     f"        return limit - {rng.randint(0, 5)}",
                     f"    helper_name = compute(total_{f}, value)",
                     "    return helper_name", ""]
        files.append(SourceFile(f"pkg{k}/mod.py", "\n".join(body) + "\n"))
    return files


# --------------------------------------------------------------------------------------------------------
# corpus and split


def test_module_groups_keep_tests_with_their_module():
    assert module_group("json/decoder.py") == "json"
    assert module_group("test/test_json/test_decode.py") == "json"
    assert module_group("test/test_typing.py") == module_group("typing.py") == "typing"
    assert is_heldout("test/test_json/x.py") == is_heldout("json/__init__.py")


def test_stdlib_split_is_disjoint_and_nonempty():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert len(train) > 200 and len(held) > 10
    assert not {f.rel for f in train} & {f.rel for f in held}
    assert not {module_group(f.rel) for f in train} & {module_group(f.rel) for f in held}
    assert all(is_heldout(f.rel) for f in held) and not any(is_heldout(f.rel) for f in train)
    assert all(f.text.endswith("\n") and "\r" not in f.text for f in held)
    assert not any(f.rel.startswith(("site-packages/", "encodings/")) for f in train + held)


def test_extra_code_leaves_out_held_out_names_and_keeps_the_cap(tmp_path):
    held = sorted({module_group(f.rel) for f in stdlib_files("heldout")})[0]
    files = {f"{held}_backport/core.py": "x = 1\n", f"{held}.py": "y = 2\n", "pkg/a.py": "a = 1\n" * 10,
             "pkg/b.py": "b = 2\n" * 10, "pkg/c.py": "c = 3\n" * 10, "pkg/__pycache__/d.py": "d = 4\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    got = extra_code_files(tmp_path, 10_000, seed=0)
    assert [f.rel for f in got] == ["pkg/a.py", "pkg/b.py", "pkg/c.py"]
    capped = extra_code_files(tmp_path, 130, seed=0)
    assert len(capped) == 2 and capped == extra_code_files(tmp_path, 130, seed=0)


# --------------------------------------------------------------------------------------------------------
# edits


def _rn(line: str, rename: tuple[str, str] | None) -> str:
    return re.sub(rf"\b{re.escape(rename[0])}\b", rename[1], line) if rename else line


@pytest.mark.parametrize("seed", range(40))
def test_edits_do_what_the_instructions_say(seed):
    rng = random.Random(seed)
    files = stdlib_files("heldout") if seed % 2 else _fake_files()
    f = files[rng.randrange(len(files))]
    lines = f.text.splitlines(keepends=True)
    start = rng.randrange(max(1, len(lines) - 60))
    code = "".join(lines[start:start + 60])
    edited, instructions = make_edits(code, rng, rng.randint(1, 4))
    assert edited != code and 1 <= len(instructions)
    rename = None
    deleted = [m.group(1) for ins in instructions if (m := re.fullmatch(r"Delete the line `(.*)`\.", ins))]
    for ins in instructions:
        m = re.fullmatch(r"Rename `(\w+)` to `(\w+)` everywhere\.", ins)
        if m:
            rename = (m.group(1), m.group(2))
            old, new_name = (rf"\b{re.escape(x)}\b" for x in rename)
            assert not re.search(old, edited) and len(re.findall(old, code)) >= 2
            kept = len(re.findall(old, code)) - sum(len(re.findall(old, d)) for d in deleted)
            assert len(re.findall(new_name, edited)) == kept + len(re.findall(new_name, code))
    orig = [ln.strip() for ln in code.splitlines()]
    new = [ln.strip() for ln in edited.splitlines()]
    n_delete = n_insert = 0
    for ins in instructions:
        if m := re.fullmatch(r"In the line `(.*)`, change `(\d+)` to `(\d+)`\.", ins):
            line, old, val = m.groups()
            assert orig.count(line) == 1 and old != val
            spots = [k.start() for k in re.finditer(rf"(?<![\w.]){old}(?![\w.])", line)]
            candidates = {_rn(line[:k] + val + line[k + len(old):], rename) for k in spots}
            assert candidates & set(new) and _rn(line, rename) not in new
        elif m := re.fullmatch(r"Delete the line `(.*)`\.", ins):
            n_delete += 1
            assert orig.count(m.group(1)) == 1 and _rn(m.group(1), rename) not in new
        elif m := re.fullmatch(r"After the line `(.*)`, insert the line `(.*)`\.", ins):
            n_insert += 1
            assert orig.count(m.group(1)) == 1
            i = new.index(_rn(m.group(1), rename))
            assert new[i + 1] == m.group(2) and m.group(2).startswith("# ")
        else:
            assert ins.startswith("Rename "), ins
    assert len(new) == len(orig) - n_delete + n_insert


def test_edits_are_deterministic():
    code = _fake_files()[0].text
    assert make_edits(code, random.Random(3), 3) == make_edits(code, random.Random(3), 3)
    assert make_edits(code, random.Random(3), 3) != make_edits(code, random.Random(4), 3)


# --------------------------------------------------------------------------------------------------------
# chat format


def test_glm_chat_text_is_the_chat_template(tiny_bf16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bf16)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": edit_request("a.py", "x = 1\n", ["Delete the line `x = 1`."])},
            {"role": "assistant", "content": "  " + code_answer("\n") + "\n"},
            {"role": "user", "content": "again"}]
    for thinking in (True, False):
        ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=thinking)
        assert glm_chat_text(msgs, True, thinking) == ref
    assert glm_chat_text(msgs[:2], False) == tok.apply_chat_template(msgs[:2], tokenize=False)


# --------------------------------------------------------------------------------------------------------
# agentic-edit sessions


def test_edit_sessions_carry_previous_turns_and_held_out_files():
    held = {f.rel: f.text for f in stdlib_files("heldout")}
    sessions = make_edit_sessions(3, 4, 150, 10_000, 40, 1.0, seed=1)
    same_file_turns = 0
    for s in sessions:
        prev = None
        for k in range(4):
            req = s.next_request()
            msgs = req.messages
            assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
            if prev is not None:
                assert msgs[:len(prev)] == prev and msgs[len(prev)]["role"] == "assistant"
                assert msgs[len(prev)]["content"] == f"model output {k - 1}"
            code = _CODE_RE.search(msgs[-1]["content"]).group(1)
            path = s.paths[k]
            assert is_heldout(path)
            if k and s.paths[k - 1] == path and code == _CODE_RE.search(s.expected[k - 1]).group(1):
                same_file_turns += 1  # the previous turn's result, re-sent
            else:
                assert code in held[path]
            assert req.output_len == count_tokens(s.expected[k], None) + EDIT_OUTPUT_MARGIN
            assert s.expected[k] != code_answer(code)
            prev = msgs
            s.record_output(f"model output {k}")
        assert s.done
    assert same_file_turns > 0
    again = make_edit_sessions(3, 4, 150, 10_000, 40, 1.0, seed=1)
    assert [a.user_texts for a in again] == [s.user_texts for s in sessions]
    assert make_edit_sessions(1, 2, 150, 10_000, 0, 1.0, seed=2)[0].user_texts != sessions[0].user_texts[:2]


def test_edit_session_lengths_follow_the_tokenizer(tiny_bf16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bf16)
    s = make_edit_sessions(1, 2, 200, 60, 0, 1.0, seed=3, tokenizer=tok, files=_fake_files())[0]
    req = s.next_request()
    code = _CODE_RE.search(req.messages[0]["content"]).group(1)
    assert 200 <= count_tokens(code, tok) <= 200 + 40  # whole lines up to the first one reaching 200 tokens
    assert req.output_len == 60  # capped by output_len
    assert req.prompt_len == count_tokens(req.messages[0]["content"], tok)
    s2 = make_edit_sessions(1, 1, 200, 10_000, 0, 1.0, seed=3, tokenizer=tok, endpoint="completions",
                            files=_fake_files())[0]
    r2 = s2.next_request()
    assert r2.prompt == tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)


def test_plain_code_has_distinct_files_and_no_answer_in_prompt():
    specs = make_plain_code_dataset(8, 120, 64, 1.0, seed=0)
    paths = [re.match(r"Continue `([^`]+)`", s.messages[0]["content"]).group(1) for s in specs]
    assert len(set(paths)) == 8 and all(is_heldout(p) for p in paths)
    assert all(s.output_len == 64 and s.prompt_len > 100 for s in specs)
    raw = make_plain_code_dataset(3, 120, 64, 1.0, seed=0, endpoint="completions")
    assert all(isinstance(s.prompt, str) and "```" not in s.prompt for s in raw)
    again = make_plain_code_dataset(8, 120, 64, 1.0, seed=0)
    assert [s.messages for s in again] == [s.messages for s in specs]


# --------------------------------------------------------------------------------------------------------
# training episodes


def test_training_episodes_use_the_workload_format():
    files = _fake_files()
    texts = make_episodes(files, 60, 1024, seed=0)
    assert texts == make_episodes(files, 60, 1024, seed=0)
    for t in texts:
        assert t.startswith("[gMASK]<sop>") and t.endswith("```" + END_OF_TURN)
        prompt, _, answer = t.rpartition("<|assistant|>")
        assert answer.startswith(("<think></think>```python\n", "</think>```python\n"))
        assert prompt.count("<|user|>") >= 1
    kinds = {"Apply these edits" in t for t in texts} | {"Continue `" in t for t in texts}
    assert kinds == {True, False}
    edit = next(t for t in texts if "Apply these edits" in t and t.count("<|user|>") == 2)
    user = edit.split("<|user|>")[1].split("<|assistant|>")[0]
    given = _CODE_RE.search(user).group(1)
    assert any(given in f.text for f in files)
    episode = episode_text(random.Random(1), files, 1024)
    assert episode.endswith(END_OF_TURN)


def test_pack_episodes_rows_start_at_episodes():
    gen = torch.Generator().manual_seed(0)
    stream = token_stream([[5, 6, 7]] * 50, 1)
    eps = [[9] * 10, [8] * 30, [7] * 50, [6] * 5]
    rows = pack_episodes(eps, stream, 48, gen)
    assert rows.shape == (3, 48)
    assert rows[0, :10].tolist() == [9] * 10 and rows[0, 10:40].tolist() == [8] * 30
    assert rows[1].tolist() == [7] * 48  # longer than a row: cut
    assert rows[2, :5].tolist() == [6] * 5 and set(rows[2, 5:].tolist()) <= {1, 5, 6, 7}
