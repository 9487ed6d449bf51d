"""vLLM's `prompt_logprobs` on /v1/completions (per choice) and /v1/chat/completions (top-level), checked
against an independent reference: HF transformers' forward over the same prompt on the tiny checkpoint the
server loads (CPU float32 on both sides)."""

from __future__ import annotations

import httpx
import pytest
import torch

from hf_reference import hf_logprobs, hf_model
from model.tiny import tiny_model_dir

TEXT = "The scheduler serves running requests first and fills the rest of the step with prefill chunks"
# longer than several KV pages (16 tokens each), so a repeated prompt finds cached pages
LONG = " ".join(["KV pages are hashed, chained over the parent page, so a shared prefix is computed once."]
               * 4)
MAX_TOP = 20


@pytest.fixture(scope="module")
def server(launch_server):
    srv = launch_server("--max-model-len", "512", "--stats-interval", "0")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """ids -> log_softmax [T, V] of HF's forward: row p scores the token at p + 1."""
    hf = hf_model(tiny_model_dir("bf16"))
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def ref(ids: list[int]) -> torch.Tensor:
        if tuple(ids) not in cache:
            cache[tuple(ids)] = hf_logprobs(hf, ids)
        return cache[tuple(ids)]

    return ref


def tokenize(http: httpx.Client, **body) -> list[int]:
    r = http.post("/tokenize", json={"model": "glint-tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def check_against_reference(plp: list, ids: list[int], ref: torch.Tensor, k: int) -> None:
    """One entry per prompt token, the first null; each other holds the prompt token (its logprob and rank as
    the reference computes them) and the reference's top k, with consistent ranks."""
    assert isinstance(plp, list) and len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        d, row, tok = plp[pos], ref[pos - 1], ids[pos]
        assert isinstance(d, dict) and all(isinstance(key, str) for key in d)
        entry = d[str(tok)]
        assert abs(entry["logprob"] - row[tok].item()) <= 1e-3, (pos, entry, row[tok].item())
        assert entry["rank"] == int((row > row[tok]).sum()) + 1, pos
        top = set(row.topk(k).indices.tolist()) if k else set()
        assert {int(key) for key in d} == top | {tok}, pos
        for key, e in d.items():
            assert isinstance(e["decoded_token"], str)
            assert abs(e["logprob"] - row[int(key)].item()) <= 1e-3, (pos, key)
        by_lp = sorted(d.values(), key=lambda e: -e["logprob"])
        assert [e["rank"] for e in by_lp] == sorted(e["rank"] for e in d.values())
        assert sorted(e["rank"] for key, e in d.items() if int(key) in top) == list(range(1, len(top) + 1))


def test_completions_prompt_logprobs_match_an_independent_forward(http, reference):
    ids = tokenize(http, prompt=TEXT)
    r = http.post("/v1/completions", json={"model": "glint-tiny", "prompt": TEXT, "max_tokens": 3,
                                           "temperature": 0, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    check_against_reference(choice["prompt_logprobs"], ids, reference(ids), 2)
    assert choice["logprobs"] is None  # prompt_logprobs alone asks for no sampled-token logprobs
    # k = 0: the prompt token alone
    r = http.post("/v1/completions",
                  json={"model": "glint-tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    check_against_reference(r.json()["choices"][0]["prompt_logprobs"], ids, reference(ids), 0)


def test_completions_every_choice_carries_its_prompts_logprobs(http, reference):
    a, b = tokenize(http, prompt="Hello there, how are you"), tokenize(http, prompt="Pages and blocks")
    r = http.post("/v1/completions", json={"model": "glint-tiny", "prompt": [a, b], "n": 2, "max_tokens": 2,
                                           "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 4
    for c in choices:
        ids = a if c["index"] < 2 else b
        check_against_reference(c["prompt_logprobs"], ids, reference(ids), 1)


def test_completions_echo_logprobs_and_prompt_logprobs_together(http, reference):
    """The engine computes the larger of the two counts; each field keeps its own."""
    ids = tokenize(http, prompt=TEXT)
    for echo_k, prompt_k in ((1, 3), (4, 1)):
        r = http.post("/v1/completions", json={"model": "glint-tiny", "prompt": TEXT, "max_tokens": 2,
                                               "echo": True, "logprobs": echo_k, "prompt_logprobs": prompt_k})
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        plp = choice["prompt_logprobs"]
        check_against_reference(plp, ids, reference(ids), prompt_k)
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for pos in range(1, len(ids)):
            assert lp["token_logprobs"][pos] == plp[pos][str(ids[pos])]["logprob"]
            assert 1 <= len(lp["top_logprobs"][pos]) <= echo_k  # keyed by text: equal texts merge


def test_chat_prompt_logprobs_are_top_level(http, reference):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    ids = tokenize(http, messages=messages)
    r = http.post("/v1/chat/completions", json={"model": "glint-tiny", "messages": messages, "max_tokens": 3,
                                                "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(ids)
    check_against_reference(body["prompt_logprobs"], ids, reference(ids), 2)
    assert "prompt_logprobs" not in body["choices"][0]
    # not asked for: not there
    r = http.post("/v1/chat/completions", json={"model": "glint-tiny", "messages": messages, "max_tokens": 1})
    assert r.status_code == 200 and "prompt_logprobs" not in r.json()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value,stream", [(1, True), (0, True), (-1, False), (-2, False),
                                          (MAX_TOP + 1, False), ("many", False)])
def test_refused_values_name_the_param(http, route, value, stream):
    body = {"model": "glint-tiny", "max_tokens": 2, "prompt_logprobs": value, "stream": stream}
    body.update({"prompt": "x"} if route == "/v1/completions"
                else {"messages": [{"role": "user", "content": "x"}]})
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt_logprobs" and err["type"] == "invalid_request_error", err
    if stream:
        assert "stream" in err["message"]
    elif value == -1:
        assert "whole vocabulary" in err["message"]


def test_a_cached_prefix_does_not_change_prompt_logprobs(http, reference):
    """The prompt's pages are in the prefix cache (a plain request put them there); a prompt-logprobs request
    still scores every prompt position, the same on every repeat."""
    ids = tokenize(http, prompt=LONG)
    assert len(ids) > 48
    plain = {"model": "glint-tiny", "prompt": LONG, "max_tokens": 1}
    http.post("/v1/completions", json=plain).raise_for_status()
    r = http.post("/v1/completions", json=plain)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32  # the cache holds this prompt
    answers = []
    for _ in range(2):
        r = http.post("/v1/completions", json={**plain, "prompt_logprobs": 3})
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["prompt_logprobs"])
    assert answers[0] == answers[1]
    check_against_reference(answers[0], ids, reference(ids), 3)
