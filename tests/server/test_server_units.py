"""Server pieces without a live server: CLI -> ServerConfig -> engine kwargs, chat-template handling, errors."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from engine.config import EngineConfig
from model.tiny import tiny_model_dir
from server.chat_template import ChatTemplate, normalize_messages, template_kwargs
from server.cli import UNSUPPORTED, build_parser, engine_kwargs, main, parse_args, speculative_config
from server.config import ServerConfig
from server.engine_client import EngineClient, EngineDeadError, RequestStream
from server.errors import APIError
from server.middleware import GlintMiddleware
from server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from server.serving import Generation


def test_defaults_and_non_default_args():
    cfg = parse_args([])
    assert cfg == ServerConfig()
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and cfg.model is None
    cfg = parse_args(
        [
            "--model",
            "/m",
            "--api-key",
            "a",
            "b",
            "--port",
            "9000",
            "--served-model-name",
            "x",
            "y",
            "--default-chat-template-kwargs",
            '{"enable_thinking": false}',
        ]
    )
    assert cfg.api_key == ("a", "b") and cfg.served_model_name == ("x", "y")
    nd = cfg.non_default_args()
    assert nd["api_key"] == ["<redacted>", "<redacted>"] and nd["port"] == 9000
    assert cfg.default_chat_template_kwargs_dict == {"enable_thinking": False}


def test_engine_kwargs_mapping():
    cfg = parse_args(
        [
            "--model",
            "/ckpt",
            "--tp-size",
            "2",
            "--max-model-len",
            "8192",
            "--max-running-requests",
            "32",
            "--chunked-prefill-size",
            "4096",
            "--kv-cache-dtype",
            "fp8_e4m3",
            "--mem-fraction-static",
            "0.8",
            "--page-size",
            "32",
            "--no-enable-prefix-caching",
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--load-format",
            "dummy",
            "--seed",
            "7",
            "--enforce-eager",
        ]
    )
    assert cfg.engine == {  # by LLM(...) keyword, only what the command line set
        "tensor_parallel_size": 2, "max_model_len": 8192, "max_num_seqs": 32, "max_num_batched_tokens": 4096,
        "kv_cache_dtype": "fp8_e4m3", "mem_fraction_static": 0.8, "kv_block_size": 32,
        "enable_prefix_caching": False, "device": "cuda", "dtype": "bfloat16", "load_format": "dummy", "seed": 7,
        "enforce_eager": True,
    }
    kw = engine_kwargs(cfg)
    assert kw == {
        "model": "/ckpt",
        "tensor_parallel_size": 2,
        "base_gpu_id": None,
        "allreduce_fusion": False,
        "enable_expert_parallel": False,
        "dtype": "bfloat16",
        "device": "cuda",
        "max_model_len": 8192,
        "max_num_batched_tokens": 4096,
        "max_num_seqs": 32,
        "kv_block_size": 32,
        "num_kv_blocks": None,
        "enable_prefix_caching": False,
        "load_format": "dummy",
        "seed": 7,
        "enforce_eager": True,
        "piecewise_cuda_graph_max_tokens": 4096,
        "kv_cache_dtype": "fp8_e4m3",
        "mem_fraction_static": 0.8,
        "enable_shared_experts_fusion": False,
        "enable_fused_qk_norm_rope": False,
        "attention_backend": "triton",
        "prefill_attention_backend": "auto",
        "gc_freeze": True,
        "kernel_warmup": True,
        "overlap_scheduling": None,
        "disaggregation_mode": "null",
        "disaggregation_transfer_backend": "auto",
        "disaggregation_async_transfer": False, "disaggregation_async_last_chunk_sync": None,
        "disaggregation_bootstrap_host": "127.0.0.1",
        "disaggregation_bootstrap_port": 8998,
        "disaggregation_timeout": 60.0,
        "tokenizer": None,
        "speculative_config": None,
        "max_prefill_tokens_while_decoding": None,
    }
    assert engine_kwargs(parse_args(["--model", "/ckpt", "--disable-overlap-schedule", "--enable-shared-experts-fusion",
                                     "--enable-fused-qk-norm-rope"]))["overlap_scheduling"] is False
    # vLLM's spellings and SGLang's --disable-* flags set the same options
    alias = parse_args(["--tensor-parallel-size", "2", "--max-num-batched-tokens", "64", "--max-num-seqs", "3",
                        "--block-size", "8", "--gpu-memory-utilization", "0.5", "--context-length", "100",
                        "--disable-radix-cache", "--disable-cuda-graph", "--random-seed", "3",
                        "--tokenizer-path", "/t"])
    assert alias.engine == {"tensor_parallel_size": 2, "max_num_batched_tokens": 64, "max_num_seqs": 3,
                            "kv_block_size": 8, "mem_fraction_static": 0.5, "max_model_len": 100,
                            "enable_prefix_caching": False, "enforce_eager": True, "seed": 3, "tokenizer": "/t"}

    from engine import EngineConfig

    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.create("/ckpt", tp_size=2)  # the flag's name is not a keyword


def test_every_engine_option_has_a_flag_with_help(capsys):
    from engine.config import engine_options

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in engine_options():
        for flag in (*opt.flags, *opt.off_flags):
            assert flag in out, flag
    actions = {a.dest: a for a in build_parser()._actions}
    assert all(a.help for a in actions.values()), [d for d, a in actions.items() if not a.help]


def test_disaggregation_flags_map_to_engine_kwargs():
    kw = engine_kwargs(parse_args([
        "--model", "/ckpt", "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "local",
        "--disaggregation-async-transfer", "--disaggregation-bootstrap-host", "10.0.0.2",
        "--disaggregation-bootstrap-port", "9100", "--disaggregation-timeout", "12.5",
        "--disaggregation-async-last-chunk-sync",
    ]))
    assert {k: v for k, v in kw.items() if k.startswith("disaggregation_")} == {
        "disaggregation_mode": "decode", "disaggregation_transfer_backend": "local",
        "disaggregation_async_transfer": True, "disaggregation_bootstrap_host": "10.0.0.2",
        "disaggregation_bootstrap_port": 9100, "disaggregation_timeout": 12.5,
        "disaggregation_async_last_chunk_sync": True,
    }


@pytest.mark.parametrize("flags,expected", [
    ([], False), (["--disaggregation-async-transfer"], True),  # on with async transfer unless switched off
    (["--disaggregation-async-transfer", "--disable-disaggregation-async-last-chunk-sync"], False),
])
def test_async_last_chunk_sync_flags(tiny_bf16, flags, expected):
    kw = engine_kwargs(parse_args(["--model", str(tiny_bf16), "--disaggregation-mode", "prefill", "--device", "cpu",
                                   *flags]))
    assert EngineConfig.create(**kw).disaggregation.async_last_chunk_sync is expected


@pytest.mark.parametrize("flags,backend", [([], "triton"), (["--attention-backend", "triton"], "triton"),
                                           (["--attention-backend", "fa3"], "fa3")])
def test_attention_backend_flag_maps_to_engine_kwarg(flags, backend):
    cfg = parse_args(["--model", "/ckpt", *flags])
    assert engine_kwargs(cfg)["attention_backend"] == backend


@pytest.mark.parametrize(
    "flags",
    [
        ["--attention-backend", "torch"],
        ["--attention-backend", "flashinfer"],
        ["--chunked-prefill-size", "-1"],
    ],
)
def test_unsupported_flags_fail_clearly(flags, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2
    assert "not supported yet" in capsys.readouterr().err


def test_reference_launch_line_flags_parse():
    # every flag of the DESIGN.md launch lines is known to the parser (supported or refused, never "unrecognized")
    names = {u[0] for u in UNSUPPORTED}
    assert "disaggregation_mode" not in names and "disaggregation_async_transfer" not in names
    assert "speculative_algorithm" not in names  # NEXTN and SUFFIX run
    assert "enable_shared_experts_fusion" not in names and "enable_fused_qk_norm_rope" not in names
    cfg = parse_args(
        [
            "--tool-call-parser",
            "glm47",
            "--reasoning-parser",
            "glm45",
            "--tp",
            "8",
            "--host",
            "0.0.0.0",
            "--allowed-origins",
            "http://a",
            "--log-requests",
        ]
    )
    assert cfg.engine["tensor_parallel_size"] == 8 and cfg.log_requests == "params" and cfg.allowed_origins == ("http://a",)


def test_glint_serve_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "glint serve" in capsys.readouterr().out
    assert main(["bogus"]) == 2


def test_template_kwargs_precedence():
    assert template_kwargs({"enable_thinking": False}, None) == {"enable_thinking": False}
    assert template_kwargs({"enable_thinking": True}, None, reasoning_effort="none") == {
        "enable_thinking": False
    }
    assert template_kwargs({}, {"enable_thinking": True}, reasoning_effort="none") == {
        "enable_thinking": True
    }
    assert template_kwargs({}, None, thinking={"type": "disabled", "clear_thinking": False}) == {
        "enable_thinking": False,
        "clear_thinking": False,
    }
    assert template_kwargs({"a": 1}, {"thinking": False, "b": 2})["enable_thinking"] is False
    # "minimal" turns thinking off on every route (GLM-4.7 thinks or does not); "low" leaves it on
    assert template_kwargs({"enable_thinking": True}, None, reasoning_effort="minimal")["enable_thinking"] is False
    assert template_kwargs({"enable_thinking": False}, None, reasoning_effort="low")["enable_thinking"] is True


def test_normalize_messages():
    msgs = normalize_messages(
        [
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "reasoning": "r",
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": [1]}'}}
                ],
            },
            {"role": "function", "tool_call_id": "1", "content": "ok"},
        ]
    )
    assert msgs[0] == {"role": "system", "content": "a\nb"}
    assert msgs[2]["reasoning_content"] == "r" and msgs[2]["content"] == ""
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"x": [1]}
    assert msgs[3] == {"role": "tool", "content": "ok", "tool_call_id": "1"}
    with pytest.raises(APIError) as e:
        normalize_messages(
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}],
                }
            ]
        )
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"


def test_render_with_tiny_template():
    from transformers import AutoTokenizer

    from model.tiny import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("bf16"))
    tpl = ChatTemplate(tok)
    msgs = normalize_messages(
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "think",
                "tool_calls": [{"function": {"name": "f", "arguments": json.dumps({"s": "a b", "n": 2})}}],
            },
            {"role": "tool", "content": "res"},
        ]
    )
    on = tpl.render(msgs, kwargs=template_kwargs({}, None))
    assert on.endswith("<|assistant|><think>")
    assert (
        "<tool_call>f<arg_key>s</arg_key><arg_value>a b</arg_value><arg_key>n</arg_key><arg_value>2</arg_value>"
        "</tool_call>" in on
    )
    assert "<think>think</think>" in on  # reasoning after the last user turn is kept
    off = tpl.render(msgs, kwargs=template_kwargs({}, None, reasoning_effort="none"))
    assert off.endswith("<|assistant|></think>")
    ids = tpl.encode(on)
    assert tok.decode(ids) == on


def test_parse_body_errors():
    with pytest.raises(APIError) as e:
        parse_body(b"{", ChatCompletionRequest)
    assert e.value.status == 400 and "JSON" in e.value.message
    with pytest.raises(APIError) as e:
        parse_body(b'{"messages": "x"}', ChatCompletionRequest)
    assert e.value.param == "messages"
    req = parse_body(b'{"prompt": [[1, 2], [3]], "unknown": 1}', CompletionRequest)
    assert req.prompt == [[1, 2], [3]] and req.max_tokens == 16
    assert parse_body(b'{"prompt": [1, 2]}', CompletionRequest).prompt == [1, 2]
    assert parse_body(b'{"prompt": ["a", "b"]}', CompletionRequest).prompt == ["a", "b"]


def test_presets(capsys):
    cfg = parse_args(["--preset", "baseline-1gpu", "--port", "9001", "--model", "/m"])
    assert cfg.engine["load_format"] == "dummy" and cfg.served_model_name == ("glm-4.7-fp8",) and cfg.port == 9001
    assert engine_kwargs(cfg)["mem_fraction_static"] == 0.85 and cfg.host == "0.0.0.0"
    baseline = parse_args(["--preset", "baseline"])  # TP8 + NEXTN 3/1/4, as Zhipu launches it
    assert speculative_config(baseline) == {"method": "mtp", "num_speculative_tokens": 3}
    assert not baseline.engine.get("allreduce_fusion")
    # the seed's --enable-flashinfer-allreduce-fusion turns on glint's fused one-shot all-reduce
    assert parse_args(["--preset", "optimized"]).engine["allreduce_fusion"] is True
    assert parse_args(["--enable-allreduce-fusion", "--tp", "2"]).engine["allreduce_fusion"] is True
    with pytest.raises(SystemExit):
        parse_args(["--preset", "no-such-preset"])


def test_speculative_config_json_flag(capsys):
    """vLLM's --speculative-config: a JSON object whose keys go over the SGLang-style flags."""
    cfg = parse_args(["--speculative-algorithm", "SUFFIX", "--speculative-num-draft-tokens", "17",
                      "--speculative-config", '{"draft_budget": false, "min_token_prob": 0.2}'])
    assert speculative_config(cfg) == {"method": "suffix", "num_speculative_tokens": 16, "draft_budget": False,
                                       "min_token_prob": 0.2}
    assert engine_kwargs(parse_args(["--model", "/m", "--speculative-config", '{"method": "mtp"}'])
                         )["speculative_config"] == {"method": "mtp"}
    for bad, why in (("[1]", "JSON object"), ("{x", "not valid JSON"), ('{"method": "suffix", "nope": 1}', "nope")):
        with pytest.raises(SystemExit):  # a usage error, before anything starts
            parse_args(["--speculative-config", bad])
        assert why in capsys.readouterr().err


def test_metrics_show_no_load_while_the_engine_is_dead():
    """A dead (or restarting) engine runs nothing: /metrics used to keep reporting its last running/waiting
    counts and KV usage until a new engine was ready."""
    import httpx

    from server.app import build_app

    app = build_app(ServerConfig(api_key=("k",)), {"model": str(tiny_model_dir("bf16"))})
    client = app.state.glint.client
    client.stats = {"num_running": 3, "num_waiting": 2, "total_kv_blocks": 10, "free_kv_blocks": 2}
    client.dead_reason = "engine process 1 exited unexpectedly (killed by signal SIGKILL)"

    async def scrape() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get("/metrics", headers={"Authorization": "Bearer k"})).text

    text = asyncio.run(scrape())
    for name in ("glint:num_requests_running", "glint:num_requests_waiting", "glint:kv_cache_usage_perc"):
        line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
        assert float(line.rsplit(" ", 1)[1]) == 0.0, line


def test_app_without_engine_json_log_and_503(caplog):
    """The ASGI app in process, its engine never started: 503 + Retry-After until ready, JSON request lines."""
    import asyncio
    import logging

    import httpx

    from model.tiny import tiny_model_dir
    from server.app import build_app

    cfg = ServerConfig(log_format="json", api_key=("k",), served_model_name=("tiny",))
    app = build_app(cfg, {"model": str(tiny_model_dir("bf16"))})

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            h = await c.get("/health")
            assert h.status_code == 503 and h.headers["retry-after"]
            r = await c.post(
                "/v1/chat/completions",
                headers={"Authorization": "Bearer k"},
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 503 and r.headers["retry-after"]
            assert r.json()["error"]["type"] == "server_error"
            r = await c.post(
                "/v1/messages",
                headers={"x-api-key": "k"},
                json={"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
            assert (await c.get("/v1/models")).status_code == 401

    with caplog.at_level(logging.INFO, logger="glint.requests"):
        asyncio.run(run())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "glint.requests"]
    assert [x["status"] for x in lines] == [503, 503, 401]
    assert lines[0]["path"] == "/v1/chat/completions" and lines[0]["request_id"]


def test_queued_estimate_counts_only_requests_without_a_running_slot():
    from server.serving import queued_estimate

    idle = {"num_running": 0, "num_waiting": 0}
    assert queued_estimate(idle, 1, 2) == 0  # a second simultaneous request still finds a free slot
    assert queued_estimate(idle, 3, 2) == 1
    assert queued_estimate({"num_running": 2, "num_waiting": 0}, 1, 2) == 1
    assert queued_estimate({"num_running": 1, "num_waiting": 2}, 0, 2) == 2
    assert queued_estimate({"num_running": 0, "num_waiting": 0}, 2, None) == 2  # slot count unknown: conservative


def _admit(limit: int, stats: dict, max_running: int = 2) -> int:
    """Generation.start's status against a fake server state: 200 when sent to the engine, else the error's."""
    sent: list[str] = []

    async def add_request(rid, *args):
        sent.append(rid)
        return object()

    counter = SimpleNamespace(inc=lambda *a: None)
    state = SimpleNamespace(
        check_ready=lambda: None,
        config=SimpleNamespace(max_queued_requests=limit),
        client=SimpleNamespace(stats=stats, num_unacked=0, info={"max_num_seqs": max_running}, add_request=add_request),
        metrics=SimpleNamespace(num_rejected_requests=counter, num_requests_in_flight=counter),
    )
    gen = Generation(state, "r", n=1, prompt_len=1, log={}, arrival=0.0)
    try:
        asyncio.run(gen.start([1], None, None))
    except APIError as e:
        return e.status
    return 200 if sent == ["r"] else 0


def test_max_queued_requests_0_admits_requests_that_find_a_free_slot():
    """--max-queued-requests 0 (the CLI allows it) means "never queue", not "refuse everything": an idle server
    used to answer 429 to every request."""
    assert _admit(0, {"num_running": 0, "num_waiting": 0}) == 200
    assert _admit(0, {"num_running": 1, "num_waiting": 0}) == 200
    assert _admit(0, {"num_running": 2, "num_waiting": 0}) == 429  # it would wait
    assert _admit(1, {"num_running": 2, "num_waiting": 0}) == 200
    assert _admit(1, {"num_running": 2, "num_waiting": 1}) == 429


def test_requests_during_an_engine_restart_say_so():
    """While --engine-restart brings a dead engine back, a request's 503 must not claim the server is starting."""
    from server.serving import ServerState

    client = SimpleNamespace(ready=False, alive=False, dead_reason=None, restarts=1)
    with pytest.raises(APIError) as e:
        ServerState.check_ready(SimpleNamespace(draining=False, client=client))
    assert e.value.status == 503 and "restarting" in e.value.message and "starting;" not in e.value.message
    client.restarts = 0
    with pytest.raises(APIError) as e:
        ServerState.check_ready(SimpleNamespace(draining=False, client=client))
    assert "the model is still loading" in e.value.message


def test_engine_stall_timeout_shorter_than_the_heartbeat_is_a_usage_error(capsys):
    """An idle engine sends its heartbeat about once a second: a shorter --engine-stall-timeout killed a healthy
    engine as "stalled" right after start-up (the server then exited 1)."""
    for bad in ("0.5", "1"):
        with pytest.raises(SystemExit) as e:
            parse_args(["--engine-stall-timeout", bad])
        assert e.value.code == 2
        assert "--engine-stall-timeout" in capsys.readouterr().err
    assert parse_args(["--engine-stall-timeout", "0"]).engine_stall_timeout == 0  # off
    assert parse_args(["--engine-stall-timeout", "2"]).engine_stall_timeout == 2.0


def test_reliability_flags_parse_and_show_in_help(capsys):
    cfg = parse_args([])
    assert cfg.allowed_origins == () and not cfg.metrics_public  # safe defaults: no CORS, metrics behind a key
    assert cfg.engine_restart == 0 and cfg.engine_stall_timeout == 30.0 and cfg.shutdown_timeout == 30.0
    assert cfg.request_bytes_limit(4096) == 8 << 20  # small context: the 8 MiB floor
    assert cfg.request_bytes_limit(1 << 20) == 32 << 20  # 32 bytes per context token
    cfg = parse_args(
        [
            "--engine-restart", "2", "--engine-stall-timeout", "5", "--shutdown-timeout", "7",
            "--max-request-bytes", "65536", "--metrics-public",
        ]
    )  # fmt: skip
    assert (cfg.engine_restart, cfg.engine_stall_timeout, cfg.shutdown_timeout) == (2, 5.0, 7.0)
    assert cfg.metrics_public and cfg.request_bytes_limit(1 << 20) == 65536
    assert ServerConfig().tokenizer_cache_chars == 32 << 20 and parse_args(
        ["--tokenizer-cache-chars", "0"]).tokenizer_cache_chars == 0
    for bad in (["--engine-restart", "-1"], ["--max-request-bytes", "10"], ["--shutdown-timeout", "-1"],
                ["--tokenizer-cache-chars", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--engine-restart", "--engine-stall-timeout", "--shutdown-timeout", "--max-request-bytes",
        "--metrics-public", "--allowed-origins",
    ):  # fmt: skip
        assert flag in out, flag


def test_json_checks_and_log_escaping():
    from server.middleware import escape_controls
    from server.validation import check_json_schema, check_logit_bias, check_seed, load_json

    assert load_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for raw, param in (
        (b'{"a": NaN}', None),
        (b'{"a": 1e999}', "a"),
        (b'{"a": ["\\ud800"]}', "a[0]"),
        (b'{"a": "\\udc00x"}', "a"),
        (b"[" * 65 + b"]" * 65, "[0]" * 64),
        (b"[" * 5000 + b"]" * 5000, None),
        (b"\xff", None),
    ):
        with pytest.raises(APIError) as e:
            load_json(raw)
        assert e.value.status == 400 and e.value.param == param, (raw[:20], e.value.param)
    assert load_json(b'"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is fine
    check_seed(2**64 - 1), check_seed(-(2**63)), check_seed(None)
    for seed in (2**64, -(2**63) - 1, True, 1.0):
        with pytest.raises(APIError):
            check_seed(seed)
    check_logit_bias({"0": -100, "151329": 100.0})
    for bias in ({"1": 100.5}, {"1": float("inf")}, {"-1": 1}, {"x": 1}, {"1": "2"}, [1]):
        with pytest.raises(APIError):
            check_logit_bias(bias)
    check_json_schema({"type": ["string", "null"], "items": [True, {"type": "integer"}], "$defs": {}}, "p")
    with pytest.raises(APIError) as e:
        check_json_schema({"type": "object", "properties": {"a": {"oneOf": []}}}, "p")
    assert e.value.param == "p.properties.a.oneOf"
    assert escape_controls("a\r\nb\x1bc\x9bd\u2028e\ud800") == "a\\u000d\\u000ab\\u001bc\\u009bd\\u2028e\\ud800"
    assert escape_controls("plain ü 😀") == "plain ü 😀"


def test_continue_final_message_renders_no_new_turn():
    tpl = ChatTemplate(AutoTokenizer.from_pretrained(tiny_model_dir("bf16")))
    msgs = normalize_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Once upon"}])
    kwargs = template_kwargs({}, None)
    cont = tpl.render(msgs, kwargs=kwargs, continue_final_message=True)  # add_generation_prompt yields to it
    assert cont.endswith("q<|assistant|></think>Once upon"), cont
    assert tpl.render(msgs, kwargs=kwargs).endswith("Once upon<|assistant|><think>")
    with pytest.raises(APIError) as e:
        tpl.render(msgs[:1], kwargs=kwargs, continue_final_message=True)
    assert e.value.status == 400 and e.value.param == "continue_final_message"


def test_a_non_ascii_api_key_matches_its_utf8_bytes():
    """Header bytes are decoded as latin-1; the key must be compared as the bytes the client sent (UTF-8), not
    re-encoded from the latin-1 text (a key such as 'clé' never matched)."""
    async def ok_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw = GlintMiddleware(ok_app, api_keys=("clé-🔑",), log_requests="off")

    def status(key: bytes) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": [(b"x-api-key", key)]}
        asyncio.run(mw(scope, receive, send))
        return sent[0]["status"]

    assert status("clé-🔑".encode()) == 200
    assert status(b"Bearer x") == 401 and status("cle-🔑".encode()) == 401


@pytest.mark.parametrize("flags", [["--max-prefill-tokens", "16384"], ["--pres", "optimized"]])
def test_abbreviated_flags_are_refused(flags, capsys):
    # SGLang's --max-prefill-tokens (a prefill batch's size) must not pass as an abbreviation of
    # --max-prefill-tokens-while-decoding, and --pres must not be parsed as a --preset that is then never expanded
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_explicit_served_model_name_overrides_the_preset():
    # "explicit flags override the preset": the preset's name must not stay first (the name echoed in responses)
    assert parse_args(["--preset", "baseline", "--served-model-name", "glm-4.7"]).served_model_name == ("glm-4.7",)
    # given twice, the last one wins as in SGLang and vLLM; several names go in one flag
    assert parse_args(["--served-model-name", "a", "--served-model-name", "b", "c"]).served_model_name == ("b", "c")


@pytest.mark.parametrize("fraction", [1.5, 90.0, 0.0, -0.5, float("nan")])
def test_mem_fraction_out_of_range_is_refused(tiny_bf16, fraction):
    # checked before the weights load: 90 (a percentage) or 1.5 would size the KV cache past the GPU's memory
    kw = engine_kwargs(parse_args(["--model", str(tiny_bf16), "--device", "cpu", "--gpu-memory-utilization",
                                   str(fraction)]))
    with pytest.raises(ValueError, match=r"mem_fraction_static .*must be in \(0, 1\]"):
        EngineConfig.create(**kw)


@pytest.mark.parametrize("flags", [
    ["--keepalive-interval", "-1"],  # asyncio.wait_for(-1) times out at once: a busy loop of keep-alive comments
    ["--ping-interval", "-0.5"],
    ["--stats-interval", "-1"],
    ["--engine-ready-timeout", "0"],  # the engine could never become ready in time
    ["--engine-ready-timeout", "-5"],
    ["--shutdown-timeout", "nan"],
    ["--engine-stall-timeout", "nan"],
])
def test_out_of_range_server_intervals_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_vllm_dotted_speculative_config():
    """Zhipu's vLLM line: `--speculative-config.method mtp --speculative-config.num_speculative_tokens 1`, the same
    as the JSON form; `=` spellings too, and dotted keys go over a JSON --speculative-config given with them."""
    line = ["--model", "/m", "--tensor-parallel-size", "8", "--speculative-config.method", "mtp",
            "--speculative-config.num_speculative_tokens", "1", "--tool-call-parser", "glm47"]
    assert speculative_config(parse_args(line)) == {"method": "mtp", "num_speculative_tokens": 1}
    cfg = parse_args(["--speculative-config", '{"method": "suffix", "draft_budget": false}',
                      "--speculative-config.num_speculative_tokens=8", "--speculative-config.method=suffix"])
    assert speculative_config(cfg) == {"method": "suffix", "draft_budget": False, "num_speculative_tokens": 8}


def test_positional_model_as_vllm_serve_takes_it(capsys):
    # `vllm serve MODEL ...` pasted as `glint serve MODEL ...`
    cfg = parse_args(["/ckpt/GLM-4.7-FP8", "--tensor-parallel-size", "8", "--served-model-name", "glm-4.7"])
    assert cfg.model == "/ckpt/GLM-4.7-FP8" and cfg.engine == {"tensor_parallel_size": 8}
    assert parse_args(["--tp", "8", "/m", "--port", "9"]).model == "/m"
    assert parse_args(["/m", "--model", "/m"]).model == "/m"
    with pytest.raises(SystemExit) as e:
        parse_args(["/a", "--model", "/b"])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err


def test_vllm_short_tp_flag():
    # vLLM's short spelling of --tensor-parallel-size, common in pasted `vllm serve` lines
    assert parse_args(["-tp", "8"]).engine == {"tensor_parallel_size": 8}
    assert parse_args(["-tp=4"]).engine == {"tensor_parallel_size": 4}


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_bootstrap_port_out_of_range_is_refused(tiny_bf16, port):
    # zmq bound -1 as port 65535 while the instance advertised tcp://HOST:-1 to decode instances
    kw = engine_kwargs(parse_args(["--model", str(tiny_bf16), "--device", "cpu", "--disaggregation-mode", "prefill",
                                   "--disaggregation-bootstrap-port", port]))
    with pytest.raises(ValueError, match=r"disaggregation_bootstrap_port .*must be in \[0, 65535\]"):
        EngineConfig.create(**kw)


def test_other_engines_flags_get_a_pointer(capsys):
    """SGLang / vLLM flags glint does not take say what to do instead (a bare 'unrecognized arguments' before);
    the no-op and same-meaning ones are accepted."""
    for argv, says in ((["--quantization", "fp8"], "quantization_config decides"),
                       (["--dp-size=2"], "disagg.router --colocated"),
                       (["--ep-size", "8", "--tp", "8"], "sharded by --tp-size"),
                       (["--cuda-graph-max-bs", "64"], "--max-running-requests"),
                       (["--bogus-flag"], "unrecognized arguments: --bogus-flag")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err, argv
    config = parse_args(["--enable-metrics", "--disable-log-requests"])
    assert config.log_requests == "off" and parse_args([]).log_requests == "meta"


def test_speculative_tuning_flags_need_an_algorithm(capsys):
    """--speculative-num-steps & co. without --speculative-algorithm were dropped without a word (also next to a
    JSON --speculative-config, whose help says the two combine). (parse_args, not main(): without the check main
    would start a server.)"""
    for extra in ([], ["--speculative-config", '{"method": "suffix"}']):
        with pytest.raises(SystemExit):
            parse_args(["--speculative-num-steps", "3", "--speculative-num-draft-tokens", "4", *extra])
        err = capsys.readouterr().err
        assert "--speculative-num-steps, --speculative-num-draft-tokens given without --speculative-algorithm" in err
    # with an algorithm (and the SGLang-only top-k flag alone) nothing changes
    assert speculative_config(parse_args(["--speculative-eagle-topk", "1"])) is None
    cfg = parse_args(["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "2"])
    assert speculative_config(cfg) == {"method": "mtp", "num_speculative_tokens": 2}


def test_a_message_that_does_not_unpickle_fails_open_requests_at_once():
    """The client's receive task is the only reader of the engine's messages: if it ended quietly on an error
    that is not a ZMQ one, open requests waited for the stall watchdog (or forever with it off)."""

    class BrokenReceiver:
        async def recv_pyobj(self):
            raise ValueError("unpickling failed")

    async def run():
        client = EngineClient({}, stall_timeout=0.0)
        client._receiver = BrokenReceiver()
        stream = RequestStream("r1", 1)
        client._streams["r1"] = stream
        await asyncio.wait_for(client._recv_loop(), 5)
        return client, await asyncio.wait_for(stream.queue.get(), 5)

    client, item = asyncio.run(run())
    assert isinstance(item, EngineDeadError)
    assert "lost the engine's message stream" in str(item) and "unpickling failed" in str(item)
    assert client.dead_reason is not None and not client.alive
