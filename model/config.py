"""Reading a Hugging Face `config.json` of model_type glm4_moe into one frozen ModelConfig.

Accepts the transformers-4 spelling (rope_theta / partial_rotary_factor at top level) and the transformers-5
one (rope_parameters), n_routed_experts / num_local_experts, num_nextn_predict_layers / num_mtp_layers,
eos_token_id as int or list, and the three quantization formats.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("glm4_moe",)


class ConfigError(ValueError):
    """A checkpoint's config is missing, unsupported or inconsistent; the message names file and field."""


@dataclass(frozen=True)
class QuantConfig:
    """method: "none" | "fp8_channel" (compressed-tensors, weight_scale [out,1]) | "fp8_block"
    (quant_method fp8, weight_scale_inv per block). `ignore` lists module-name patterns left unquantized."""

    method: str = "none"
    block_size: tuple[int, int] = (128, 128)
    ignore: tuple[str, ...] = ()

    @property
    def is_fp8(self) -> bool:
        return self.method != "none"


@dataclass(frozen=True)
class ModelConfig:
    path: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    use_qk_norm: bool
    first_k_dense_replace: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    torch_dtype: str
    quant: QuantConfig = field(default_factory=QuantConfig)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers below first_k_dense_replace are dense; the MTP layer (index num_hidden_layers) is MoE."""
        return layer_idx >= self.first_k_dense_replace


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def _pick(cfg: dict[str, Any], file: Path, *names: str, default: Any = ...) -> Any:
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    if default is ...:
        raise ConfigError(f"{file}: missing field {' / '.join(repr(n) for n in names)}")
    return default


def _quant_config(raw: dict[str, Any] | None, file: Path) -> QuantConfig:
    if not raw:
        return QuantConfig()
    method = raw.get("quant_method")
    if method == "compressed-tensors":
        groups = raw.get("config_groups") or {}
        if not groups:
            raise ConfigError(f"{file}: quantization_config.config_groups is empty")
        for name, group in groups.items():
            w = group.get("weights") or {}
            if w.get("type", "float") != "float" or w.get("num_bits") != 8:
                raise ConfigError(f"{file}: quantization_config.config_groups.{name}.weights must be 8-bit float")
            if w.get("strategy") != "channel":
                raise ConfigError(
                    f"{file}: quantization_config.config_groups.{name}.weights.strategy "
                    f"{w.get('strategy')!r} is not supported (only 'channel')"
                )
            act = group.get("input_activations") or {}
            if act and not (act.get("dynamic", False) and act.get("strategy") in ("token", None)):
                raise ConfigError(
                    f"{file}: quantization_config.config_groups.{name}.input_activations must be dynamic per-token"
                )
        return QuantConfig(method="fp8_channel", ignore=tuple(raw.get("ignore") or ()))
    if method == "fp8":
        block = raw.get("weight_block_size")
        if not block or len(block) != 2:
            raise ConfigError(f"{file}: quantization_config.weight_block_size must be [128, 128] for quant_method fp8")
        if tuple(block) != (128, 128):
            raise ConfigError(f"{file}: quantization_config.weight_block_size {block} unsupported (only [128, 128])")
        ignore = tuple(raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ())
        return QuantConfig(method="fp8_block", block_size=(128, 128), ignore=ignore)
    raise ConfigError(f"{file}: quantization_config.quant_method {method!r} is not supported")


def config_from_dict(cfg: dict[str, Any], file: Path, generation_config: dict[str, Any] | None = None) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{file}: model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if rope_theta is None:
        raise ConfigError(f"{file}: missing field 'rope_theta' (top level or inside 'rope_parameters')")
    rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"{file}: rope type {rope_type!r} is not supported (only default RoPE)")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    hidden = int(_pick(cfg, file, "hidden_size"))
    heads = int(_pick(cfg, file, "num_attention_heads"))
    kv_heads = int(_pick(cfg, file, "num_key_value_heads", default=heads))
    head_dim = int(_pick(cfg, file, "head_dim", default=hidden // heads))
    eos = _pick(cfg, file, "eos_token_id", default=None)
    if generation_config and generation_config.get("eos_token_id") is not None:
        eos = generation_config["eos_token_id"]
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    n_experts = int(_pick(cfg, file, "n_routed_experts", "num_local_experts"))
    n_group = int(cfg.get("n_group") or 1)
    out = ModelConfig(
        path=str(file.parent),
        model_type=model_type,
        vocab_size=int(_pick(cfg, file, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_pick(cfg, file, "intermediate_size")),
        moe_intermediate_size=int(_pick(cfg, file, "moe_intermediate_size")),
        num_hidden_layers=int(_pick(cfg, file, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        partial_rotary_factor=float(partial),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(_pick(cfg, file, "max_position_embeddings")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(cfg.get("attention_bias", True)),
        use_qk_norm=bool(cfg.get("use_qk_norm", False)),
        first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0)),
        n_routed_experts=n_experts,
        n_shared_experts=int(cfg.get("n_shared_experts", 1) or 0),
        num_experts_per_tok=int(_pick(cfg, file, "num_experts_per_tok")),
        n_group=n_group,
        topk_group=int(cfg.get("topk_group") or 1),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        num_nextn_predict_layers=int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        pad_token_id=cfg.get("pad_token_id"),
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
        quant=_quant_config(cfg.get("quantization_config"), file),
    )
    _validate(out, file)
    return out


def _validate(c: ModelConfig, file: Path) -> None:
    def bad(field_name: str, why: str) -> None:
        raise ConfigError(f"{file}: field {field_name!r} {why}")

    if c.num_attention_heads % c.num_key_value_heads:
        bad("num_key_value_heads", f"({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})")
    if c.rotary_dim % 2 or not 0 < c.rotary_dim <= c.head_dim:
        bad("partial_rotary_factor", f"gives rotary dim {c.rotary_dim}, must be even and in (0, head_dim={c.head_dim}]")
    if c.n_routed_experts % c.n_group:
        bad("n_group", f"({c.n_group}) must divide n_routed_experts ({c.n_routed_experts})")
    if not 1 <= c.topk_group <= c.n_group:
        bad("topk_group", f"({c.topk_group}) must be in [1, n_group={c.n_group}]")
    if c.num_experts_per_tok > c.n_routed_experts:
        bad("num_experts_per_tok", f"({c.num_experts_per_tok}) exceeds n_routed_experts ({c.n_routed_experts})")
    if c.first_k_dense_replace > c.num_hidden_layers:
        bad("first_k_dense_replace", f"({c.first_k_dense_replace}) exceeds num_hidden_layers ({c.num_hidden_layers})")
    if c.tie_word_embeddings:
        bad("tie_word_embeddings", "true is not supported (GLM-4.x has an untied lm_head)")
    if c.n_shared_experts > 1:
        bad("n_shared_experts", f"({c.n_shared_experts}) > 1 is not supported")


def load_model_config(path: str | Path) -> ModelConfig:
    """Read `path/config.json` (and `generation_config.json` for eos ids when present)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{root}: model directory not found")
    cfg = _read_json(root / "config.json")
    gen_file = root / "generation_config.json"
    gen = _read_json(gen_file) if gen_file.is_file() else None
    return config_from_dict(cfg, root / "config.json", gen)
