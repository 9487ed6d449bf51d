"""CPU tests of the serving benchmark client (bench/serving*.py, bench/datasets.py).

A small FastAPI app streams OpenAI-style chunked SSE from a uvicorn thread on a free 127.0.0.1 port; the
server thread is a daemon with a watchdog, so a hung test cannot keep it alive.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import statistics
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import serving
from bench import serving_http as http
from bench.datasets import (AgenticSession, count_tokens, make_agentic_sessions, make_random_dataset,
                            plain_vocab_ids, random_prompt, roundtrip_ids, sample_len, tool_result_text)
from bench.serving_metrics import (RequestRecord, describe, meets_slo, parse_goodput, percentile,
                                   poisson_arrivals, summarize)

# --------------------------------------------------------------------------------------------------------
# metric math on hand-made timestamps


def _rec(send, chunks, out_len=None, **kw) -> RequestRecord:
    r = RequestRecord(index=0, send_time=send, chunk_times=list(chunks), success=True, **kw)
    r.output_len = len(chunks) if out_len is None else out_len
    r.finalize_timing()
    return r


def test_ttft_e2e_itl_tpot_from_timestamps():
    r = _rec(1.0, [1.5, 1.6, 1.8, 2.1])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e_latency == pytest.approx(1.1)
    assert r.itl == pytest.approx([0.1, 0.2, 0.3])
    # TPOT excludes the first token: (E2E - TTFT) / (n - 1)
    assert r.tpot == pytest.approx(0.6 / 3)


def test_tpot_uses_usage_token_count_not_chunks():
    # speculative decoding: 2 chunks carrying 7 tokens
    r = _rec(0.0, [0.2, 0.5], out_len=7)
    assert r.itl == pytest.approx([0.3])
    assert r.tpot == pytest.approx(0.3 / 6)


def test_tpot_undefined_for_single_token_and_failures():
    assert _rec(0.0, [0.4]).tpot is None
    assert _rec(0.0, [0.4]).itl == []
    bad = _rec(0.0, [0.1, 0.2, 0.3])
    bad.success = False
    assert bad.tpot is None


def test_percentile_matches_numpy_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile(xs, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    vals = [random.Random(1).random() for _ in range(101)]
    d = describe(vals, 1000.0)
    assert d["median"] == pytest.approx(statistics.median(vals) * 1000)
    assert d["std"] == pytest.approx(statistics.pstdev(vals) * 1000)
    assert d["count"] == 101


def test_summary_throughput_and_pooled_itl():
    a = _rec(0.0, [0.1, 0.2, 0.3], usage_prompt_tokens=10)  # 3 tokens, itl .1 .1
    b = _rec(0.5, [0.9, 1.5], prompt_len=20)  # 2 tokens, itl .6; no usage → dataset prompt_len
    c = _rec(0.0, [0.4])  # 1 token: no TPOT, no ITL
    failed = RequestRecord(index=3, success=False, error="boom", status=500)
    skipped = RequestRecord(index=4, skipped=True)
    s = summarize([a, b, c, failed, skipped], duration=2.0)
    assert (s["completed"], s["failed"], s["skipped"]) == (3, 1, 1)
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 6
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(3.0)
    assert s["input_throughput"] == pytest.approx(15.0)
    assert s["total_throughput"] == pytest.approx(18.0)
    # ITL pools gaps over requests (3 gaps); TPOT is per request (2 requests with > 1 token)
    assert s["itl_ms"]["count"] == 3
    assert s["itl_ms"]["mean"] == pytest.approx((100 + 100 + 600) / 3)
    assert s["tpot_ms"]["count"] == 2
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 600) / 2)
    assert s["ttft_ms"]["mean"] == pytest.approx((100 + 400 + 400) / 3)
    assert s["concurrency"] == pytest.approx((0.3 + 1.0 + 0.4) / 2.0)
    assert s["errors"] == {"HTTP 500: boom": 1}


def test_goodput():
    slo = parse_goodput(["ttft:150", "tpot:200"])
    assert slo == {"ttft": pytest.approx(0.15), "tpot": pytest.approx(0.2)}
    fast = _rec(0.0, [0.1, 0.2])
    slow = _rec(0.0, [0.3, 0.4])
    assert meets_slo(fast, slo) and not meets_slo(slow, slo)
    s = summarize([fast, slow], 1.0, slo)
    assert s["goodput"]["good_requests"] == 1
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])


# --------------------------------------------------------------------------------------------------------
# arrivals


def test_poisson_arrivals_statistics():
    rate = 4.0
    t = poisson_arrivals(20000, rate, seed=123)
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:]))
    gaps = [b - a for a, b in zip(t, t[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.03)
    # exponential: std == mean, P(gap > mean) = 1/e
    assert statistics.pstdev(gaps) == pytest.approx(mean, rel=0.05)
    assert sum(g > 1 / rate for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.02)
    assert poisson_arrivals(50, rate, seed=123) == t[:50]  # deterministic for a seed
    assert poisson_arrivals(50, rate, seed=124) != t[:50]
    assert poisson_arrivals(7, float("inf"), seed=0) == [0.0] * 7


# --------------------------------------------------------------------------------------------------------
# datasets


class CharTokenizer:
    """One token per character, except that the pair 'ab' is one token (so decode→encode can shrink)."""

    def __init__(self) -> None:
        self.vocab = [chr(c) for c in range(97, 123)] + [" ", "ab"]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(len(self.vocab) - 1)
                i += 2
            else:
                ch = text[i]
                ids.append(self.vocab.index(ch) if ch in self.vocab else 26)
                i += 1
        return ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_random_prompt_exact_length_with_tokenizer():
    tok = CharTokenizer()
    rng = random.Random(0)
    vocab = list(range(len(tok)))
    for n in (1, 7, 100, 513):
        text, got = random_prompt(rng, n, tok, vocab)
        assert got == n and len(tok.encode(text)) == n


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE (the GLM/GPT family's kind), trained here and saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [tool_result_text(rng, k, {"path": "a.py", "command": "pytest -q"}, 300, None)
              for k in ("read_file", "run_command", "search_code") * 10]
    corpus.append("caf\u00e9 na\u00efve \u4f60\u597d \U0001f600 emoji")  # multi-byte characters
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", "<|user|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            additional_special_tokens=["<|user|>"]).save_pretrained(str(d))
    return str(d)


def test_random_dataset_exact_lengths_with_hf_tokenizer(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    vocab = plain_vocab_ids(tok)
    assert not set(tok.all_special_ids) & set(vocab)
    clean, words = roundtrip_ids(tok, vocab)
    assert words and set(words) <= set(clean) <= set(vocab)
    for ratio in (1.0, 0.3):
        specs = make_random_dataset(40, 150, 8, ratio, seed=4, tokenizer=tok)
        for sp in specs:
            text = sp.messages[0]["content"]
            assert len(tok.encode(text, add_special_tokens=False)) == sp.prompt_len
            assert "<|user|>" not in text and "<|endoftext|>" not in text
        if ratio == 1.0:
            assert {sp.prompt_len for sp in specs} == {150}
    # arbitrary ids (byte fragments included) still converge to the requested length most of the time
    rng = random.Random(2)
    hits = sum(random_prompt(rng, n, tok, vocab)[1] == n for n in range(1, 200, 7))
    assert hits >= 20
    ids = make_random_dataset(5, 64, 8, 1.0, seed=4, tokenizer=tok, endpoint="completions",
                              tokenize_prompt=True)
    assert all(isinstance(sp.prompt, list) and len(sp.prompt) == 64 for sp in ids)
    # agentic lengths in the tokenizer's tokens
    sessions = make_agentic_sessions(3, 2, 120, 8, 100, 40, 1.0, seed=4, tokenizer=tok)
    for sess in sessions:
        system, task = (m["content"] for m in sess.messages)
        assert abs(len(tok.encode(system, add_special_tokens=False)) - 40) <= 2
        assert abs(len(tok.encode(task, add_special_tokens=False)) - 120) <= 2
        first = sess.next_request()
        sess.record_output(" done")
        result = sess.next_request().messages[-1]["content"]
        assert 20 <= len(tok.encode(result, add_special_tokens=False)) <= 150
        assert sess.prompt_len > first.prompt_len + 20


def test_random_dataset_lengths_and_determinism():
    specs = make_random_dataset(50, 64, 16, 1.0, seed=3)
    assert all(s.output_len == 16 and s.prompt_len == 64 for s in specs)
    assert all(len(s.messages[0]["content"].split()) == 64 for s in specs)
    again = make_random_dataset(50, 64, 16, 1.0, seed=3)
    assert [s.messages for s in specs] == [s.messages for s in again]
    varied = make_random_dataset(400, 100, 10, 0.0, seed=3, endpoint="completions")
    lens = [s.prompt_len for s in varied]
    assert min(lens) >= 1 and max(lens) <= 100 and 35 < statistics.fmean(lens) < 65  # sglang: U[1, L]
    assert isinstance(varied[0].prompt, str)
    rng = random.Random(0)
    assert all(50 <= sample_len(rng, 100, 0.5) <= 100 for _ in range(200))


def test_tool_result_is_deterministic_and_sized():
    texts = [tool_result_text(random.Random(9), "read_file", {"path": "src/a.py"}, 300, None)
             for _ in range(2)]
    assert texts[0] == texts[1]
    assert 200 <= count_tokens(texts[0], None) <= 300
    assert "def " in texts[0]
    logs = tool_result_text(random.Random(9), "run_command", {"command": "pytest -q"}, 200, None)
    assert "passed" in logs or "PASSED" in logs
    js = tool_result_text(random.Random(9), "search_code", {"query": "x"}, 400, None)
    assert '"matches"' in js


@pytest.mark.parametrize("endpoint,tool_format",
                         [("chat", "tool"), ("chat", "user"), ("completions", "tool")])
def test_agentic_prefix_property(endpoint, tool_format):
    sessions = make_agentic_sessions(3, 4, 200, 20, 150, 64, 1.0, seed=5, endpoint=endpoint,
                                     tool_format=tool_format)
    for s in sessions:
        prev = None
        for k in range(s.num_turns):
            spec = s.next_request()
            if prev is not None:
                prev_spec, prev_out = prev
                if endpoint == "chat":
                    n = len(prev_spec.messages)
                    assert spec.messages[:n] == prev_spec.messages
                    assert spec.messages[n]["role"] == "assistant"
                    assert spec.messages[n]["content"] == prev_out
                    follow = spec.messages[n + 1]
                    assert follow["role"] == ("tool" if tool_format == "tool" else "user")
                    assert count_tokens(follow["content"], None) > 30
                    if tool_format == "tool":
                        assert follow["tool_call_id"] == spec.messages[n]["tool_calls"][0]["id"]
                        json.loads(spec.messages[n]["tool_calls"][0]["function"]["arguments"])
                else:
                    assert spec.prompt.startswith(prev_spec.prompt + prev_out)
                assert spec.prompt_len > prev_spec.prompt_len
            out = f"<output s{s.session_id} t{k}>"
            s.record_output(out)
            prev = (spec, out)
        assert s.done
    # a shared system prompt, distinct tasks
    if endpoint == "chat":
        firsts = [AgenticSession.create(i, 1, 200, 20, 150, 1.0, 5, "SYS") for i in range(3)]
        assert {f.messages[0]["content"] for f in firsts} == {"SYS"}
        assert len({f.messages[1]["content"] for f in firsts}) == 3


def test_agentic_sessions_deterministic():
    a = make_agentic_sessions(2, 3, 100, 10, 100, 32, 1.0, seed=1)
    b = make_agentic_sessions(2, 3, 100, 10, 100, 32, 1.0, seed=1)
    for x, y in zip(a, b):
        for _ in range(3):
            assert x.next_request().messages == y.next_request().messages
            x.record_output("same")
            y.record_output("same")


# --------------------------------------------------------------------------------------------------------
# SSE decoder


def test_sse_decoder_framing_any_split():
    stream = (b": keep-alive\r\n\r\ndata: {\"a\": 1}\r\n\r\ndata: x\ndata: y\n\n"
              b"event: foo\rdata:nospace\r\rdata: [DONE]\n\n")
    expect = ['{"a": 1}', "x\ny", "nospace", "[DONE]"]
    for step in (1, 2, 3, 7, len(stream)):
        dec = http.SSEDecoder()
        got = []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i:i + step])
        got += dec.flush()
        assert got == expect, step
    for cut in range(len(stream) + 1):  # every two-piece split, CR|LF boundaries included
        dec = http.SSEDecoder()
        assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) + dec.flush() == expect, cut
    dec = http.SSEDecoder()
    assert dec.feed(b"data: tail") == [] and dec.flush() == ["tail"]
    dec = http.SSEDecoder()  # CR then LF in the next feed is one line end, not an empty line
    assert dec.feed(b"data: a\r") == [] and dec.feed(b"\ndata: b\r\n\r\n") == ["a\nb"]


# --------------------------------------------------------------------------------------------------------
# live fake server

TTFT_S = 0.03
GAP_S = 0.01
API_KEY = "sk-test"


def _make_app(received: list):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": 4096}]}

    async def handle(req: Request, chat: bool):
        if req.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key", "type": "authentication_error"}}, 401)
        body = await req.json()
        received.append(body)
        if chat:
            last = body["messages"][-1]["content"]
            prompt_text = "".join(str(m.get("content") or "") for m in body["messages"])
        else:
            last = prompt_text = body["prompt"] if isinstance(body["prompt"], str) else "ids"
        if "FAIL500" in last:
            return JSONResponse({"error": {"message": "engine exploded", "type": "server_error"}}, 500)
        n = int(body["max_tokens"])
        per_chunk = 2 if "SPEC" in last else 1
        mode = ("disconnect" if "DISCONNECT" in last else "slow" if "SLOW" in last
                else "streamerr" if "STREAMERR" in last else "nousage" if "NOUSAGE" in last else "ok")
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True

        def chunk(delta=None, text=None, finish=None):
            if chat:
                ch = {"index": 0, "delta": delta if delta is not None else {}, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                ch = {"index": 0, "text": text or "", "finish_reason": finish}
                obj = "text_completion"
            return "data: " + json.dumps({"id": "x", "object": obj, "choices": [ch], "usage": None}) + "\n\n"

        async def gen():
            if chat:
                yield chunk({"role": "assistant", "content": ""})  # no content: must not count as TTFT
            yield ": keep-alive\n\n"
            await asyncio.sleep(TTFT_S)
            sent = 0
            i = 0
            while sent < n:
                if i:
                    await asyncio.sleep(GAP_S * (20 if mode == "slow" else 1))
                k = min(per_chunk, n - sent)
                piece = "".join(f" w{sent + j}" for j in range(k))
                yield chunk({"content": piece} if chat else None, text=piece)
                sent += k
                i += 1
                if mode == "disconnect" and i == 2:
                    raise RuntimeError("simulated crash mid-stream")
                if mode == "streamerr" and i == 1:
                    err = {"error": {"message": "oom", "type": "server_error"}}
                    yield "data: " + json.dumps(err) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
            yield chunk({}, finish="length")
            if mode != "nousage":
                usage = {"prompt_tokens": len(prompt_text.split()), "completion_tokens": n,
                         "total_tokens": n + len(prompt_text.split()),
                         "prompt_tokens_details": {"cached_tokens": 3}}
                yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        return await handle(req, True)

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await handle(req, False)

    return app


@pytest.fixture(scope="module")
def fake_server():
    import uvicorn

    received: list = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_make_app(received), log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120.0, lambda: setattr(server, "should_exit", True))
    watchdog.daemon = True
    watchdog.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", received
    server.should_exit = True
    watchdog.cancel()
    thread.join(timeout=10)
    sock.close()


def _send(base_url, content, max_tokens=5, endpoint="chat", key=API_KEY, timeout=10.0):
    ep = http.Endpoint.parse(base_url)
    spec = serving.RequestSpec(1, max_tokens, messages=[{"role": "user", "content": content}], prompt=content)
    payload = serving.build_payload(spec, "fake-model", endpoint, 0.0, True, None)
    rec = RequestRecord(index=0)

    async def go():
        t0 = time.perf_counter()
        return await asyncio.wait_for(
            serving.send_request(ep, endpoint, payload, serving.request_headers(key), rec, t0, timeout), 30)

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_client_streams_and_times(fake_server, endpoint):
    url, _ = fake_server
    rec = _send(url, "hello there", max_tokens=6, endpoint=endpoint)
    assert rec.success, rec.error
    assert rec.status == 200 and rec.finish_reason == "length"
    assert rec.output_len == 6 and rec.output_len_source == "usage"
    assert rec.num_chunks == 6 and len(rec.itl) == 5
    assert rec.generated_text == "".join(f" w{i}" for i in range(6))
    assert rec.cached_tokens == 3 and rec.usage_prompt_tokens is not None
    assert TTFT_S * 0.9 <= rec.ttft < TTFT_S + 1.0
    # the server sleeps GAP_S between chunks, but a client-side pause (GC, another thread) can bunch two
    # arrivals together: bound every gap from above, the longest from below, and the total by construction
    assert all(0 <= g < GAP_S + 1.0 for g in rec.itl) and max(rec.itl) >= GAP_S * 0.5
    assert rec.e2e_latency == pytest.approx(rec.ttft + sum(rec.itl))
    assert rec.e2e_latency >= TTFT_S + 5 * GAP_S


def test_client_multi_token_chunks_and_missing_usage(fake_server):
    url, _ = fake_server
    rec = _send(url, "SPEC please", max_tokens=6)
    assert rec.success and rec.num_chunks == 3 and rec.output_len == 6
    rec = _send(url, "NOUSAGE please", max_tokens=4)
    assert rec.success and rec.output_len == 4 and rec.output_len_source == "chunks"
    assert rec.usage_prompt_tokens is None


def test_client_http_500_recorded_not_raised(fake_server):
    url, _ = fake_server
    rec = _send(url, "FAIL500")
    assert not rec.success and rec.status == 500
    assert "engine exploded" in rec.error


def test_client_auth_error(fake_server):
    url, _ = fake_server
    rec = _send(url, "hi", key="wrong")
    assert not rec.success and rec.status == 401 and "bad key" in rec.error


def test_client_disconnect_mid_stream(fake_server):
    url, _ = fake_server
    rec = _send(url, "DISCONNECT", max_tokens=8)
    assert not rec.success and rec.status == 200
    assert "connection closed mid-response after 2 chunks" in rec.error
    assert len(rec.chunk_times) == 2


def test_client_error_event_in_stream(fake_server):
    url, _ = fake_server
    rec = _send(url, "STREAMERR", max_tokens=8)
    assert not rec.success and "oom" in rec.error


def test_client_timeout(fake_server):
    url, _ = fake_server
    t = time.perf_counter()
    rec = _send(url, "SLOW", max_tokens=50, timeout=0.3)
    assert time.perf_counter() - t < 5
    assert not rec.success and "timeout" in rec.error


def test_base_url_parsing():
    ep = serving.parse_base_url("http://example.com:9000/v1/")
    assert (ep.scheme, ep.host, ep.port, ep.base_path) == ("http", "example.com", 9000, "")
    ep = serving.parse_base_url("https://gw.example.com/glint/v1")
    assert (ep.port, ep.base_path, ep.host_header()) == (443, "/glint", "gw.example.com")
    ep = serving.parse_base_url("127.0.0.1:8000")
    assert (ep.host, ep.port, ep.host_header()) == ("127.0.0.1", 8000, "127.0.0.1:8000")
    with pytest.raises(ValueError):
        http.Endpoint.parse("ftp://x")


def test_client_connection_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rec = _send(f"http://127.0.0.1:{port}", "hi")
    assert not rec.success and rec.status is None and "connect" in rec.error


def test_cli_random_end_to_end(fake_server, tmp_path, capsys):
    url, _ = fake_server
    out = tmp_path / "r.json"
    rc = serving.main(["--base-url", url, "--api-key", API_KEY, "--dataset", "random", "--num-prompts", "12",
                       "--request-rate", "200", "--max-concurrency", "4", "--input-len", "16",
                       "--output-len", "4", "--seed", "1", "--output-json", str(out), "--disable-tqdm",
                       "--goodput", "ttft:5000"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "Median TTFT (ms)" in text and "P99 TPOT (ms)" in text
    res = json.loads(out.read_text())
    assert res["schema"] == serving.SCHEMA
    assert res["config"]["model"] == "fake-model" and "api_key" not in res["config"]
    s = res["summary"]
    assert s["completed"] == 12 and s["failed"] == 0 and s["total_output_tokens"] == 48
    assert s["concurrency"] <= 4.0 + 1e-6
    assert s["goodput"]["good_requests"] == 12
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert set(s[key]) >= {"mean", "median", "p90", "p99"}
    assert s["ttft_ms"]["median"] >= TTFT_S * 1000 * 0.9
    assert len(res["requests"]) == 12
    r0 = res["requests"][0]
    assert r0["success"] and r0["output_len"] == 4 and len(r0["itl"]) == 3 and r0["tpot"] > 0
    # with a concurrency cap of 4, no more than 4 requests overlap
    spans = [(r["send_time"], r["send_time"] + r["e2e_latency"]) for r in res["requests"]]
    for t, _ in spans:
        assert sum(a <= t + 1e-9 < b for a, b in spans) <= 4

    # a baseline comparison prints ratios
    rc = serving.main(["--base-url", url, "--api-key", API_KEY, "--num-prompts", "4", "--input-len", "8",
                       "--output-len", "2", "--output-json", "none", "--disable-tqdm",
                       "--baseline-json", str(out)])
    assert rc == 0 and "/ baseline" in capsys.readouterr().out


def test_cli_agentic_end_to_end(fake_server, tmp_path, capsys):
    url, received = fake_server
    received.clear()
    out = tmp_path / "a.json"
    rc = serving.main(["--base-url", url, "--api-key", API_KEY, "--dataset", "agentic", "--num-sessions", "3",
                       "--num-turns", "3", "--input-len", "40", "--output-len", "3",
                       "--tool-result-len", "60",
                       "--request-rate", "inf", "--max-concurrency", "2", "--seed", "2",
                       "--output-json", str(out), "--disable-tqdm", "--warmup-requests", "0"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["summary"]["completed"] == 9
    assert [t["turn"] for t in res["per_turn"]] == [0, 1, 2]
    assert all(t["completed"] == 3 for t in res["per_turn"])
    assert res["per_turn"][2]["mean_input_len"] > res["per_turn"][0]["mean_input_len"]
    assert "Per turn" in capsys.readouterr().out
    # what the server saw: turn k+1 = turn k messages + the streamed output + a tool result
    by_task: dict[str, list[list[dict]]] = {}
    for body in received:
        assert body["tools"] and body["model"] == "fake-model"
        by_task.setdefault(body["messages"][1]["content"], []).append(body["messages"])
    assert len(by_task) == 3
    for turns in by_task.values():
        turns.sort(key=len)
        assert len(turns) == 3
        for a, b in zip(turns, turns[1:]):
            assert b[:len(a)] == a
            assert b[len(a)]["role"] == "assistant" and b[len(a)]["content"] == " w0 w1 w2"
            assert b[len(a) + 1]["role"] == "tool"


def test_cli_agentic_edit_and_plain_code_end_to_end(fake_server, tmp_path):
    url, received = fake_server
    received.clear()
    out = tmp_path / "e.json"
    common = ["--base-url", url, "--api-key", API_KEY, "--tokenizer", "none", "--request-rate", "inf",
              "--disable-tqdm", "--warmup-requests", "0", "--seed", "4", "--output-len", "5"]
    rc = serving.main(common + ["--dataset", "agentic-edit", "--num-sessions", "2", "--num-turns", "3",
                                "--input-len", "60", "--system-prompt-len", "20", "--output-json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["summary"]["completed"] == 6 and res["config"]["num_sessions"] == 2
    assert [t["turn"] for t in res["per_turn"]] == [0, 1, 2]
    by_session: dict[str, list[list[dict]]] = {}
    for body in received:
        assert "tools" not in body and body["max_tokens"] == 5
        assert body["messages"][0]["role"] == "system"
        assert "Apply these edits" in body["messages"][-1]["content"]
        by_session.setdefault(body["messages"][1]["content"], []).append(body["messages"])
    assert len(by_session) == 2
    for turns in by_session.values():
        turns.sort(key=len)
        for a, b in zip(turns, turns[1:]):
            assert b[:len(a)] == a and b[len(a)] == {"role": "assistant", "content": " w0 w1 w2 w3 w4"}
    received.clear()
    rc = serving.main(common + ["--dataset", "plain-code", "--num-prompts", "3", "--input-len", "50",
                                "--output-json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["summary"]["completed"] == 3 and "per_turn" not in res
    assert all(b["messages"][0]["content"].startswith("Continue `") for b in received)


def test_cli_agentic_failure_skips_later_turns(fake_server, tmp_path):
    url, _ = fake_server
    out = tmp_path / "f.json"
    rc = serving.main(["--base-url", url, "--api-key", API_KEY, "--dataset", "agentic", "--num-sessions", "2",
                       "--num-turns", "3", "--input-len", "20", "--output-len", "2",
                       "--output-json", str(out),
                       "--disable-tqdm", "--warmup-requests", "0", "--extra-body", '{"max_tokens": 0}'])
    # max_tokens 0 → the fake server streams only a finish chunk → "no content" failures, nothing crashes
    assert rc == 1
    res = json.loads(out.read_text())
    assert res["summary"]["failed"] == 2 and res["summary"]["skipped"] == 4
    assert all("no content" in r["error"] for r in res["requests"] if not r["success"] and not r["skipped"])


def test_cli_with_tokenizer_and_token_id_prompts(fake_server, hf_tokenizer_dir, tmp_path):
    url, received = fake_server
    received.clear()
    out = tmp_path / "t.json"
    rc = serving.main(["--base-url", url, "--api-key", API_KEY, "--endpoint", "completions",
                       "--tokenize-prompt",
                       "--tokenizer", hf_tokenizer_dir, "--num-prompts", "5", "--input-len", "48",
                       "--output-len", "3", "--output-json", str(out), "--disable-tqdm",
                       "--warmup-requests", "0", "--include-text"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["config"]["tokenizer"] == hf_tokenizer_dir
    assert all(len(b["prompt"]) == 48 for b in received)
    for r in res["requests"]:
        assert r["prompt_len"] == 48 and r["retokenized_output_len"] > 0
        assert r["generated_text"] == " w0 w1 w2"
    assert res["summary"]["total_output_tokens_retokenized"] is not None


def test_warmup_failure_is_a_clean_exit(fake_server):
    url, _ = fake_server
    with pytest.raises(SystemExit, match="401"):
        serving.main(["--base-url", url, "--api-key", "nope", "--num-prompts", "2", "--output-json", "none",
                      "--disable-tqdm"])
