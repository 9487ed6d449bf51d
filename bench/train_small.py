"""Train a small GLM-4.7-architecture model (glm4_moe with its MTP layer) on the Python standard library.

    python -m bench.train_small --out DIR [--time-budget S | --steps N] [--device cuda|cpu] [--preset NAME]
                                [--formats bf16,fp8-channel] [--set KEY=VALUE ...]
    python -m bench.train_small --from-bf16 SRC --out DIR --formats fp8-channel    (convert, no training)

Data: the standard library's source of this Python (`sysconfig.get_paths()["stdlib"]`), the modules of
bench/code_corpus.py's held-out split left out, as raw code and as chat episodes (bench/train_data.py: edit,
multi-turn edit and continuation requests with their ideal answers, in the format of the agentic-edit and
plain-code workloads). Tokenizer: a byte-level BPE trained on the training split (model/tiny.py's recipe,
GLM special tokens and chat template). Model: bench/small_model.py; loss = main CE + mtp_weight * MTP CE
(the MTP layer predicts the token after next), AdamW, linear warm-up then cosine decay, bf16 autocast on
CUDA; the routers' correction biases move towards balanced expert load (aux-loss-free balancing).

Output: DIR/<format>/ per format, GLM-4.7 folders (model/tiny.py's writer) that glint and HF transformers
load; every format is made from the bf16-rounded weights, so --from-bf16 reproduces the FP8 folder of a run
from its bf16 folder byte for byte. DIR/train_small.json: arguments, sizes, losses, held-out metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.code_corpus import extra_code_files, stdlib_files
from bench.small_model import SmallGlm, checkpoint_tensors, init_weights, load_checkpoint_tensors, losses
from bench.train_data import encode, make_episodes, pack_episodes, raw_windows, token_stream
from model.config import config_from_dict
from model.loader import SafetensorsSource
from model.tiny import (CHAT_TEMPLATE_PATH, FORMATS, TINY_DIMS, format_tensors, glm_config, padded_vocab_size,
                        special_token_ids, tokenizer_size, train_bpe_tokenizer, write_checkpoint)

PRESETS: dict[str, dict[str, Any]] = {
    # ~28M parameters (56 MB in bf16): trains in about 5 minutes on one H200.
    "small": {
        "hidden_size": 512, "intermediate_size": 1536, "moe_intermediate_size": 128, "num_hidden_layers": 4,
        "first_k_dense_replace": 1, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
        "partial_rotary_factor": 0.5, "rope_theta": 1000000.0, "max_position_embeddings": 16384,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_shared_experts": 1, "use_qk_norm": True,
        "attention_bias": True, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1,
    },
    # model/tiny.py's dimensions: seconds on a CPU (tests).
    "tiny": dict(TINY_DIMS),
}  # fmt: skip
TRAIN_DEFAULTS = {  # per preset: vocab, seq len, batch rows, episode rows
    "small": {"vocab_size": 8192, "seq_len": 2048, "batch_size": 32, "episode_rows": 10000},
    "tiny": {"vocab_size": 512, "seq_len": 128, "batch_size": 4, "episode_rows": 32},
}
BIAS_UPDATE = 1e-3  # correction-bias step per training step (DeepSeek-V3's aux-loss-free balancing)
EVAL_ROWS = 64  # held-out rows of each kind (raw code, episodes) for the final evaluation
VALID_PERCENT = 3  # of the training-split files, kept for choosing the best step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.train_small", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (DIR/<format>/ and DIR/train_small.json)")
    ap.add_argument("--formats", default="bf16,fp8-channel", help=f"comma list of {FORMATS}")
    ap.add_argument("--from-bf16", default=None, metavar="SRC",
                    help="write --formats from a bf16 folder; no training")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model dimension (JSON value)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: fit --time-budget)")
    ap.add_argument("--time-budget", type=float, default=300.0,
                    help="seconds of training when --steps is unset")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="tokenizer ids incl. the 25 GLM special tokens")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="rows per step")
    ap.add_argument("--episode-rows", type=int, default=None, help="rows of packed chat episodes to make")
    ap.add_argument("--episode-frac", type=float, default=0.5,
                    help="share of each batch's rows that are episodes")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the initial weight matrices")
    ap.add_argument("--max-files", type=int, default=None, help="use at most N files of each split (tests)")
    ap.add_argument("--extra-code", action="append", default=[], metavar="DIR",
                    help="more .py files for training only ('purelib': this Python's site-packages)")
    ap.add_argument("--extra-code-mb", type=float, default=80.0,
                    help="at most this many MB of --extra-code text")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    ap.add_argument("--eval-every", type=int, default=250,
                    help="steps between validation losses; the best validated weights are kept (0: last)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for key, value in TRAIN_DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown formats {bad}; choose from {FORMATS}")
    return args


def model_dims(args: argparse.Namespace) -> dict[str, Any]:
    dims = dict(PRESETS[args.preset])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in dims:
            raise SystemExit(f"--set: unknown key {key!r}; known: {sorted(dims)}")
        dims[key] = json.loads(value)
    return dims


def _is_valid(rel: str) -> bool:
    digest = hashlib.sha256(f"glint-valid:{rel}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < VALID_PERCENT


def _spread(files: list, n: int | None) -> list:
    if n is None or len(files) <= n:
        return files
    return [files[i * len(files) // n] for i in range(n)]


def prepare_data(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Tokenizer, training stream and episode rows, held-out evaluation rows."""
    t0 = time.time()
    stdlib_train = _spread(stdlib_files("train"), args.max_files)
    held_files = _spread(stdlib_files("heldout"), args.max_files)
    extra = []
    for root in args.extra_code:
        root = sysconfig.get_paths()["purelib"] if root == "purelib" else root
        extra += extra_code_files(root, int(args.extra_code_mb * 1e6 / len(args.extra_code)), args.seed)
    # validation (best-step selection): a hash share of the training-split files, never trained on
    valid_files = [f for f in stdlib_train + extra if _is_valid(f.rel)] or stdlib_train[:1]
    train_files = [f for f in stdlib_train + extra if not _is_valid(f.rel)] or stdlib_train
    n_ep = int(args.episode_rows * 1.8)  # about 1.8 episodes fill a row
    ep_train = make_episodes(train_files, n_ep, args.seq_len, args.seed, args.workers)
    ep_held = make_episodes(held_files, 2 * EVAL_ROWS, args.seq_len, args.seed + 1, args.workers)
    log(f"data: {len(train_files)} train ({len(extra)} extra) / {len(valid_files)} validation / "
        f"{len(held_files)} held-out files, {len(ep_train)} episodes ({time.time() - t0:.1f}s)")
    tok = train_bpe_tokenizer([f.text for f in stdlib_train], args.vocab_size)
    tok_json = tok.to_str(pretty=True).encode("utf-8")
    sep = tok.token_to_id("<|endoftext|>")
    gen = torch.Generator().manual_seed(args.seed)
    raw = token_stream(encode(tok, [f.text for f in train_files]), sep)
    raw_held = token_stream(encode(tok, [f.text for f in held_files]), sep)
    raw_valid = token_stream(encode(tok, [f.text for f in valid_files]), sep)
    row = args.seq_len + 1
    ep_rows = pack_episodes(encode(tok, ep_train), raw, row, gen)
    held_stride = max(1, (len(raw_held) - row) // EVAL_ROWS)
    held_raw_rows = torch.stack([raw_held[i * held_stride:i * held_stride + row] for i in range(EVAL_ROWS)
                                 if i * held_stride + row <= len(raw_held)])
    held_ep_rows = pack_episodes(encode(tok, ep_held), raw_held, row, gen)[:EVAL_ROWS]
    log(f"tokens: {len(raw)} train code, {ep_rows.numel()} in {len(ep_rows)} episode rows, {len(raw_held)} "
        f"held-out code; vocab {tok.get_vocab_size()} ({time.time() - t0:.1f}s)")
    valid_gen = torch.Generator().manual_seed(1)
    valid_rows = raw_windows(raw_valid, min(EVAL_ROWS, 2 * args.batch_size), row, valid_gen)
    return {"tokenizer_json": tok_json, "raw": raw, "ep_rows": ep_rows, "held_raw": held_raw_rows,
            "held_ep": held_ep_rows, "valid": valid_rows, "n_tokens": tok.get_vocab_size(), "gen": gen,
            "files": {"train": len(train_files), "extra": len(extra), "valid": len(valid_files),
                      "heldout": len(held_files), "train_code_tokens": len(raw)}}


def lr_at(step: int, total: int | None, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if total is None:
        return args.lr
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(model: SmallGlm, rows: torch.Tensor, device: torch.device, batch: int) -> dict[str, float]:
    """Mean main / MTP cross-entropy and top-1 accuracy on rows [N, T+1]; mtp_agree: how often the MTP
    layer's top-1 at p equals the main model's top-1 for the same token (what greedy MTP drafting needs)."""
    model.eval()
    sums = dict.fromkeys(("main_loss", "main_acc", "mtp_loss", "mtp_acc", "mtp_agree"), 0.0)
    n_main = n_mtp = 0
    for i in range(0, len(rows), batch):
        ids = rows[i:i + batch].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits, mtp_logits, _ = model(ids)
        logits, mtp_logits = logits.float(), mtp_logits.float()
        y, y2 = ids[:, 1:], ids[:, 2:]
        v = logits.shape[-1]
        sums["main_loss"] += F.cross_entropy(logits.reshape(-1, v), y.reshape(-1), reduction="sum").item()
        sums["mtp_loss"] += F.cross_entropy(mtp_logits.reshape(-1, v), y2.reshape(-1), reduction="sum").item()
        top, mtp_top = logits.argmax(-1), mtp_logits.argmax(-1)
        sums["main_acc"] += (top == y).sum().item()
        sums["mtp_acc"] += (mtp_top == y2).sum().item()
        sums["mtp_agree"] += (mtp_top == top[:, 1:]).sum().item()
        n_main, n_mtp = n_main + y.numel(), n_mtp + y2.numel()
    model.train()
    return {k: v / (n_main if k.startswith("main") else n_mtp) for k, v in sums.items()}


def _backward(fwd, ids: torch.Tensor, mtp_weight: float, device: torch.device):
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        main, mtp, loads = losses(fwd, ids)
    (main + mtp_weight * mtp).backward()
    return main.detach(), mtp.detach(), loads.detach()


def train(
    args: argparse.Namespace, data: dict[str, Any], cfg_dict: dict[str, Any], log: Callable[[str], None]
) -> tuple[SmallGlm, dict]:
    device = torch.device(args.device)
    cfg = config_from_dict(cfg_dict, Path(args.out) / "config.json")
    torch.manual_seed(args.seed)
    model = SmallGlm(cfg)
    init_weights(model, args.seed, args.init_std)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    fwd = torch.compile(model) if use_compile else model
    moe = model.moe_layers()
    n_ep_rows = round(args.batch_size * args.episode_frac)
    ep_rows, gen = data["ep_rows"], data["gen"]
    order = torch.randperm(len(ep_rows), generator=gen)
    total, step, ep_pos, t_start, history = args.steps, 0, 0, time.time(), []
    t_calib = None
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    while total is None or step < total:
        if ep_pos + n_ep_rows > len(order):
            order, ep_pos = torch.randperm(len(ep_rows), generator=gen), 0
        rows = [ep_rows[order[ep_pos:ep_pos + n_ep_rows]]] if n_ep_rows else []
        ep_pos += n_ep_rows
        rows.append(raw_windows(data["raw"], args.batch_size - n_ep_rows, args.seq_len + 1, gen))
        ids = torch.cat(rows).to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args)
        opt.zero_grad(set_to_none=True)
        try:
            main, mtp, loads = _backward(fwd, ids, args.mtp_weight, device)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not cost the run: go eager
            if fwd is model or step:
                raise
            log(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:300]}); training eagerly")
            fwd = model
            opt.zero_grad(set_to_none=True)
            main, mtp, loads = _backward(fwd, ids, args.mtp_weight, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # aux-loss-free balancing: raise the bias of under-loaded experts
            for layer, load in zip(moe, loads.float()):
                layer.gate.e_score_correction_bias += BIAS_UPDATE * torch.sign(load.mean() - load)
        step += 1
        if step == 10:
            t_calib = time.time()
        if total is None and step == 30:  # fit the schedule into the time budget from steps 10..30
            per_step = (time.time() - t_calib) / 20
            total = max(step + 1, int(step + (args.time_budget - (time.time() - t_start)) / per_step))
            log(f"{per_step * 1000:.0f} ms/step -> {total} steps in {args.time_budget:.0f}s")
        if args.eval_every and (step % args.eval_every == 0 or step == total):
            val = evaluate(model, data["valid"], device, args.batch_size)
            score = val["main_loss"] + args.mtp_weight * val["mtp_loss"]
            if best is None or score < best[0]:
                best = (score, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            log(f"step {step} validation: main {val['main_loss']:.3f} mtp {val['mtp_loss']:.3f}"
                f"{' (best)' if best[1] == step else ''}")
        if step % 50 == 0 or step == 1 or step == total:
            history.append({"step": step, "main": main.item(), "mtp": mtp.item(), "s": time.time() - t_start})
            log(f"step {step}/{total} main {main.item():.3f} mtp {mtp.item():.3f} "
                f"lr {lr_at(step, total, args):.2e} {time.time() - t_start:.0f}s")
    if best is not None:
        model.load_state_dict(best[2])
        log(f"kept the weights of step {best[1]} (best validation loss)")
    model.eval()
    return model, {"steps": step, "kept_step": best[1] if best else step,
                   "train_seconds": time.time() - t_start, "history": history,
                   "tokens_seen": step * args.batch_size * args.seq_len}


def bf16_rounded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as the bf16 checkpoint stores them (the correction biases stay fp32), in fp32."""
    keep = "e_score_correction_bias"
    return {k: v if k.endswith(keep) else v.to(torch.bfloat16).float() for k, v in tensors.items()}


def write_formats(
    out: Path, dims: dict, n_tokens: int, tok_json: bytes, tensors: dict[str, torch.Tensor],
    formats: list[str],
) -> dict[str, int]:
    """Write out/<fmt>/ for each format; returns each folder's size in bytes."""
    ids = special_token_ids(tok_json)
    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    sizes = {}
    for fmt in formats:
        cfg = glm_config(dims, fmt, padded_vocab_size(n_tokens), ids)
        folder = write_checkpoint(out / fmt, cfg, format_tensors(cfg, fmt, lambda n, shape, kind: tensors[n]),
                                  tok_json, template)
        sizes[fmt] = sum(p.stat().st_size for p in folder.iterdir())
    return sizes


def convert(args: argparse.Namespace) -> dict[str, Any]:
    src = Path(args.from_bf16)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise SystemExit(f"{src}: --from-bf16 needs a bf16 folder (this one is quantized)")
    dims = {k: cfg[k] for k in TINY_DIMS}
    tok_json = (src / "tokenizer.json").read_bytes()
    source = SafetensorsSource(src)
    tensors = {n: source.read(n, None, None, torch.device("cpu")).float() for n in source.names()}
    sizes = write_formats(Path(args.out), dims, tokenizer_size(tok_json), tok_json, tensors, args.formats)
    return {"sizes": sizes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[train_small] {msg}", flush=True)

    if args.from_bf16:
        log(json.dumps(convert(args)))
        return 0
    t0 = time.time()
    dims = model_dims(args)
    data = prepare_data(args, log)
    ids = special_token_ids(data["tokenizer_json"])
    cfg_dict = glm_config(dims, "bf16", padded_vocab_size(data["n_tokens"]), ids)
    model, stats = train(args, data, cfg_dict, log)
    n_params = sum(p.numel() for p in model.parameters())
    tensors = bf16_rounded(checkpoint_tensors(model))
    load_checkpoint_tensors(model, tensors)  # evaluate what the checkpoint holds
    held = {"code": evaluate(model, data["held_raw"], torch.device(args.device), args.batch_size),
            "edit_episodes": evaluate(model, data["held_ep"], torch.device(args.device), args.batch_size)}
    sizes = write_formats(out, dims, data["n_tokens"], data["tokenizer_json"], tensors, args.formats)
    report = {"args": {k: v for k, v in vars(args).items()}, "dims": dims, "parameters": n_params,
              "data": data["files"],
              "vocab_tokens": data["n_tokens"], **stats, "heldout": held, "sizes_bytes": sizes,
              "wall_seconds": time.time() - t0}
    (out / "train_small.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"held-out: {json.dumps(held)}")
    log(f"{n_params / 1e6:.1f}M parameters, {stats['steps']} steps, sizes {sizes}, {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
