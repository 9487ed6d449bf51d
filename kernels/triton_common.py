"""Helpers shared by the Triton kernels: the interpreter flag, exact rounding to bf16 / FP8 E4M3, and small
host-side utilities (device name, reusable zeroed workspaces).

Under TRITON_INTERPRET=1 (CPU tests) Triton 3.9's interpreter casts fp32 -> bf16 by truncation and fp32 ->
float8e4nv without carrying a mantissa overflow into the exponent (126.5 becomes 64), and its bf16 `tl.dot`
returns garbage. The kernels therefore call `to_bf16` / `to_fp8` / `dot_operand` below, which on a GPU are
the plain casts and under the interpreter round to nearest-even in integer arithmetic first (then the cast
is exact) or upcast dot operands to fp32. The flag is read when this module is imported: set
TRITON_INTERPRET before importing any kernels.triton_* module.

Programmatic dependent launch (PDL, Hopper): a kernel launched with `pdl_launch(device)`'s arguments may start
while the kernel before it on the stream is still finishing. Such a kernel must call `pdl_wait(PDL)` in every
program before it reads anything an earlier kernel wrote or writes anything (only constant weights may be read
before it), and calls `pdl_release(PDL)` to let the next kernel launch early. `GLINT_PDL=0` turns it off.

Token counts: Triton compiles one variant of a kernel per divisibility-by-16 of each int argument, so a kernel
taking the step's token count compiles again the first time that count's divisibility changes -- inside a
serving step (a 16-request decode batch next to an 8192-token chunk is 8208 tokens; 15 requests, 8207), seconds
of stall. Kernels mark such arguments with `@triton.jit(**token_counts("M", ...))`: no alignment variants for
them (the == 1 variant stays, which batch-1 decode uses). Arguments that vary from step to step but gain nothing
from either specialization (a split count whose > 1 case is a constexpr already) are marked
`@triton.jit(**not_specialized(...))`: one variant for all values. (A block table's row stride stays specialized:
the engine pads its width to a multiple of 16, engine/model_runner.py.)
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EMULATE: tl.constexpr = tl.constexpr(INTERPRET)

try:  # grid dependency control (Triton >= 3.4); without it PDL stays off
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None

FP8_MAX = 448.0
MIN_SCALE = 1e-12


# Triton >= 3.2 can drop only the alignment specialization; an older one drops both (== 1 too)
_NO_ALIGNMENT_KW = ("do_not_specialize_on_alignment" if "do_not_specialize_on_alignment"
                    in inspect.signature(triton.jit).parameters else "do_not_specialize")


def token_counts(*names: str) -> dict[str, list[str]]:
    """triton.jit keyword arguments: do not specialize these int arguments on their alignment (module doc)."""
    return {_NO_ALIGNMENT_KW: list(names)}


def not_specialized(*names: str) -> dict[str, list[str]]:
    """triton.jit keyword arguments: specialize these int arguments on nothing, == 1 included (module doc)."""
    return {"do_not_specialize": list(names)}


@triton.jit
def round_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (as torch's bf16 cast)."""
    if EMULATE:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def round_to(x, DT: tl.constexpr):
    """Round fp32 x to the activation dtype DT (kept in fp32), as each torch op in that dtype does."""
    if DT == tl.bfloat16:
        return round_bf16(x)
    elif DT == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def round_fp8(x):
    """fp32 x, already clamped to [-448, 448] -> fp32 holding the nearest-even E4M3 value."""
    ax = tl.abs(x)
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000
    normal = b.to(tl.float32, bitcast=True)
    t = ax * 512.0  # subnormal E4M3 step is 2^-9
    f = tl.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    f = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    negative = (x.to(tl.uint32, bitcast=True) >> 31) != 0  # the sign bit, so -0.0 stays -0.0 (as torch's cast)
    sub = tl.where(negative, -f, f) / 512.0
    return tl.where(ax < 0.015625, sub, normal)


@triton.jit
def to_fp8(x):
    """fp32 x, already clamped to [-448, 448] -> float8e4nv, round to nearest even."""
    if EMULATE:
        return round_fp8(x).to(tl.float8e4nv)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def to_out(x, dtype: tl.constexpr):
    """Cast fp32 x to the storage dtype `dtype` with round-to-nearest-even (FP8: x must be within +-448)."""
    if dtype == tl.bfloat16:
        if EMULATE:
            return round_bf16(x).to(tl.bfloat16)
        else:
            return x.to(tl.bfloat16)
    elif dtype == tl.float8e4nv:
        return to_fp8(x)
    else:
        return x.to(dtype)


@triton.jit
def dot_operand(x):
    """A bf16/fp16 tile as handed to tl.dot (upcast to fp32 under the interpreter, whose bf16 dot is wrong)."""
    if EMULATE:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the kernels before this one on the stream have finished and their writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel on the stream launch now (it still waits for this one in its pdl_wait)."""
    if PDL:
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    """Whether this Triton can launch with PDL and the device is Hopper or newer."""
    if INTERPRET or gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - no CUDA backend
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (9, 0)


def pdl_launch(device: torch.device) -> dict:
    """Launch arguments of a kernel taking a `PDL` flag: PDL on for CUDA devices of compute capability >= 9.0
    when Triton supports it and GLINT_PDL is not 0 (read at every launch, so a test or benchmark can compare
    both; CUDA graphs keep what was in effect at capture), else off."""
    on = device.type == "cuda" and os.environ.get("GLINT_PDL", "1") != "0" and _pdl_capable(device)
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


def tl_dtype(dtype: torch.dtype):
    return {
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float32: tl.float32,
        torch.float8_e4m3fn: tl.float8e4nv,
    }[dtype]


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """The GPU's SM count (132 on an H100 / H200 SXM; also the answer without CUDA, e.g. sm_90 compile checks)."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The key of the per-GPU kernel tables, e.g. NVIDIA_H100_80GB_HBM3 (or cpu); cached: asked at every launch."""
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_")


_ZEROS: dict[tuple, torch.Tensor] = {}


def fp8_row_outputs(t: int, h: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty outputs of a per-row FP8 quantization fused into a kernel: values [t, h] E4M3, scales [t, 1] fp32."""
    return (torch.empty(t, h, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(t, 1, dtype=torch.float32, device=device))


def zeroed_counters(n: int, device: torch.device) -> torch.Tensor:
    """A cached int32 buffer of at least n zeros. Kernels that use it must leave it zeroed (self-resetting
    tickets), so it can be shared by every launch on the device's stream and captured in CUDA graphs."""
    key = (str(device),)
    buf = _ZEROS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _ZEROS[key] = buf
    return buf


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1) (triton.next_power_of_2's answer, at a tenth of its host time)."""
    return 1 << (max(1, n) - 1).bit_length()
