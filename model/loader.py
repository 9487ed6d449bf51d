"""Weight loading: a checkpoint folder (index + safetensors shards) or dummy weights, one tensor at a time,
sliced for this TP rank, converted to the storage each layer chose (FP8 kept, dequantized or quantized),
and copied straight into the parameter on the target device. Missing, unknown, mis-shaped or mis-typed
tensors are errors that name the tensor and its file."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from kernels.quant import (
    FP8_DTYPE,
    dequant_fp8_per_channel,
    quant_fp8_weight_per_block,
    quant_fp8_weight_per_channel,
)
from model.config import ModelConfig
from model.linear import BLOCK
from model.parallel import TPGroup
from model.weight_map import (
    SCALE_SUFFIXES,
    Placement,
    checkpoint_schema,
    is_mtp_name,
    is_optional_mtp_copy,
    placement,
)

log = logging.getLogger(__name__)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class WeightLoadError(ValueError):
    """A checkpoint does not match the model: the message names the tensor and the file."""


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def where(self, name: str) -> str: ...
    def read(self, name: str, rows: slice | None, cols: slice | None, device: torch.device) -> torch.Tensor: ...


class SafetensorsSource:
    """Tensors of a HF checkpoint folder, resolved through model.safetensors.index.json (or one file)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise WeightLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        elif (self.root / "model.safetensors").is_file():
            weight_map = None
        else:
            raise WeightLoadError(f"{self.root}: no model.safetensors.index.json or model.safetensors found")
        self._files: dict[str, object] = {}
        if weight_map is None:
            with safe_open(self.root / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        for shard in sorted(set(weight_map.values())):
            if not (self.root / shard).is_file():
                raise WeightLoadError(f"{index}: shard {shard!r} listed in weight_map is missing")
        self.weight_map: dict[str, str] = weight_map
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for shard in sorted(set(weight_map.values())):
            f = self._open(shard)
            present = set(f.keys())
            for name in (n for n, s in weight_map.items() if s == shard):
                if name not in present:
                    raise WeightLoadError(f"{self.root / shard}: tensor {name!r} listed in the index is not in the shard")
                sl = f.get_slice(name)
                self._meta[name] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), name, shard))

    def _open(self, shard: str):
        if shard not in self._files:
            self._files[shard] = safe_open(self.root / shard, framework="pt", device="cpu")
        return self._files[shard]

    def names(self) -> list[str]:
        return sorted(self.weight_map, key=lambda n: (self.weight_map[n], n))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def where(self, name: str) -> str:
        return str(self.root / self.weight_map[name])

    def read(self, name: str, rows: slice | None, cols: slice | None, device: torch.device) -> torch.Tensor:
        sl = self._open(self.weight_map[name]).get_slice(name)
        if cols is not None:
            t = sl[rows or slice(None), cols]
        elif rows is not None:
            t = sl[rows]
        else:
            t = sl[:]
        return t.to(device)


_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
}


def _st_dtype(name: str, tensor: str, shard: str) -> torch.dtype:
    if name not in _ST_DTYPES:
        raise WeightLoadError(f"{shard}: tensor {tensor!r} has unsupported dtype {name}")
    return _ST_DTYPES[name]


def scale_name_of(source_names: set[str], weight_name: str) -> str | None:
    base = weight_name.removesuffix(".weight")
    for suffix in SCALE_SUFFIXES:
        if base + suffix in source_names:
            return base + suffix
    return None


def _param_scale_name(param: str) -> str:
    return param.removesuffix(".weight") + ".weight_scale" if param.endswith(".weight") else param + "_scale"


def _dst_quant(model: nn.Module, param: str) -> str:
    owner = model.get_submodule(param.rsplit(".", 1)[0]) if "." in param else model
    return getattr(owner, "quant", "none")


def validate_checkpoint(cfg: ModelConfig, source: TensorSource, need_mtp: bool) -> None:
    schema = checkpoint_schema(cfg, include_mtp=cfg.num_nextn_predict_layers > 0)
    names = set(source.names())
    unknown = []
    for name in sorted(names):
        if name.endswith(SCALE_SUFFIXES):
            weight = name.rsplit(".", 1)[0] + ".weight"
            if weight not in schema:
                unknown.append(name)
            else:
                _check_scale(cfg, source, name, schema[weight])
        elif name in schema:
            _check_tensor(source, name, schema[name], scale_name_of(names, name) is not None)
        elif not is_optional_mtp_copy(cfg, name):
            unknown.append(name)
    if unknown:
        shown = ", ".join(f"{n!r} ({source.where(n)})" for n in unknown[:8])
        raise WeightLoadError(f"{len(unknown)} unknown tensor name(s) in the checkpoint: {shown}")
    missing = [n for n in schema if n not in names and (need_mtp or not is_mtp_name(cfg, n))]
    if missing:
        raise WeightLoadError(
            f"{len(missing)} tensor(s) missing from the checkpoint at {cfg.path}: {', '.join(missing[:8])}"
        )


def _check_tensor(source: TensorSource, name: str, shape: tuple[int, ...], has_scale: bool) -> None:
    got = source.shape(name)
    if got != shape:
        raise WeightLoadError(f"{source.where(name)}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    dt = source.dtype(name)
    if has_scale and dt != FP8_DTYPE:
        raise WeightLoadError(f"{source.where(name)}: tensor {name!r} has a scale but dtype {dt}, expected float8_e4m3fn")
    if not has_scale and dt not in _FLOAT_DTYPES:
        raise WeightLoadError(
            f"{source.where(name)}: tensor {name!r} has dtype {dt} without a weight_scale (expected bf16/fp16/fp32)"
        )


def _check_scale(cfg: ModelConfig, source: TensorSource, name: str, wshape: tuple[int, ...]) -> None:
    got = source.shape(name)
    if name.endswith(".weight_scale_inv"):
        expect = (-(-wshape[0] // BLOCK), -(-wshape[1] // BLOCK))
        ok = got == expect
    else:
        expect = (wshape[0], 1)
        ok = got in (expect, (wshape[0],))
    if not ok:
        raise WeightLoadError(f"{source.where(name)}: tensor {name!r} has shape {list(got)}, expected {list(expect)}")
    if source.dtype(name) not in _FLOAT_DTYPES:
        raise WeightLoadError(f"{source.where(name)}: scale {name!r} has dtype {source.dtype(name)}, expected float32")


def _read_converted(
    source: TensorSource,
    name: str,
    scale_name: str | None,
    pl: Placement,
    dst_quant: str,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read this rank's slice of `name` and convert it to the destination storage."""
    shape = source.shape(name)
    rows = slice(pl.start, pl.start + pl.size) if pl.split == "rows" else None
    cols = slice(pl.start, pl.start + pl.size) if pl.split == "cols" else None
    w = source.read(name, rows, cols, device)
    if w.dtype != FP8_DTYPE:
        w = w.to(torch.float32 if dst_quant != "none" else dtype)
        if dst_quant == "fp8_channel":
            return quant_fp8_weight_per_channel(w)
        if dst_quant == "fp8_block":
            return quant_fp8_weight_per_block(w, BLOCK)
        return w, None
    assert scale_name is not None
    if scale_name.endswith("_inv"):  # block scales: [ceil(N/128), ceil(K/128)]
        r0, r1 = (rows.start, rows.stop) if rows else (0, shape[0])
        c0, c1 = (cols.start, cols.stop) if cols else (0, shape[1])
        rb, cb = slice(r0 // BLOCK, -(-r1 // BLOCK)), slice(c0 // BLOCK, -(-c1 // BLOCK))
        s = source.read(scale_name, rb, cb, device).float()
        if dst_quant == "fp8_block":
            if r0 % BLOCK or c0 % BLOCK:
                raise AssertionError(f"unaligned block-FP8 slice of {name} kept as FP8")
            return w, s
        ri = (torch.arange(r0, r1, device=device) // BLOCK) - rb.start
        ci = (torch.arange(c0, c1, device=device) // BLOCK) - cb.start
        deq = (w.float() * s[ri][:, ci]).to(dtype)
        return _requant(deq, dst_quant)
    s = source.read(scale_name, rows, None, device).float().reshape(-1, 1)
    if dst_quant == "fp8_channel":
        return w, s
    return _requant(dequant_fp8_per_channel(w, s, dtype), dst_quant)


def _requant(w: torch.Tensor, dst_quant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if dst_quant == "fp8_channel":
        return quant_fp8_weight_per_channel(w)
    if dst_quant == "fp8_block":
        return quant_fp8_weight_per_block(w, BLOCK)
    return w, None


def _write(dst: torch.Tensor, src: torch.Tensor, pl: Placement, rows_per_unit: int = 1) -> None:
    if pl.expert is not None:
        dst = dst[pl.expert]
    off = pl.dst_offset // rows_per_unit
    n = src.shape[0]
    if pl.pad_rows_to is not None:
        dst[n:].zero_()
    if dst.dim() == 1 or pl.dst_offset or pl.pad_rows_to is not None or pl.split == "rows":
        target = dst[off : off + n]
    else:
        target = dst
    if target.shape != src.shape:
        raise WeightLoadError(f"internal: cannot place a {list(src.shape)} slice into {list(target.shape)}")
    target.copy_(src.to(target.dtype))


@torch.no_grad()
def load_weights(
    model: nn.Module,
    cfg: ModelConfig,
    source: TensorSource,
    tp: TPGroup,
    fuse_shared_experts: bool,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    expert_parallel: bool = False,
) -> None:
    need_mtp = getattr(model, "mtp", None) is not None
    validate_checkpoint(cfg, source, need_mtp)
    params = dict(model.named_parameters())
    names = set(source.names())
    todo = [
        n for n in source.names()
        if not n.endswith(SCALE_SUFFIXES) and not is_optional_mtp_copy(cfg, n)
        and (need_mtp or not is_mtp_name(cfg, n))
    ]
    filled: set[tuple[str, int | None, int]] = set()
    for name in tqdm(todo, desc="Loading weights", unit="tensor", disable=not progress, mininterval=1.0):
        pl = placement(cfg, name, tp, fuse_shared_experts, expert_parallel)
        if pl.param not in params:
            raise WeightLoadError(f"{source.where(name)}: tensor {name!r} maps to unknown parameter {pl.param!r}")
        dst = params[pl.param]
        dst_quant = _dst_quant(model, pl.param) if dst.dtype == FP8_DTYPE else "none"
        if pl.split != "none" and pl.size == 0:
            if pl.pad_rows_to is not None:
                dst.zero_()
            continue
        w, s = _read_converted(source, name, scale_name_of(names, name), pl, dst_quant, dst.dtype, device)
        _write(dst, w, pl)
        if s is not None:
            sdst = params[_param_scale_name(pl.param)]
            _write(sdst, s, pl, rows_per_unit=BLOCK if dst_quant == "fp8_block" else 1)
        filled.add((pl.param, pl.expert, pl.dst_offset))
    log.info("loaded %d tensors from %s", len(filled), cfg.path)
