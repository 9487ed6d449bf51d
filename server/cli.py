"""Command line: `python -m server [flags]` or `glint serve [flags]` -> one frozen ServerConfig.

Flag names follow SGLang's launch lines (reference DESIGN.md) with vLLM spellings as aliases. The engine's flags
are not listed here: each engine option is declared once, with its flags and help, on the EngineConfig field it
fills (engine/config.py), and `add_engine_flags` builds them from there; they land in `ServerConfig.engine` by
their LLM(...) keyword. `UNSUPPORTED` lists flag values whose feature is not built yet: setting one fails at
start-up with a clear "not supported yet" error instead of being silently ignored (remove an entry when its
feature lands). server/engine_args.py maps a ServerConfig onto EngineConfig.create's keywords.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from engine.config import engine_options
from server.config import ServerConfig
from server.engine_args import ConfigError, engine_kwargs, speculative_config
from server.engine_process import HEARTBEAT_S
from server.launch import run_server

__all__ = ["UNSUPPORTED", "ConfigError", "build_parser", "engine_kwargs", "main", "parse_args", "speculative_config"]

# (parsed field, "is it set?", what the user is told). Checked after parsing; any hit stops the launch.
UNSUPPORTED: list[tuple[str, Callable[[Any], bool], str]] = [
    (
        "attention_backend",
        lambda v: v not in (None, "triton", "fa3"),
        "--attention-backend torch/flashinfer is not supported yet (only 'triton', the default, and 'fa3')",
    ),
    (
        "speculative_eagle_topk",
        lambda v: v not in (None, 1),
        "--speculative-eagle-topk must be 1: drafts are chains (tree drafts are not supported)",
    ),
    (
        "speculative_suffix_max_spec_offset",
        lambda v: v not in (None, 0.0),
        "--speculative-suffix-max-spec-offset must be 0.0 (other offsets are not supported)",
    ),
    (
        "chunked_prefill_size",
        lambda v: v is not None and v <= 0,
        "--chunked-prefill-size -1 (no chunking) is not supported yet; give a token budget per step",
    ),
]
# values the parser knows (SGLang's launch lines use them) only to refuse them through UNSUPPORTED
PLANNED_CHOICES = {"attention_backend": ("torch", "flashinfer")}
# SGLang / vLLM flags glint does not take, with what to do instead (a bare "unrecognized arguments" otherwise)
FOREIGN_FLAGS = {
    "--quantization": "the checkpoint's quantization_config decides (an FP8 checkpoint loads as FP8): drop it",
    "-q": "the checkpoint's quantization_config decides (an FP8 checkpoint loads as FP8): drop it",
    "--cuda-graph-max-bs": "CUDA graphs are captured for batches up to --max-running-requests: drop it",
    "--cuda-graph-bs": "CUDA graphs are captured for batches up to --max-running-requests: drop it",
    "--dp-size": "data parallelism is not supported: run instances behind `python -m disagg.router --colocated`",
    "--data-parallel-size": "data parallelism is not supported: run instances behind `python -m disagg.router "
                            "--colocated`",
    "--ep-size": "expert parallelism is not supported: the experts are sharded by --tp-size",
    "--enable-expert-parallel": "expert parallelism is not supported: the experts are sharded by --tp-size",
    "--enable-dp-attention": "data-parallel attention is not supported: drop it",
    "--pipeline-parallel-size": "pipeline parallelism is not supported: use --tp-size",
    "--pp-size": "pipeline parallelism is not supported: use --tp-size",
    "--disable-log-stats": "use --stats-interval 0",
}


def foreign_flag_errors(unknown: Sequence[str]) -> list[str]:
    """What to do instead, for each unknown argument that is another engine's flag."""
    named = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    return [f"{flag} is not a glint flag: {FOREIGN_FLAGS[flag]}" for flag in named if flag in FOREIGN_FLAGS]


def unsupported_errors(values: dict[str, Any]) -> list[str]:
    """`values`: the parsed command line (argparse fields)."""
    return [msg for name, is_set, msg in UNSUPPORTED if name in values and is_set(values[name])]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" except where it says nothing: no default (None; the help says what happens),
    the help names its default itself, or an off-switch (--disable-*)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.const is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_engine_flags(group: Any) -> None:
    """One flag (with its aliases) per engine option that declares flags, plus its --disable-* spellings."""
    for opt in engine_options():
        if opt.flags:
            kw: dict[str, Any] = {"dest": opt.dest, "default": opt.default, "help": opt.help}
            if opt.type is bool:
                kw["action"] = argparse.BooleanOptionalAction if opt.default else "store_true"
            else:
                kw["type"] = opt.type or str
                if opt.choices is not None:
                    kw["choices"] = [*opt.choices, *PLANNED_CHOICES.get(opt.name, ())]
            group.add_argument(*opt.flags, **kw)
        for flag in opt.off_flags:
            group.add_argument(flag, dest=opt.dest, action="store_const", const=False, default=opt.default,
                               help=f"do not {opt.help}")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser(prog: str = "python -m server") -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="glint: an OpenAI- and Anthropic-compatible server for GLM-4.7",
        formatter_class=HelpFormatter,
        # no prefixes of flags: SGLang's --max-prefill-tokens would pass for --max-prefill-tokens-while-decoding,
        # and --pres for a --preset that expand_preset never sees
        allow_abbrev=False,
    )
    p.add_argument(
        "--preset",
        metavar="NAME|PATH",
        help="launch flags from configs/presets/NAME.json (explicit flags override them)",
    )
    m = p.add_argument_group("model and engine")
    m.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the checkpoint folder as a positional argument (vLLM's `vllm serve MODEL`), same as --model")
    m.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=None,
        help="Hugging Face checkpoint folder; default: the built-in tiny model (written on first use)",
    )
    m.add_argument(  # not action="extend": a later --served-model-name (over a preset's) replaces the names
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) reported by /v1/models; the first is echoed when a request names none",
    )
    m.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="refuse new requests with 429 while this many are waiting",
    )
    add_engine_flags(m)
    m.add_argument(
        "--speculative-algorithm", choices=["NEXTN", "EAGLE", "MTP", "SUFFIX", "HYBRID"], type=str.upper,
        default=None,
        help="speculative decoding: NEXTN (= MTP = EAGLE: the checkpoint's MTP layer drafts a chain), SUFFIX "
             "(suffix decoding, model-free) or HYBRID (per request: the suffix draft when its score beats the "
             "request's MTP acceptance, else MTP); overlap scheduling is turned off with any of them",
    )
    m.add_argument("--speculative-num-steps", type=int, default=None,
                   help="MTP draft tokens per step (NEXTN, default 3; not used by SUFFIX, whose drafts adapt per "
                        "request)")
    m.add_argument("--speculative-eagle-topk", type=int, default=None, help="draft branching; only 1 (chains)")
    m.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="verify slots per request including the root token: at most N - 1 draft tokens "
                        "(SUFFIX default 17, i.e. 16 drafts)")
    m.add_argument("--speculative-suffix-cache-max-depth", type=int, default=None,
                   help="suffix trees' depth (default 64; the longest draft is about half of it)")
    m.add_argument("--speculative-suffix-max-spec-factor", type=float, default=None,
                   help="draft at most factor x the matched suffix length (default 1.0)")
    m.add_argument("--speculative-suffix-min-token-prob", type=float, default=None,
                   help="stop a draft where its cumulative tree probability falls below this (default 0.1)")
    m.add_argument("--speculative-suffix-max-spec-offset", type=float, default=None,
                   help="accepted for launch-line compatibility; only 0.0")
    m.add_argument("--speculative-config", dest="speculative_config_json", default=None, metavar="JSON",
                   help="the engine's speculative_config as a JSON object (vLLM's flag), e.g. "
                        "'{\"method\": \"suffix\", \"num_speculative_tokens\": 16, \"draft_budget\": false}', "
                        "or vLLM's dotted form: --speculative-config.method mtp; its keys override the "
                        "--speculative-* flags (spec.SpeculativeConfig lists them)")
    m.add_argument(
        "--tool-call-parser",
        choices=["glm47", "glm45"],
        default=d.tool_call_parser,
        help="accepted for launch-line compatibility; the GLM parser is built in",
    )
    m.add_argument(
        "--reasoning-parser",
        choices=["glm45"],
        default=d.reasoning_parser,
        help="accepted for launch-line compatibility; the GLM parser is built in",
    )
    m.add_argument("--enable-auto-tool-choice", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--enable-metrics", action="store_true", help=argparse.SUPPRESS)  # SGLang's: /metrics always on

    h = p.add_argument_group("HTTP front end")
    h.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    h.add_argument("--port", type=int, default=d.port, help="port to listen on")
    h.add_argument(
        "--api-key",
        nargs="+",
        action="extend",
        default=None,
        help="accepted keys (Authorization: Bearer or x-api-key); every route but /health, /version and "
        "HEAD / then needs one; default: no auth",
    )
    h.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without the API key (for a Prometheus scraper without credentials)",
    )
    h.add_argument(
        "--allowed-origins",
        nargs="+",
        default=None,
        help="CORS: origins allowed to call the API from a browser ('*' for any); default: no CORS headers",
    )
    h.add_argument(
        "--allowed-methods",
        nargs="+",
        default=list(d.allowed_methods),
        help="CORS: allowed methods (only with --allowed-origins)",
    )
    h.add_argument(
        "--allowed-headers",
        nargs="+",
        default=list(d.allowed_headers),
        help="CORS: allowed request headers (only with --allowed-origins)",
    )
    h.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: allow credentials (only with --allowed-origins)",
    )
    h.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="largest request body in bytes (larger: 413); default: max(8 MiB, 32 bytes per token of "
        "--max-model-len)",
    )
    h.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout,
        help="on SIGTERM/SIGINT: new requests get 503 and requests in flight may run this many seconds; the "
        "rest then end with an error event (a second signal ends them at once)",
    )
    h.add_argument("--chat-template", default=None, help="a Jinja file, or the template text itself")
    h.add_argument(
        "--tokenizer-cache-chars",
        type=int,
        default=d.tokenizer_cache_chars,
        help="characters of chat-prompt pieces (a message each) kept tokenized: a conversation sent again with a "
        "new turn tokenizes only its new messages; 0 = off",
    )
    h.add_argument(
        "--default-chat-template-kwargs",
        type=_json_object,
        default=None,
        help="JSON merged under each request's chat_template_kwargs, e.g. '{\"enable_thinking\": false}'",
    )
    h.add_argument(
        "--sampling-defaults",
        choices=["model", "openai"],
        default=d.sampling_defaults,
        help="defaults for temperature/top_p/top_k: the model's generation_config.json, or OpenAI's",
    )
    h.add_argument(
        "--reasoning-field",
        choices=["reasoning_content", "reasoning", "both"],
        default=d.reasoning_field,
        help="name of the reasoning field in responses",
    )
    h.add_argument(
        "--keepalive-interval",
        type=float,
        default=d.keepalive_interval,
        help="OpenAI routes: seconds of silence before an SSE ': keep-alive' comment line (for clients that "
        "time out during long prefills); 0, the default, sends none (some clients, e.g. SGLang's "
        "bench_serving.py, JSON-parse every line)",
    )
    h.add_argument(
        "--ping-interval",
        type=float,
        default=d.ping_interval,
        help="Anthropic route (/v1/messages): seconds of silence before a documented `ping` event; 0 sends "
        "only the one after message_start",
    )

    lg = p.add_argument_group("logging and monitoring")
    lg.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=d.log_level,
                    help="server and engine log level")
    lg.add_argument(
        "--log-requests",
        nargs="?",
        const="params",
        choices=["off", "meta", "params", "full"],
        default=d.log_requests,
        help="one line per request: off, meta (no prompt text), params (+ sampling parameters), "
        "full (+ prompt text); a bare --log-requests means params",
    )
    lg.add_argument("--disable-log-requests", dest="log_requests", action="store_const", const="off",
                    help="same as --log-requests off (vLLM's spelling)")
    lg.add_argument("--log-format", choices=["text", "json"], default=d.log_format,
                    help="request log lines as text or one JSON object each")
    lg.add_argument(
        "--stats-interval",
        type=float,
        default=d.stats_interval,
        help="seconds between periodic stats lines; 0 disables",
    )
    lg.add_argument(
        "--engine-ready-timeout",
        type=float,
        default=d.engine_ready_timeout,
        help="seconds the engine may take to load the model",
    )
    lg.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=d.engine_stall_timeout,
        help="seconds without a heartbeat from the running engine (it sends one at least every second) "
        "before it counts as stalled and is killed; 0 disables",
    )
    lg.add_argument(
        "--engine-restart",
        type=int,
        default=d.engine_restart,
        metavar="N",
        help="restart a dead or stalled engine up to N times; after that the server exits with code 1 (so "
        "systemd or Kubernetes restarts it). Not available under torchrun",
    )
    return p


PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"


def expand_preset(argv: Sequence[str]) -> list[str]:
    """`--preset NAME|PATH` -> the preset's flags (configs/presets/NAME.json, key "args") followed by the rest
    of the command line, so explicit flags win over the preset's."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--preset" or arg.startswith("--preset="):
            if arg == "--preset":
                if i + 1 >= len(argv):
                    raise ConfigError("--preset needs a name or a path")
                value, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
            else:
                value, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
            path = Path(value)
            if not path.is_file():
                path = PRESETS_DIR / f"{value}.json"
            if not path.is_file():
                known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
                raise ConfigError(f"--preset {value!r}: no such file or preset (presets: {known})")
            args = json.loads(path.read_text()).get("args")
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise ConfigError(f"{path}: expected a JSON object with an 'args' list of strings")
            return args + expand_preset(rest)
    return argv


SPECULATIVE_DOTTED = "--speculative-config."


def merge_dotted_speculative_config(argv: Sequence[str]) -> list[str]:
    """vLLM's dotted form, `--speculative-config.KEY VALUE` or `--speculative-config.KEY=VALUE` (Zhipu's vLLM line:
    `--speculative-config.method mtp --speculative-config.num_speculative_tokens 1`) -> one --speculative-config
    JSON at the end, its keys over those of a JSON --speculative-config given too. A value is read as JSON where it
    parses (1, true), else kept as text (mtp)."""
    rest: list[str] = []
    dotted: dict[str, Any] = {}
    args = iter(argv)
    for arg in args:
        if not arg.startswith(SPECULATIVE_DOTTED):
            rest.append(arg)
            continue
        key, eq, value = arg[len(SPECULATIVE_DOTTED) :].partition("=")
        if not eq:
            value = next(args, None)
            if value is None:
                raise ConfigError(f"{arg} needs a value")
        try:
            dotted[key] = json.loads(value)
        except ValueError:
            dotted[key] = value
    if not dotted:
        return rest
    base: dict[str, Any] = {}
    for i, arg in enumerate(rest):  # the last JSON --speculative-config wins, as argparse would have it
        if arg == "--speculative-config" and i + 1 < len(rest):
            base = _json_object_or_error(rest[i + 1])
        elif arg.startswith("--speculative-config="):
            base = _json_object_or_error(arg.split("=", 1)[1])
    return [*rest, "--speculative-config", json.dumps({**base, **dotted})]


def _json_object_or_error(text: str) -> dict[str, Any]:
    try:
        return _json_object(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--speculative-config: {e}") from None


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m server") -> ServerConfig:
    parser = build_parser(prog)
    try:
        argv = merge_dotted_speculative_config(expand_preset(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        parser.error(str(e))
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error("; ".join(foreign_flag_errors(unknown)) or f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(ns)
    errors = unsupported_errors(values)
    model_tag = values.pop("model_tag")
    if model_tag is not None:
        if values["model"] not in (None, model_tag):
            errors.append(f"the model is given twice: {model_tag!r} and --model {values['model']!r}")
        values["model"] = model_tag
    values.pop("preset", None)
    values.pop("enable_auto_tool_choice", None)
    values.pop("trust_remote_code", None)
    values.pop("enable_metrics", None)
    engine: dict[str, Any] = {}
    for opt in engine_options():  # the engine's flags -> ServerConfig.engine, by LLM keyword (non-defaults only)
        if opt.dest in values:
            value = values.pop(opt.dest)
            if value != opt.default:
                engine[opt.name] = value
    tuple_fields = {"served_model_name", "api_key", "allowed_origins", "allowed_methods", "allowed_headers"}
    for key in tuple_fields:
        values[key] = tuple(values[key] or ())
    kw = values.pop("default_chat_template_kwargs") or {}
    values["default_chat_template_kwargs"] = tuple(sorted(kw.items()))
    known = {f.name for f in fields(ServerConfig)}
    config = ServerConfig(engine=engine, **{k: v for k, v in values.items() if k in known})
    if engine.get("tensor_parallel_size", 1) < 1:
        errors.append("--tp-size must be >= 1")
    if config.port < 0 or config.port > 65535:
        errors.append("--port must be in [0, 65535]")
    if config.max_queued_requests is not None and config.max_queued_requests < 0:
        errors.append("--max-queued-requests must be >= 0")
    if config.max_request_bytes is not None and config.max_request_bytes < 1024:
        errors.append("--max-request-bytes must be >= 1024")
    # `not x >= 0` also refuses nan; a negative interval would make asyncio.wait_for time out at once (a busy loop)
    for flag, value in (("--keepalive-interval", config.keepalive_interval), ("--ping-interval", config.ping_interval),
                        ("--stats-interval", config.stats_interval)):
        if not value >= 0:
            errors.append(f"{flag} must be >= 0")
    if not config.engine_ready_timeout > 0:
        errors.append("--engine-ready-timeout must be > 0")
    if not config.shutdown_timeout >= 0:
        errors.append("--shutdown-timeout must be >= 0")
    if config.tokenizer_cache_chars < 0:
        errors.append("--tokenizer-cache-chars must be >= 0")
    # an idle engine's heartbeat comes about every HEARTBEAT_S: a shorter timeout kills a healthy engine
    min_stall = 2 * HEARTBEAT_S
    if not (config.engine_stall_timeout == 0 or config.engine_stall_timeout >= min_stall):
        errors.append(f"--engine-stall-timeout must be 0 (disables) or at least {min_stall:g} s (the engine's "
                      f"heartbeat comes every {HEARTBEAT_S:g} s)")
    if config.engine_restart < 0:
        errors.append("--engine-restart must be >= 0")
    try:
        speculative_config(config)  # before anything starts: a bad --speculative-* value is a usage error
    except ConfigError as e:
        errors.append(str(e))
    if errors:
        parser.exit(2, "".join(f"{parser.prog}: error: {e}\n" for e in errors))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m server` and of the `glint` console script (`glint serve ...`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m server"
    if args and args[0] == "serve":
        args, prog = args[1:], "glint serve"
    elif args and not args[0].startswith("-"):
        print(
            f"glint: unknown command {args[0]!r}; usage: glint serve [MODEL] [flags] (see glint serve --help)",
            file=sys.stderr,
        )
        return 2
    return run_server(parse_args(args, prog=prog))


if __name__ == "__main__":
    sys.exit(main())
