"""The real clients against a live tiny server (issue #18): the openai SDK (structured outputs with `.parse()`,
forced tool calls, the Responses API), the anthropic SDK, Claude Code in print mode, the Codex CLI's
`codex exec`, and SGLang's bench_serving.py from the `sglang` wheel. Assertions are on the response structure.

The npm clients and the sglang wheel are installed into .tools/ by `make clients` (part of `make test`). The
multi-turn runs use scripted outputs (tests/server/scripted_engine.py): the first turn's script makes a tool
call that reads a file holding the marker of the second turn's script, so the client executes a real tool and
sends its result back. Structured-output tests run the real tiny model under the grammar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

from model.tiny import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools"
CLAUDE = TOOLS / "node" / "node_modules" / ".bin" / "claude"
CODEX = TOOLS / "node" / "node_modules" / ".bin" / "codex"
SGLANG = TOOLS / "sglang"
MODEL = "glint-tiny"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}


def need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make clients` (`make test` installs the client tools)")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("work")
    (d / "note.txt").write_text("The note: <<script:done>>\n")
    return d


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory, work):
    scripts = {
        "answer": ["Thinking", " briefly.", "</think>", "Hello from glint."],
        "done": ["Got it.", "</think>", "The note says done."],
        "weather": ["Weather.", "</think>", "Checking. ",
                    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>",
                    "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"],
        "claude_read": ["I will read it.", "</think>",
                        f"<tool_call>Read<arg_key>file_path</arg_key><arg_value>{work / 'note.txt'}</arg_value></tool_call>"],
        "codex_cat": ["Run it.", "</think>",
                      "<tool_call>exec_command<arg_key>cmd</arg_key><arg_value>cat note.txt</arg_value></tool_call>"],
    }
    path = tmp_path_factory.mktemp("scripts") / "scripts.json"
    path.write_text(json.dumps(scripts))
    srv = launch_server("--stats-interval", "0", env={"GLINT_TEST_SCRIPTS": str(path)})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


class City(BaseModel):
    name: str = Field(max_length=10)
    population: int = Field(ge=0, le=100000)
    capital: bool


class GetWeather(BaseModel):
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


# ------------------------------------------------------------------------------------------ openai SDK


def test_openai_parse_returns_a_parsed_object(oai):
    for seed in (0, 1):
        resp = oai.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "A city, please."}], response_format=City,
            max_tokens=150, temperature=1.0, seed=seed, extra_body=NO_THINKING,
        )
        msg = resp.choices[0].message
        assert resp.choices[0].finish_reason == "stop" and isinstance(msg.parsed, City), msg
        assert City.model_validate_json(msg.content) == msg.parsed


def test_structured_output_starts_after_the_reasoning(oai):
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_model_dir("bf16")))
    think_end = tok.convert_tokens_to_ids("</think>")
    resp = oai.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Think, then a city."}], response_format=City,
        max_tokens=200, temperature=1.0, seed=2, logit_bias={str(think_end): 6},  # thinking on: ends soon
    )
    msg = resp.choices[0].message
    assert msg.model_extra.get("reasoning_content") is not None and isinstance(msg.parsed, City), msg


def test_forced_tool_calls_follow_the_tool_schema(oai):
    tool = openai.pydantic_function_tool(GetWeather)
    for choice in ("required", {"type": "function", "function": {"name": "GetWeather"}}):
        resp = oai.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],
            tool_choice=choice, parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=3,
            extra_body=NO_THINKING,
        )
        choice0 = resp.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0
        (call,) = choice0.message.tool_calls
        assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[tool],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_responses_api_parse_and_text(oai):
    resp = oai.responses.parse(
        model=MODEL, input="A city.", text_format=City, reasoning={"effort": "none"}, max_output_tokens=150,
        temperature=1.0, extra_body={"seed": 4},
    )
    assert resp.status == "completed" and isinstance(resp.output_parsed, City)
    resp = oai.responses.create(model=MODEL, input="<<script:answer>>", instructions="Be brief.")
    assert resp.output_text == "Hello from glint." and [o.type for o in resp.output] == ["reasoning", "message"]


# ------------------------------------------------------------------------------------------ anthropic SDK


def test_anthropic_sdk(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=300)
    msg = client.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert msg.content and msg.content[0].type == "text"  # no thinking field: thinking off (content[0].text)
    msg = client.messages.create(
        model=MODEL, max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "<<script:answer>>"}],
    )
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.content[1].text == "Hello from glint."
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": GetWeather.model_json_schema()}]
    with client.messages.stream(
        model=MODEL, max_tokens=100, tools=tools, thinking={"type": "adaptive"},
        messages=[{"role": "user", "content": "<<script:weather>>"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris", "days": 2}
    # forced tool use on the real model: the grammar makes the call valid
    msg = client.messages.create(
        model=MODEL, max_tokens=150, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather?"}],
    )
    call = next(b for b in msg.content if b.type == "tool_use")
    assert msg.stop_reason == "tool_use" and GetWeather.model_validate(call.input)


# ------------------------------------------------------------------------------------------ agentic CLIs


def _claude(server, work: Path, home: Path, prompt: str) -> list[dict]:
    """One Claude Code print-mode session against the server: its stream-json lines."""
    env = {
        **os.environ, **OFFLINE,
        "HOME": str(home), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "none",
        "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL, "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": MODEL, "ANTHROPIC_DEFAULT_OPUS_MODEL": MODEL,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1", "DISABLE_NON_ESSENTIAL_MODEL_CALLS": "1",
    }
    cmd = [str(need(CLAUDE)), "-p", prompt, "--output-format", "stream-json", "--verbose", "--allowedTools", "Read"]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(ln) for ln in run.stdout.splitlines() if ln.startswith("{")]


def test_claude_code_print_mode_with_a_tool_turn(server, work, tmp_path):
    lines = _claude(server, work, tmp_path, "<<script:claude_read>>")
    blocks = [b for ln in lines if ln["type"] == "assistant" for b in ln["message"]["content"]]
    tool = next(b for b in blocks if b["type"] == "tool_use")
    assert tool["name"] == "Read" and tool["input"] == {"file_path": str(work / "note.txt")}
    results = [b for ln in lines if ln["type"] == "user" for b in ln["message"]["content"] if isinstance(b, dict)]
    assert any(r.get("type") == "tool_result" and "The note" in str(r.get("content")) for r in results)
    result = lines[-1]
    assert result["type"] == "result" and result["subtype"] == "success" and not result["is_error"], result
    assert result["result"] == "The note says done." and result["num_turns"] == 2


def test_claude_code_sessions_share_the_cached_system_prompt(server, work, tmp_path):
    """A new Claude Code session's first request (~34K tokens: 24 tools, then the system prompt) reads all but
    its own message from the prefix cache: nothing the server renders varies between sessions (the billing line
    is dropped, server/anthropic_api.py BILLING_HEADER), so TTFT is the new tail's prefill, not the prompt's."""
    usages = []
    for prompt in ("<<script:answer>> first session", "<<script:answer>> a second, other session"):
        result = _claude(server, work, tmp_path, prompt)[-1]
        assert result["type"] == "result" and not result["is_error"], result
        usages.append(result["usage"])
    second = usages[1]
    total = second["input_tokens"] + second["cache_read_input_tokens"]
    assert total > 2000 and second["cache_read_input_tokens"] > 0.9 * total, usages


def test_codex_exec_with_a_tool_turn(server, work, tmp_path):
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "glint"\n\n[model_providers.glint]\nname = "glint"\n'
        f'base_url = "{server.url}/v1"\nwire_api = "responses"\n'
    )
    env = {**os.environ, **OFFLINE, "CODEX_HOME": str(home), "HOME": str(tmp_path)}
    cmd = [str(need(CODEX)), "exec", "--skip-git-repo-check", "--json", "-s", "danger-full-access",
           "<<script:codex_cat>>"]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(ln) for ln in run.stdout.splitlines() if ln.startswith("{")]
    items = [e["item"] for e in events if e["type"] == "item.completed"]
    cmd_item = next(i for i in items if i["type"] == "command_execution")
    assert "cat note.txt" in cmd_item["command"] and "The note" in cmd_item["aggregated_output"]
    assert items[-1] == {**items[-1], "type": "agent_message", "text": "The note says done."}
    assert events[-1]["type"] == "turn.completed" and events[-1]["usage"]["input_tokens"] > 0


# ------------------------------------------------------------------------------------------ SGLang's benchmark


def test_sglang_bench_serving(server, tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [
        sys.executable, str(Path(__file__).parent / "run_sglang_bench.py"), str(need(SGLANG)),
        "--backend", "sglang-oai-chat", "--base-url", server.url, "--model", MODEL,
        "--tokenizer", str(tiny_model_dir("bf16")), "--dataset-name", "random-ids", "--num-prompts", "4",
        "--random-input-len", "64", "--random-output-len", "8", "--random-range-ratio", "1",
        "--output-file", str(out),
    ]
    run = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 4 and result["total_output_tokens"] == 32, result
