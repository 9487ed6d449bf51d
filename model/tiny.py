"""Tiny GLM-4.7-format checkpoint writer: random weights in the exact release layout, for tests and laptops.

    python -m model.tiny --out DIR --format {fp8-channel,fp8-block,bf16} [--seed N] [--num-kv-heads N]
                         [--set KEY=VALUE ...]

writes a Hugging Face folder shaped like zai-org/GLM-4.7(-FP8) (reference/glm47.md sections 1, 3, 4, 5):
`config.json`, `generation_config.json`, `model.safetensors.index.json` + 3 shards (a layer straddles each
shard boundary), `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`. Same arguments and seed
give byte-identical files.

Weights are drawn in fp32, each tensor from its own torch.Generator seeded with sha256(seed, tensor name) (so
changing one dimension leaves unrelated tensors alone), then cast to bf16 or quantized to FP8 E4M3 with the
helpers of kernels/quant.py. The fp8 formats hold the same underlying weights as the bf16 one of the same
seed.

The tokenizer is a byte-level BPE trained on `tiny_assets/corpus.txt` (our reference docs) and committed as
`tiny_assets/tokenizer.json`; `python -m model.tiny --retrain-tokenizer` regenerates it. Its GLM special
tokens follow the regular vocabulary, as in the real tokenizer, and the embedding is padded to a multiple of
64 rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from kernels.quant import quant_fp8_weight_per_block, quant_fp8_weight_per_channel
from model.config import config_from_dict

ASSETS_DIR = Path(__file__).resolve().parent / "tiny_assets"
CORPUS_PATH = ASSETS_DIR / "corpus.txt"
TOKENIZER_PATH = ASSETS_DIR / "tokenizer.json"
CHAT_TEMPLATE_PATH = ASSETS_DIR / "chat_template.jinja"

FORMATS = ("bf16", "fp8-channel", "fp8-block")

# GLM special tokens, after the BPE vocab, in the order of the real tokenizer (151329...; glm47.md 5.1).
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
)  # fmt: skip
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
PAD_TOKEN = "<|endoftext|>"
TOKENIZER_VOCAB_SIZE = 1500  # BPE vocabulary + special tokens
VOCAB_PAD_MULTIPLE = 64

# Tiny dimensions; head_dim != hidden/heads on purpose, like the real model (128 vs 5120/96).
TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 202752,  # GLM-4.7's own context length: agentic prompts fit
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_shared_experts": 1,
    "use_qk_norm": True,
    "attention_bias": True,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
}
# Keys a caller may not override: they are tied to the tokenizer or to the format.
_FIXED_KEYS = frozenset(
    {"vocab_size", "eos_token_id", "pad_token_id", "bos_token_id", "model_type", "architectures",
     "quantization_config", "dtype", "tie_word_embeddings"}
)  # fmt: skip

# Weight scales: non-degenerate logits and non-trivial routing (checked in tests/test_tiny_checkpoint.py).
EMBED_STD = 1.0
LM_HEAD_GAIN = 4.0  # lm_head std = LM_HEAD_GAIN / sqrt(hidden): logits with std of a few units
NORM_JITTER = 0.1  # norm weights = 1 + NORM_JITTER * randn
BIAS_STD = 0.1  # q/k/v biases
ROUTER_BIAS_STD = 0.25  # e_score_correction_bias: changes the chosen experts for a good share of tokens

_CACHE_FORMAT_TAG = "v1"  # part of tiny_model_dir's folder name together with a hash of this writer's sources


# ------------------------------------------------------------------------------------------------ tokenizer


def build_corpus(src_dir: str | Path = "/work/shared/reference", out: str | Path = CORPUS_PATH) -> Path:
    """Concatenate the Markdown files of `src_dir` (sorted by name) into the training corpus."""
    parts = [p.read_text(encoding="utf-8").strip("\n") for p in sorted(Path(src_dir).glob("*.md"))]
    if not parts:
        raise FileNotFoundError(f"{src_dir}: no *.md files to build the tokenizer corpus from")
    out = Path(out)
    out.write_text("\n\n".join(parts) + "\n", encoding="utf-8", newline="\n")
    return out


def train_tokenizer(corpus_path: str | Path = CORPUS_PATH):
    """Train the tiny byte-level BPE (deterministic, well under a second) and add the GLM special tokens."""
    text = Path(corpus_path).read_text(encoding="utf-8")
    return train_bpe_tokenizer(text.splitlines(keepends=True), TOKENIZER_VOCAB_SIZE)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE of `vocab_size` ids in all (the GLM special tokens last, after the learned
    vocabulary), trained on `texts` (deterministic for the same texts)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def retrain_tokenizer(out: str | Path = TOKENIZER_PATH) -> Path:
    """Regenerate the committed tiny_assets/tokenizer.json from the corpus."""
    out = Path(out)
    train_tokenizer().save(str(out), pretty=True)
    return out


def _tokenizer_json() -> bytes:
    return TOKENIZER_PATH.read_bytes()


def special_token_ids(tokenizer_json: bytes | None = None) -> dict[str, int]:
    """Id of every GLM special token in a tokenizer.json (default: the tiny tokenizer)."""
    data = json.loads(_tokenizer_json() if tokenizer_json is None else tokenizer_json)
    ids = {t["content"]: int(t["id"]) for t in data["added_tokens"]}
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    if missing:
        where = TOKENIZER_PATH if tokenizer_json is None else "tokenizer.json"
        raise RuntimeError(f"{where}: special tokens {missing} missing; run --retrain-tokenizer")
    return {t: ids[t] for t in SPECIAL_TOKENS}


def tokenizer_size(tokenizer_json: bytes | None = None) -> int:
    """Number of ids of a tokenizer.json (default: the tiny tokenizer): the largest id + 1."""
    data = json.loads(_tokenizer_json() if tokenizer_json is None else tokenizer_json)
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data["added_tokens"]]
    return max(ids) + 1


def padded_vocab_size(n_tokens: int) -> int:
    """The embedding's row count for a tokenizer of n_tokens ids: rounded up to VOCAB_PAD_MULTIPLE."""
    return -(-n_tokens // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def _tokenizer_size() -> int:
    return tokenizer_size()


def _padded_vocab_size() -> int:
    return padded_vocab_size(_tokenizer_size())


def _tokenizer_config(chat_template: str, max_len: int, ids: dict[str, int] | None = None) -> dict[str, Any]:
    ids = special_token_ids() if ids is None else ids
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
            for t in SPECIAL_TOKENS
        },  # fmt: skip
        "eos_token": "<|endoftext|>",
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>",)],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "model_max_length": max_len,
        "padding_side": "left",
        "chat_template": chat_template,
    }


# ------------------------------------------------------------------------------------------------ config


def tiny_config(fmt: str = "bf16", **config_overrides: Any) -> dict[str, Any]:
    """The config.json dict of the tiny model in format `fmt`, with `config_overrides` applied."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tiny checkpoint format {fmt!r}; choose one of {FORMATS}")
    bad = sorted(set(config_overrides) & _FIXED_KEYS)
    if bad:
        raise ValueError(f"config keys {bad} are fixed by the tiny tokenizer/format and cannot be overridden")
    unknown = sorted(set(config_overrides) - set(TINY_DIMS))
    if unknown:
        raise ValueError(f"unknown tiny config keys {unknown}; known: {sorted(TINY_DIMS)}")
    dims = {**TINY_DIMS, **config_overrides}
    return glm_config(dims, fmt, _padded_vocab_size(), special_token_ids())


def glm_config(dims: dict[str, Any], fmt: str, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """The config.json dict of a GLM-4.7-format model: dimensions `dims` (the keys of TINY_DIMS), format
    `fmt`, embedding rows `vocab_size` and the special token ids `ids` (validated with model.config)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    cfg: dict[str, Any] = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "attention_bias": dims["attention_bias"],
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": dims["hidden_size"],
        "intermediate_size": dims["intermediate_size"],
        "moe_intermediate_size": dims["moe_intermediate_size"],
        "num_hidden_layers": dims["num_hidden_layers"],
        "first_k_dense_replace": dims["first_k_dense_replace"],
        "num_attention_heads": dims["num_attention_heads"],
        "num_key_value_heads": dims["num_key_value_heads"],
        "head_dim": dims["head_dim"],
        "partial_rotary_factor": dims["partial_rotary_factor"],
        "rope_theta": float(dims["rope_theta"]),
        "rope_scaling": None,
        "max_position_embeddings": dims["max_position_embeddings"],
        "n_routed_experts": dims["n_routed_experts"],
        "num_experts_per_tok": dims["num_experts_per_tok"],
        "n_group": dims["n_group"],
        "topk_group": dims["topk_group"],
        "routed_scaling_factor": dims["routed_scaling_factor"],
        "norm_topk_prob": dims["norm_topk_prob"],
        "n_shared_experts": dims["n_shared_experts"],
        "use_qk_norm": dims["use_qk_norm"],
        "rms_norm_eps": dims["rms_norm_eps"],
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": dims["num_nextn_predict_layers"],
        "vocab_size": vocab_size,
        "bos_token_id": None,
        "eos_token_id": [ids[t] for t in EOS_TOKENS],
        "pad_token_id": ids[PAD_TOKEN],
        "use_cache": True,
        "dtype": "bfloat16",
    }
    if fmt != "bf16":
        cfg["quantization_config"] = _quantization_config(fmt, cfg)
    config_from_dict(cfg, Path("<tiny config.json>"))  # validate the overrides with our own reader
    return cfg


def _unquantized_modules(cfg: dict[str, Any]) -> list[str]:
    """Linear modules kept in bf16 in the FP8 formats: lm_head, every router gate, the MTP eh_proj."""
    n_layers, n_mtp = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    out = ["lm_head"]
    out += [f"model.layers.{l}.mlp.gate" for l in range(n_layers + n_mtp) if _is_moe(cfg, l)]
    out += [f"model.layers.{l}.eh_proj" for l in range(n_layers, n_layers + n_mtp)]
    return out


def _quantization_config(fmt: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if fmt == "fp8-channel":  # compressed-tensors, as the official GLM-4.x FP8 release (glm47.md section 3.1)
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                        "dynamic": False,
                    },
                    "input_activations": {
                        "num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                        "dynamic": True,
                    },
                    "output_activations": None,
                }
            },
            "ignore": _unquantized_modules(cfg),
            "kv_cache_scheme": None,
        }  # fmt: skip
    return {  # DeepSeek-style block FP8
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": _unquantized_modules(cfg),
    }


def _is_moe(cfg: dict[str, Any], layer: int) -> bool:
    return layer >= cfg["first_k_dense_replace"] or layer >= cfg["num_hidden_layers"]


# ------------------------------------------------------------------------------------------------ weights


def _layer_specs(cfg: dict[str, Any], l: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of decoder layer `l` (kinds: linear, bias, norm, router,
    router_bias, eh_proj). The MTP layer (l >= num_hidden_layers) adds enorm, hnorm, eh_proj and
    shared_head.norm."""
    H, hd = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    p = f"model.layers.{l}."
    mtp = l >= cfg["num_hidden_layers"]
    specs: list[tuple[str, tuple[int, ...], str]] = []
    if mtp:
        specs += [(p + "enorm.weight", (H,), "norm"), (p + "hnorm.weight", (H,), "norm"),
                  (p + "eh_proj.weight", (H, 2 * H), "eh_proj")]  # fmt: skip
    specs.append((p + "input_layernorm.weight", (H,), "norm"))
    a = p + "self_attn."
    for proj, rows in (("q_proj", nq * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
        specs.append((a + proj + ".weight", (rows, H), "linear"))
        if cfg["attention_bias"]:
            specs.append((a + proj + ".bias", (rows,), "bias"))
    specs.append((a + "o_proj.weight", (H, nq * hd), "linear"))
    if cfg["use_qk_norm"]:
        specs += [(a + "q_norm.weight", (hd,), "norm"), (a + "k_norm.weight", (hd,), "norm")]
    specs.append((p + "post_attention_layernorm.weight", (H,), "norm"))
    m = p + "mlp."
    if not _is_moe(cfg, l):
        inter = cfg["intermediate_size"]
        specs += [(m + "gate_proj.weight", (inter, H), "linear"),
                  (m + "up_proj.weight", (inter, H), "linear"),
                  (m + "down_proj.weight", (H, inter), "linear")]  # fmt: skip
    else:
        E, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        specs += [(m + "gate.weight", (E, H), "router"),
                  (m + "gate.e_score_correction_bias", (E,), "router_bias")]  # fmt: skip
        for e in range(E):
            x = f"{m}experts.{e}."
            specs += [(x + "gate_proj.weight", (I, H), "linear"), (x + "up_proj.weight", (I, H), "linear"),
                      (x + "down_proj.weight", (H, I), "linear")]  # fmt: skip
        if cfg["n_shared_experts"]:
            Is = I * cfg["n_shared_experts"]
            x = m + "shared_experts."
            specs += [(x + "gate_proj.weight", (Is, H), "linear"), (x + "up_proj.weight", (Is, H), "linear"),
                      (x + "down_proj.weight", (H, Is), "linear")]  # fmt: skip
    if mtp:
        specs.append((p + "shared_head.norm.weight", (H,), "norm"))
    return specs


def tensor_specs(cfg: dict[str, Any]) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Tensor specs grouped in checkpoint order: [embed], layer 0, ..., MTP layer(s), [norm, lm_head]."""
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    n = cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]
    groups = [[("model.embed_tokens.weight", (V, H), "embed")]]
    groups += [_layer_specs(cfg, l) for l in range(n)]
    groups.append([("model.norm.weight", (H,), "norm"), ("lm_head.weight", (V, H), "lm_head")])
    return groups


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"glint-tiny:{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _init_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int, real_vocab: int) -> torch.Tensor:
    """fp32 weight of one tensor."""
    r = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    if kind == "embed":
        return r * EMBED_STD
    if kind == "norm":
        return 1.0 + NORM_JITTER * r
    if kind == "bias":
        return BIAS_STD * r
    if kind in ("linear", "router", "eh_proj"):
        return r / math.sqrt(shape[1])
    if kind == "router_bias":
        return ROUTER_BIAS_STD * r
    if kind == "lm_head":
        w = r * (LM_HEAD_GAIN / math.sqrt(shape[1]))
        w[real_vocab:] = 0.0  # padding rows: logit 0, far below the top logits, so never chosen greedily
        return w
    raise AssertionError(kind)


def _to_format(name: str, w: torch.Tensor, kind: str, fmt: str) -> dict[str, torch.Tensor]:
    if kind == "router_bias":
        return {name: w.float().contiguous()}
    if kind != "linear" or fmt == "bf16":
        return {name: w.to(torch.bfloat16).contiguous()}
    if fmt == "fp8-channel":
        q, scale = quant_fp8_weight_per_channel(w)
        return {name: q.contiguous(), name + "_scale": scale.float().contiguous()}
    q, scale_inv = quant_fp8_weight_per_block(w, 128)
    return {name: q.contiguous(), name + "_scale_inv": scale_inv.float().contiguous()}


def format_tensors(
    cfg: dict[str, Any], fmt: str, weight: Callable[[str, tuple[int, ...], str], torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """The checkpoint's tensors in format `fmt`, grouped as tensor_specs() groups them; `weight(name, shape,
    kind)` gives each tensor's float weight (cast to bf16, or quantized to FP8 for the linear kinds)."""
    out = []
    for group in tensor_specs(cfg):
        tensors: dict[str, torch.Tensor] = {}
        for name, shape, kind in group:
            w = weight(name, shape, kind)
            if tuple(w.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(w.shape)}, the config gives {list(shape)}")
            tensors.update(_to_format(name, w, kind, fmt))
        out.append(tensors)
    return out


def build_tensors(cfg: dict[str, Any], fmt: str, seed: int) -> list[dict[str, torch.Tensor]]:
    """The tiny checkpoint's random tensors, grouped as tensor_specs() groups them (cast/quantized per
    `fmt`)."""
    real_vocab = _tokenizer_size()
    return format_tensors(cfg, fmt, lambda n, shape, kind: _init_tensor(n, shape, kind, seed, real_vocab))


def _shards(groups: list[dict[str, torch.Tensor]], cfg: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Split into 2-3 shards whose boundaries fall in the middle of a layer (the first MoE layer when there is
    one before the last, and the last layer), so a loader must go through weight_map."""
    n_layers = cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]
    flat = [item for g in groups for item in g.items()]
    starts, pos = [], 0
    for g in groups:
        starts.append(pos)
        pos += len(g)
    cut_layers = sorted({min(1, n_layers - 1), n_layers - 1})  # group index = layer index + 1

    cuts = []
    for l in cut_layers:
        g = l + 1
        cuts.append(starts[g] + max(1, len(groups[g]) // 2))
    bounds = [0, *sorted(set(cuts)), len(flat)]
    return [dict(flat[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


# ------------------------------------------------------------------------------------------------ writer


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_tiny_checkpoint(
    out_dir: str | Path, fmt: str = "bf16", seed: int = 0, **config_overrides: Any
) -> Path:
    """Write the tiny checkpoint in format `fmt` ("bf16" | "fp8-channel" | "fp8-block") into `out_dir`
    (created if needed; files of the same names are overwritten). Returns the folder path."""
    cfg = tiny_config(fmt, **config_overrides)
    chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    tensors = build_tensors(cfg, fmt, int(seed))
    return write_checkpoint(out_dir, cfg, tensors, _tokenizer_json(), chat_template)


def write_checkpoint(
    out_dir: str | Path,
    cfg: dict[str, Any],
    groups: list[dict[str, torch.Tensor]],
    tokenizer_json: bytes,
    chat_template: str,
) -> Path:
    """Write a GLM-4.7-format folder: config `cfg` (see glm_config), the formatted tensor `groups` (see
    format_tensors) in 2-3 shards with their index, generation config and tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = special_token_ids(tokenizer_json)
    shards = _shards(groups, cfg)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_bytes(_dump_json(index))
    (out / "config.json").write_bytes(_dump_json(cfg))
    eos = [ids[t] for t in EOS_TOKENS]
    gen = {"_from_model_config": False, "eos_token_id": eos, "pad_token_id": ids[PAD_TOKEN]}
    (out / "generation_config.json").write_bytes(_dump_json(gen))
    (out / "tokenizer.json").write_bytes(tokenizer_json)
    tok_cfg = _tokenizer_config(chat_template, cfg["max_position_embeddings"], ids)
    (out / "tokenizer_config.json").write_bytes(_dump_json(tok_cfg))
    (out / "chat_template.jinja").write_bytes(chat_template.encode("utf-8"))
    return out


def _sources_fingerprint() -> str:
    h = hashlib.sha256(_CACHE_FORMAT_TAG.encode())
    for p in (Path(__file__).resolve(), TOKENIZER_PATH, CHAT_TEMPLATE_PATH):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def cache_root() -> Path:
    env = os.environ.get("GLINT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "glint"


def tiny_model_dir(fmt: str = "bf16", seed: int = 0) -> Path:
    """The built-in tiny model folder, `<cache>/tiny-<fmt>-seed<seed>-<fingerprint>` (cache: $GLINT_CACHE_DIR
    or ~/.cache/glint; the fingerprint hashes this writer and its assets, so a changed writer never serves a
    stale folder). Written on first use into a temporary sibling folder and renamed into place, so concurrent
    callers all end up with one complete folder."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tiny checkpoint format {fmt!r}; choose one of {FORMATS}")
    root = cache_root()
    final = root / f"tiny-{fmt}-seed{int(seed)}-{_sources_fingerprint()}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_tiny_checkpoint(tmp, fmt=fmt, seed=seed)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # rename failed, not because another caller won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------ CLI


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.tiny", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--format", default="bf16", choices=FORMATS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-kv-heads", type=int, default=None, help="num_key_value_heads (default 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a config value (JSON value), e.g. --set num_hidden_layers=2; keys: "
                         f"{', '.join(sorted(TINY_DIMS))}")  # fmt: skip
    ap.add_argument("--retrain-tokenizer", action="store_true",
                    help="retrain model/tiny_assets/tokenizer.json from the corpus and exit")
    args = ap.parse_args(argv)
    if args.retrain_tokenizer:
        print(retrain_tokenizer())
        return 0
    if not args.out:
        ap.error("--out is required")
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    if args.num_kv_heads is not None:
        overrides["num_key_value_heads"] = args.num_kv_heads
    try:
        path = write_tiny_checkpoint(args.out, fmt=args.format, seed=args.seed, **overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
