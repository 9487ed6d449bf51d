"""Model folders with the real GLM-4.7-FP8 config and fewer layers, for dummy-weight runs (load_format="dummy").

    python -m bench.real_shape --layers 15 [--dense-layers 3] [--out-root DIR] [--set KEY=VALUE ...]

prints the folder: `config.json` = configs/glm47-fp8/config.json with num_hidden_layers (and
first_k_dense_replace = min(3, dense_layers, layers), the quantization ignore list renumbered, and any key
given as an override; a shrunken vocab_size moves eos/pad ids inside it) overridden,
plus a synthetic word-level tokenizer over the whole vocabulary (id i <-> "w{i}", GLM special tokens at their real
ids) and the tiny checkpoint's GLM-4.7-style chat template, so the server can serve the dummy model and every
sampled id shows up as text.

`load_preset(name)` returns the launch flags of configs/presets/<name>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = ROOT / "configs" / "glm47-fp8" / "config.json"
PRESETS_DIR = ROOT / "configs" / "presets"
REAL_DENSE_LAYERS = 3


def default_out_root() -> Path:
    base = os.environ.get("GLINT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "glint")
    return Path(base) / "real-shape"


def glm47_fp8_config() -> dict[str, Any]:
    """The full GLM-4.7-FP8 config.json (92 layers)."""
    return json.loads(CONFIG_PATH.read_text())


def _ignore_list(cfg: dict[str, Any], old: list[str]) -> list[str]:
    """lm_head, every MoE layer's router gate and the MTP eh_proj, for this layer count."""
    n, d, mtp = cfg["num_hidden_layers"], cfg["first_k_dense_replace"], cfg.get("num_nextn_predict_layers", 0)
    out = [x for x in old if not x.startswith("model.layers.")]
    out += [f"model.layers.{l}.mlp.gate" for l in range(d, n + mtp)]
    out += [f"model.layers.{l}.eh_proj" for l in range(n, n + mtp)]
    return out


def real_shape_config(
    num_layers: int, dense_layers: int = REAL_DENSE_LAYERS, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The GLM-4.7-FP8 config with `num_layers` layers, min(3, dense_layers) of them dense, and any other
    key overridden (e.g. hidden_size for a CPU smoke run). Validated with the engine's config reader."""
    from model.config import config_from_dict

    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if dense_layers < 0:
        raise ValueError(f"dense_layers must be >= 0, got {dense_layers}")
    cfg = glm47_fp8_config()
    cfg.update(overrides or {})
    cfg["num_hidden_layers"] = int(num_layers)
    cfg["first_k_dense_replace"] = min(REAL_DENSE_LAYERS, int(dense_layers), int(num_layers))
    vocab = int(cfg["vocab_size"])
    if vocab < 151552 and "eos_token_id" not in (
        overrides or {}
    ):  # a shrunken vocabulary: keep ids inside it
        eos = [e for e in cfg["eos_token_id"] if e < vocab] or [vocab - 1]
        cfg["eos_token_id"], cfg["pad_token_id"] = eos, eos[0]
    q = cfg.get("quantization_config")
    if q and q.get("quant_method") == "compressed-tensors":
        q["ignore"] = _ignore_list(cfg, list(q.get("ignore") or []))
    config_from_dict(cfg, Path("<real-shape config.json>"))
    return cfg


def _tokenizer_dir() -> Path:
    from model.tiny import tiny_model_dir

    return tiny_model_dir("bf16")


# GLM-4.x special tokens at their real ids (reference/glm47.md 5.1).
GLM_SPECIAL_TOKENS = {
    151329: "<|endoftext|>", 151330: "[MASK]", 151331: "[gMASK]", 151332: "[sMASK]", 151333: "<sop>",
    151334: "<eop>", 151335: "<|system|>", 151336: "<|user|>", 151337: "<|assistant|>", 151338: "<|observation|>",
    151350: "<think>", 151351: "</think>", 151352: "<tool_call>", 151353: "</tool_call>", 151354: "<tool_response>",
    151355: "</tool_response>", 151356: "<arg_key>", 151357: "</arg_key>", 151358: "<arg_value>",
    151359: "</arg_value>", 151360: "/nothink",
}


def synthetic_tokenizer_files(vocab_size: int, chat_template: str) -> dict[str, bytes]:
    """A word-level tokenizer covering the model's whole vocabulary: id i <-> "w{i}", GLM special tokens at their
    real ids. Every id the dummy model samples decodes to visible text, so serving benchmarks see real deltas."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    for i, text in GLM_SPECIAL_TOKENS.items():
        if i < vocab_size:
            del vocab[f"w{i}"]
            vocab[text] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIAL_TOKENS.values()])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 202752,
        "chat_template": chat_template,
    }
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "chat_template.jinja": chat_template.encode(),
    }


def real_shape_model_dir(
    num_layers: int,
    dense_layers: int = REAL_DENSE_LAYERS,
    out_root: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A model folder (config.json + a synthetic full-vocabulary tokenizer) for `load_format="dummy"` runs at real
    widths.

    The folder name carries a hash of its contents, so differently shaped folders never collide; it is
    written into a temporary sibling and renamed into place (safe for concurrent callers)."""
    cfg = real_shape_config(num_layers, dense_layers, overrides)
    template = (_tokenizer_dir() / "chat_template.jinja").read_text()
    files = {"config.json": (json.dumps(cfg, indent=2) + "\n").encode()}
    files.update(synthetic_tokenizer_files(cfg["vocab_size"], template))
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    root = Path(out_root) if out_root is not None else default_out_root()
    final = (
        root
        / f"glm47-fp8-L{cfg['num_hidden_layers']}-D{cfg['first_k_dense_replace']}-{digest.hexdigest()[:10]}"
    )
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_preset(name: str) -> list[str]:
    """Launch flags of configs/presets/<name>.json (baseline, optimized, baseline-1gpu, optimized-1gpu)."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise FileNotFoundError(f"{path}: no such preset (known: {known})")
    return list(json.loads(path.read_text())["args"])


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings -> dict; values are read as JSON when they parse (numbers, true, null), else text."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.real_shape", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, required=True, help="num_hidden_layers (dense + MoE)")
    ap.add_argument(
        "--dense-layers", type=int, default=REAL_DENSE_LAYERS, help="dense layers first (at most 3)"
    )
    ap.add_argument("--out-root", default=None, help="parent folder (default $GLINT_CACHE_DIR/real-shape)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config.json key")
    args = ap.parse_args(argv)
    print(real_shape_model_dir(args.layers, args.dense_layers, args.out_root, parse_overrides(args.set)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
