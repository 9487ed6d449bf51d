"""The server's one frozen configuration (every CLI flag maps onto one field, or onto one engine option in
`engine`; see server/cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# --max-request-bytes default: room for a context-filling prompt written in the most verbose legal JSON (every
# character a 6-byte \uXXXX escape, token ids as 7-digit numbers, tool schemas and history around it), and
# never below 8 MiB.
MIN_REQUEST_BYTES = 8 << 20
REQUEST_BYTES_PER_CONTEXT_TOKEN = 32


@dataclass(frozen=True)
class ServerConfig:
    # model and engine
    model: str | None = None  # None: the built-in tiny checkpoint (written on first use)
    served_model_name: tuple[str, ...] = ()
    # The engine options given on the command line, by their LLM(...) keyword (engine/config.py declares each
    # option once, with its flags; server/cli.py builds the flags from there); the rest take their defaults.
    engine: dict[str, Any] = field(default_factory=dict)
    max_queued_requests: int | None = None
    # the SGLang --speculative-* flags (server/engine_args.py turns them into the engine's speculative_config)
    speculative_algorithm: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_suffix_cache_max_depth: int | None = None
    speculative_suffix_max_spec_factor: float | None = None
    speculative_suffix_min_token_prob: float | None = None
    speculative_suffix_max_spec_offset: float | None = None
    speculative_config_json: str | None = None  # vLLM's --speculative-config: a JSON object, over the flags above
    tool_call_parser: str = "glm47"
    reasoning_parser: str = "glm45"
    # HTTP front end
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: tuple[str, ...] = ()
    metrics_public: bool = False  # /metrics without the API key
    allowed_origins: tuple[str, ...] = ()  # no CORS headers at all unless origins are given
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    chat_template: str | None = None  # a file path or the template text itself
    # characters of chat-prompt pieces (one message each) kept tokenized, so a conversation sent again with a new
    # turn tokenizes the new messages only (server/prompt_encoder.py); 0 = tokenize every prompt whole
    tokenizer_cache_chars: int = 32 << 20
    default_chat_template_kwargs: tuple[tuple[str, Any], ...] = ()  # a frozen dict
    sampling_defaults: str = "model"  # "model": generation_config.json; "openai": OpenAI's defaults
    reasoning_field: str = "reasoning_content"  # also "reasoning" or "both"
    # logging and monitoring
    log_level: str = "info"
    log_requests: str = "meta"  # off | meta | params | full
    log_format: str = "text"  # text | json
    stats_interval: float = 5.0  # seconds between periodic stats lines; 0 disables
    keepalive_interval: float = 0.0  # OpenAI routes: seconds of SSE silence before a ": keep-alive" comment; 0 = off
    ping_interval: float = 5.0  # Anthropic route: seconds of silence before a `ping` event; 0 = only the first
    max_request_bytes: int | None = None  # None: max(8 MiB, 32 bytes per context token)
    shutdown_timeout: float = 30.0  # SIGTERM/SIGINT: seconds in-flight requests may still run
    engine_ready_timeout: float = 1800.0
    # supervision of the engine process
    engine_stall_timeout: float = 30.0  # seconds without a heartbeat from a ready engine; 0 disables
    engine_restart: int = 0  # restarts of a dead/stalled engine before the server exits non-zero

    def request_bytes_limit(self, max_model_len: int) -> int:
        """The largest request body accepted (413 above it)."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return max(MIN_REQUEST_BYTES, REQUEST_BYTES_PER_CONTEXT_TOKEN * max(0, max_model_len))

    @property
    def default_chat_template_kwargs_dict(self) -> dict[str, Any]:
        return dict(self.default_chat_template_kwargs)

    def non_default_args(self) -> dict[str, Any]:
        """Fields that differ from their defaults, with API keys redacted (for the start-up log)."""
        out: dict[str, Any] = dict(self.engine)  # only options given on the command line
        for f in fields(self):
            if f.name == "engine":
                continue
            value = getattr(self, f.name)
            if value != f.default:
                if f.name == "api_key":
                    value = ["<redacted>"] * len(value)
                out[f.name] = value
        return out
