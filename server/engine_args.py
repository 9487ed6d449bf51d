"""ServerConfig -> the keywords of engine.EngineConfig.create (the only place this mapping lives): the model
folder, the engine options given on the command line (ServerConfig.engine, by their LLM keyword), and the
SGLang-style --speculative-* flags as one speculative_config."""

from __future__ import annotations

import json
from typing import Any

from engine.config import option_values
from server.config import ServerConfig
from spec import SpeculativeConfig


class ConfigError(ValueError):
    pass


# speculative_config key -> the flag that sets it (errors name the flag)
SPECULATIVE_FLAGS = {
    "num_speculative_tokens": "--speculative-num-draft-tokens",
    "num_mtp_tokens": "--speculative-num-steps",
    "max_tree_depth": "--speculative-suffix-cache-max-depth",
    "max_spec_factor": "--speculative-suffix-max-spec-factor",
    "min_token_prob": "--speculative-suffix-min-token-prob",
}


def speculative_config(config: ServerConfig) -> dict[str, Any] | None:
    """The engine's speculative_config: the SGLang-style flags, then --speculative-config's JSON keys over them
    (vLLM's flag; every SpeculativeConfig key, e.g. the draft budget's), validated (errors name the flag)."""
    flags = speculative_flags(config)
    if config.speculative_config_json is None:
        return flags
    try:
        extra = json.loads(config.speculative_config_json)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--speculative-config is not valid JSON: {e}") from e
    if not isinstance(extra, dict):
        raise ConfigError("--speculative-config must be a JSON object, e.g. '{\"method\": \"suffix\"}'")
    out = {**(flags or {}), **extra}
    try:
        SpeculativeConfig.from_dict(out)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--speculative-config: {e}") from e
    return out


# the --speculative-* flags that tune an algorithm (meaningless without --speculative-algorithm)
SPECULATIVE_TUNING_FIELDS = (
    "speculative_num_steps", "speculative_num_draft_tokens", "speculative_suffix_cache_max_depth",
    "speculative_suffix_max_spec_factor", "speculative_suffix_min_token_prob",
)


def speculative_flags(config: ServerConfig) -> dict[str, Any] | None:
    """The speculative_config the SGLang-style flags give, validated (errors name the flag).
    --speculative-num-draft-tokens counts verify slots per request as SGLang does (drafts + the root token),
    so N slots draft at most N - 1 tokens."""
    algo = config.speculative_algorithm
    if algo is None:
        given = [f"--{name.replace('_', '-')}" for name in SPECULATIVE_TUNING_FIELDS
                 if getattr(config, name) is not None]
        if given:  # SGLang ignores them; here they would be dropped without a word (also next to a JSON config)
            raise ConfigError(f"{', '.join(given)} given without --speculative-algorithm (NEXTN, SUFFIX or "
                              "HYBRID); or put their keys into --speculative-config")
        return None
    if algo.upper() in ("NEXTN", "MTP", "EAGLE"):  # Zhipu's launch lines say EAGLE: SGLang runs it as NEXTN for GLM
        steps = config.speculative_num_steps if config.speculative_num_steps is not None else 3
        slots = config.speculative_num_draft_tokens
        if slots is not None and slots != steps + 1:
            raise ConfigError(
                f"--speculative-num-draft-tokens must be --speculative-num-steps + 1 = {steps + 1} with "
                f"--speculative-eagle-topk 1 (a chain of {steps} MTP tokens plus the root), got {slots}"
            )
        out: dict[str, Any] = {"method": "mtp", "num_speculative_tokens": steps}
        try:
            SpeculativeConfig.from_dict(out)
        except ValueError as e:
            raise ConfigError(str(e).replace("speculative_config['num_speculative_tokens']",
                                             "--speculative-num-steps")) from e
        return out
    if algo.upper() not in ("SUFFIX", "HYBRID"):
        raise ConfigError(f"unknown --speculative-algorithm {algo!r}")
    out = {"method": algo.lower()}
    if config.speculative_num_draft_tokens is not None:
        out["num_speculative_tokens"] = config.speculative_num_draft_tokens - 1
    if algo.upper() == "HYBRID" and config.speculative_num_steps is not None:
        out["num_mtp_tokens"] = config.speculative_num_steps
    for flag, key in (
        ("speculative_suffix_cache_max_depth", "max_tree_depth"),
        ("speculative_suffix_max_spec_factor", "max_spec_factor"),
        ("speculative_suffix_min_token_prob", "min_token_prob"),
    ):
        if getattr(config, flag) is not None:
            out[key] = getattr(config, flag)
    try:
        SpeculativeConfig.from_dict(out)
    except ValueError as e:
        msg = str(e)
        for key, flag in SPECULATIVE_FLAGS.items():
            msg = msg.replace(f"speculative_config['{key}']", flag)
        if config.speculative_num_draft_tokens is not None:
            msg = msg.replace(f"got {out.get('num_speculative_tokens')!r}",
                              f"got {config.speculative_num_draft_tokens} slots = "
                              f"{out.get('num_speculative_tokens')} drafts")
        raise ConfigError(msg) from e
    return out


def engine_kwargs(config: ServerConfig) -> dict[str, Any]:
    """Every keyword of EngineConfig.create: the declared defaults, overridden by the command line's."""
    if config.model is None:
        raise ConfigError("engine_kwargs needs a resolved model path (see server.launch.resolve_model)")
    kwargs = {"model": config.model, **option_values(dict(config.engine))}
    kwargs["speculative_config"] = speculative_config(config)
    return kwargs
