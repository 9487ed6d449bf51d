"""The seed's suffix-decoding launch line through the server: same greedy completions as the offline plain
engine (streamed and not), speculation counters in /metrics and the stats line, bad values name the flag."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from conftest import REPO, metric
from engine import LLM, SamplingParams
from model.tiny import tiny_model_dir

SEED_LINE = [
    "--speculative-algorithm", "SUFFIX", "--speculative-eagle-topk", "1",
    "--speculative-suffix-cache-max-depth", "64", "--speculative-suffix-max-spec-factor", "1.0",
    "--speculative-suffix-max-spec-offset", "0.0", "--speculative-suffix-min-token-prob", "0.1",
    "--speculative-num-draft-tokens", "8",
]
PROMPTS = [[31, 32, 33, 34, 35, 36, 37] * 6, list(range(500, 540))]


@pytest.fixture(scope="module")
def server(launch_server):
    srv = launch_server("--max-model-len", "512", "--stats-interval", "1", *SEED_LINE)
    yield srv
    srv.stop()


def test_suffix_server_matches_plain_engine(server):
    ref = LLM(str(tiny_model_dir("bf16")), device="cpu", max_model_len=512).generate(
        [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True),
        use_tqdm=False)
    body = {"model": "glint-tiny", "prompt": PROMPTS, "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    got = httpx.post(server.url + "/v1/completions", json=body, timeout=300).json()
    texts = [c["text"] for c in sorted(got["choices"], key=lambda c: c["index"])]
    assert texts == [r.outputs[0].text for r in ref]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "prompt": PROMPTS[0], "stream": True},
                      timeout=300) as r:
        streamed = "".join(
            json.loads(line[6:])["choices"][0]["text"]
            for line in r.iter_lines() if line.startswith("data: {")
        )
    assert streamed == ref[0].outputs[0].text
    text = httpx.get(server.url + "/metrics", timeout=10).text
    accepted = metric(text, "glint:spec_accepted_tokens_total")
    assert accepted is not None and accepted > 0
    assert metric(text, "glint:spec_draft_tokens_total") >= accepted
    assert metric(text, "glint:spec_acceptance_rate_by_position", position="0") > 0
    deadline = time.monotonic() + 10
    while "Spec:" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "mean accepted length" in server.log_text()


@pytest.mark.parametrize("flags,named", [
    (["--speculative-suffix-min-token-prob", "1.5"], "--speculative-suffix-min-token-prob"),
    (["--speculative-suffix-cache-max-depth", "1"], "--speculative-suffix-cache-max-depth"),
    (["--speculative-num-draft-tokens", "1"], "--speculative-num-draft-tokens"),
    (["--speculative-eagle-topk", "4"], "--speculative-eagle-topk"),
])
def test_bad_speculative_values_name_the_flag(flags, named):
    proc = subprocess.run([sys.executable, "-m", "server", "--speculative-algorithm", "SUFFIX", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr, proc.stderr[-2000:]


def test_api_keys_are_suffix_tenants(launch_server):
    # one key's finished responses feed that key's drafts only: the server passes a digest of the key that
    # authorized each request to the engine as its tenant
    srv = launch_server("--max-model-len", "512", "--stats-interval", "0", "--api-key", "alice", "--api-key", "bob",
                        *SEED_LINE)
    try:
        body = {"model": "glint-tiny", "prompt": list(range(700, 730)), "max_tokens": 100, "temperature": 0,
                "ignore_eos": True}

        def accepted_for(key: str) -> tuple[str, float]:
            headers = {"Authorization": f"Bearer {key}"}
            before = metric(httpx.get(srv.url + "/metrics", headers=headers, timeout=10).text,
                            "glint:spec_accepted_tokens_total") or 0.0
            text = httpx.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=300).json()
            # the engine's stats arrive with the last tokens, before the response ends
            after = metric(httpx.get(srv.url + "/metrics", headers=headers, timeout=10).text,
                           "glint:spec_accepted_tokens_total") or 0.0
            return text["choices"][0]["text"], after - before

        first, _ = accepted_for("alice")
        other, by_bob = accepted_for("bob")
        again, by_alice = accepted_for("alice")
        assert first == other == again
        assert by_alice >= 60 and by_alice > by_bob + 30, (by_alice, by_bob)
    finally:
        srv.stop()
