"""Checkpoint tensor names <-> this model's parameters: the expected schema of a GLM-4.7 checkpoint and
where each checkpoint tensor lands (which parameter, which TP slice, which offset inside a fused tensor)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from model.config import ModelConfig
from model.parallel import ExpertPartition, HeadPartition, TPGroup, vocab_partition

SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
_MTP_ONLY = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
_MTP_OPTIONAL_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def _layer_schema(cfg: ModelConfig, layer: int, prefix: str) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    s: dict[str, tuple[int, ...]] = {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{prefix}.self_attn.q_proj.weight": (q, h),
        f"{prefix}.self_attn.k_proj.weight": (kv, h),
        f"{prefix}.self_attn.v_proj.weight": (kv, h),
        f"{prefix}.self_attn.o_proj.weight": (h, q),
    }
    if cfg.attention_bias:
        s.update({f"{prefix}.self_attn.q_proj.bias": (q,), f"{prefix}.self_attn.k_proj.bias": (kv,),
                  f"{prefix}.self_attn.v_proj.bias": (kv,)})
    if cfg.use_qk_norm:
        s.update({f"{prefix}.self_attn.q_norm.weight": (d,), f"{prefix}.self_attn.k_norm.weight": (d,)})

    def mlp(p: str, inter: int) -> None:
        s.update({f"{p}.gate_proj.weight": (inter, h), f"{p}.up_proj.weight": (inter, h),
                  f"{p}.down_proj.weight": (h, inter)})

    if cfg.is_moe_layer(layer):
        s[f"{prefix}.mlp.gate.weight"] = (cfg.n_routed_experts, h)
        s[f"{prefix}.mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            mlp(f"{prefix}.mlp.experts.{e}", cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            mlp(f"{prefix}.mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts)
    else:
        mlp(f"{prefix}.mlp", cfg.intermediate_size)
    return s


def checkpoint_schema(cfg: ModelConfig, include_mtp: bool) -> dict[str, tuple[int, ...]]:
    """Every non-scale tensor a GLM-4.7 checkpoint holds, with its full (unsharded) shape."""
    h, v = cfg.hidden_size, cfg.vocab_size
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (v, h)
    for layer in range(cfg.num_hidden_layers):
        s.update(_layer_schema(cfg, layer, f"model.layers.{layer}"))
    if include_mtp:
        for i in range(cfg.num_nextn_predict_layers):
            layer = cfg.num_hidden_layers + i
            p = f"model.layers.{layer}"
            s.update(_layer_schema(cfg, layer, p))
            s.update({f"{p}.enorm.weight": (h,), f"{p}.hnorm.weight": (h,), f"{p}.eh_proj.weight": (h, 2 * h),
                      f"{p}.shared_head.norm.weight": (h,)})
    return s


def is_mtp_name(cfg: ModelConfig, name: str) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


def is_optional_mtp_copy(cfg: ModelConfig, name: str) -> bool:
    """GLM-4.5 stores copies of embed/head in the MTP layer; 4.6/4.7 do not. They equal the main ones."""
    return is_mtp_name(cfg, name) and name.split(".", 3)[3] in _MTP_OPTIONAL_COPIES


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor goes.

    split: "none" (whole tensor), "rows" (dim 0 slice [start, start+size)), "cols" (dim 1 slice)
    dst_offset: row offset inside the destination (fused qkv / gate_up parts)
    expert: index into a stacked expert tensor, or None
    pad_rows_to: for vocab-parallel tensors, the local (padded) row count of the destination
    """

    param: str
    split: str = "none"
    start: int = 0
    size: int = 0
    dst_offset: int = 0
    expert: int | None = None
    pad_rows_to: int | None = None


def placement(cfg: ModelConfig, name: str, tp: TPGroup, fuse_shared_experts: bool,
              expert_parallel: bool = False) -> Placement:
    """Map a (non-scale) checkpoint tensor name to its destination on this rank (size 0: another rank's expert)."""
    if name == "model.embed_tokens.weight":
        return _vocab("embed_tokens.weight", cfg, tp)
    if name == "lm_head.weight":
        return _vocab("lm_head.weight", cfg, tp)
    if name == "model.norm.weight":
        return Placement("norm.weight")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        raise KeyError(name)
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= cfg.num_hidden_layers:
        if rest in _MTP_ONLY:
            return Placement("mtp." + {"shared_head.norm.weight": "shared_head_norm.weight"}.get(rest, rest))
        prefix = "mtp.layer."
    else:
        prefix = f"layers.{layer}."
    return _in_layer(cfg, layer, rest, prefix, tp, fuse_shared_experts, expert_parallel)


def _vocab(param: str, cfg: ModelConfig, tp: TPGroup) -> Placement:
    start, local = vocab_partition(cfg.vocab_size, tp)
    size = max(0, min(local, cfg.vocab_size - start))
    return Placement(param, "rows", start, size, pad_rows_to=local)


def _in_layer(cfg: ModelConfig, layer: int, rest: str, prefix: str, tp: TPGroup, fuse: bool,
              expert_parallel: bool) -> Placement:
    d = cfg.head_dim
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return Placement(prefix + rest)
    m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if m:
        heads = HeadPartition.build(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
        q_size, kv_size = heads.num_heads * d, heads.num_kv_heads * d
        part, kind = m.groups()
        start, size, off = {
            "q": (heads.q_head_start * d, q_size, 0),
            "k": (heads.kv_head_start * d, kv_size, q_size),
            "v": (heads.kv_head_start * d, kv_size, q_size + kv_size),
        }[part]
        return Placement(f"{prefix}self_attn.qkv_proj.{kind}", "rows", start, size, off)
    if rest == "self_attn.o_proj.weight":
        heads = HeadPartition.build(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
        return Placement(prefix + rest, "cols", heads.q_head_start * d, heads.num_heads * d)
    if rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        return Placement(prefix + rest.removesuffix(".weight"))
    if rest in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
        return Placement(prefix + rest)
    part = ExpertPartition.build(cfg.n_routed_experts, cfg.moe_intermediate_size, tp, expert_parallel)
    m = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest)
    if m:
        e = int(m.group(1))
        if e >= cfg.n_routed_experts:
            raise KeyError(rest)
        local = part.local_expert(e)
        if local is None:  # another rank's expert (expert parallelism): nothing to read here
            return Placement(prefix + "mlp.experts.w13", "rows", 0, 0)
        return _expert(prefix + "mlp.experts.", local, m.group(2), part.width_start, part.width)
    m = re.fullmatch(r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", rest)
    if m:
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        if fuse:  # local expert `count`: a 1/tp slice, or whole under expert parallelism (model.moe)
            local = inter if part.expert_parallel else inter // tp.size
            start = 0 if part.expert_parallel else tp.rank * local
            return _expert(prefix + "mlp.experts.", part.count, m.group(1), start, local)
        return _mlp(prefix + "mlp.shared_experts.", m.group(1), inter, tp)
    m = re.fullmatch(r"mlp\.(gate|up|down)_proj\.weight", rest)
    if m and not cfg.is_moe_layer(layer):
        return _mlp(prefix + "mlp.", m.group(1), cfg.intermediate_size, tp)
    raise KeyError(rest)


def _mlp(prefix: str, part: str, inter: int, tp: TPGroup) -> Placement:
    local = inter // tp.size
    if part == "down":
        return Placement(prefix + "down_proj.weight", "cols", tp.rank * local, local)
    return Placement(prefix + "gate_up_proj.weight", "rows", tp.rank * local, local, 0 if part == "gate" else local)


def _expert(prefix: str, e: int, part: str, start: int, width: int) -> Placement:
    """Local expert e's slice [start, start + width) of the intermediate width."""
    if part == "down":
        return Placement(prefix + "w2", "cols", start, width, expert=e)
    return Placement(prefix + "w13", "rows", start, width, 0 if part == "gate" else width, expert=e)
