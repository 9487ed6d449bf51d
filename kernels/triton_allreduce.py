"""One-shot all-reduce over peer-mapped (CUDA IPC / symmetric) buffers, optionally fused with the residual add
and the RMSNorm that follow it (and the norm's per-token FP8 quantization): the tensor-parallel decode
all-reduce in one kernel instead of NCCL's ring plus a norm kernel.

Every rank holds one data buffer and one flag area that all ranks can address (model/one_shot_allreduce.py
allocates them with torch's symmetric memory); `buffers` / `flags` are int64 tensors of every rank's addresses.
Program p of every rank owns rows p, p + G, p + 2G, ... (G programs, the same grid on every rank):

  1. copy its rows of this rank's partial sums into this rank's buffer;
  2. barrier with program p of every rank (flags, channel 0): now every rank's rows of p are in place;
  3. for each row, load it from every rank's buffer and add them in rank order in fp32 (so every rank gets the
     same bits), round to x's dtype (what an all-reduce in that dtype returns), then either store it or add the
     residual and normalize exactly as kernels/triton_norm.py does;
  4. barrier again (channel 1), so that no rank writes the next all-reduce's rows into its buffer while a peer
     still reads them.

The barrier: program p of rank r sets slot [channel, p, r] of every rank's flag area to 1 (release, system
scope), then waits until slots [channel, p, 0..W-1] of its own area are all 1 (acquire) and resets them to 0.
A slot is set again only after its owner reset it: a rank reaches the next channel-c signal only after every
peer signalled the other channel, which each does after consuming this one. A peer that never arrives ends the
wait after MAX_POLLS polls (tens of seconds) instead of hanging the GPU forever; the result is then garbage,
and the dead peer fails the engine's next collective anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.allreduce import MAX_PROGRAMS, ONE_SHOT_WORLD_SIZES, flag_area_ints
from kernels.triton_common import (
    fp8_row_outputs, next_pow2, pdl_launch, pdl_release, pdl_wait, round_bf16, token_counts, to_out,
)
from kernels.triton_norm import add_residual_and_store, normalize_and_store

MAX_POLLS = 1 << 26


@triton.jit
def _signal_and_wait(flag_table, pid, CHANNEL: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                     MAX_PROGRAMS: tl.constexpr, MAX_POLLS: tl.constexpr):
    tl.debug_barrier()  # every thread's writes before the signal
    peers = tl.arange(0, WORLD)
    base = (CHANNEL * MAX_PROGRAMS + pid) * WORLD
    theirs = tl.load(flag_table + peers).to(tl.pointer_type(tl.int32)) + base + RANK
    tl.atomic_xchg(theirs, tl.full([WORLD], 1, tl.int32), sem="release", scope="sys")
    mine = tl.load(flag_table + RANK).to(tl.pointer_type(tl.int32)) + base + peers
    zero = tl.zeros([WORLD], tl.int32)
    seen = tl.atomic_add(mine, zero, sem="acquire", scope="sys")
    polls = 0
    while (tl.min(seen, 0) == 0) & (polls < MAX_POLLS):
        seen = tl.atomic_add(mine, zero, sem="acquire", scope="sys")
        polls += 1
    tl.atomic_xchg(mine, zero, sem="relaxed", scope="sys")
    tl.debug_barrier()  # no thread reads peers' data before the wait ended


@triton.jit(**token_counts("T"))
def _one_shot_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, q_ptr, qs_ptr, buf_table, flag_table,
    T, H, eps, stride_x, stride_r, stride_y, stride_s, stride_q,
    RANK: tl.constexpr, WORLD: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr, X_BF16: tl.constexpr,
    BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr, MAX_POLLS: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    dtype = x_ptr.dtype.element_ty
    # the buffers are whole allocations (256-byte aligned): tell Triton, or it loads peers' rows element by element
    mine = tl.multiple_of(tl.load(buf_table + RANK).to(tl.pointer_type(dtype)), 16)
    for row in range(pid, T, nprog):
        v = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
        tl.store(mine + row * H + offs, v, mask=m)
    _signal_and_wait(flag_table, pid, 0, RANK, WORLD, MAX_PROGRAMS, MAX_POLLS)
    for row in range(pid, T, nprog):
        acc = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(WORLD):  # rank order: the same sum on every rank
            peer = tl.multiple_of(tl.load(buf_table + r).to(tl.pointer_type(dtype)), 16)
            acc += tl.load(peer + row * H + offs, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        if X_BF16:
            x = round_bf16(acc)
        else:
            x = acc.to(dtype).to(tl.float32)
        if NORM:
            x = add_residual_and_store(x, r_ptr, s_ptr, row, offs, m, stride_r, stride_s, X_BF16)
            normalize_and_store(x, row, offs, m, w_ptr, y_ptr, q_ptr, qs_ptr, H, eps, stride_y, stride_q,
                                QUANT, X_BF16, dtype)
        else:
            tl.store(y_ptr + row * stride_y + offs, to_out(x, y_ptr.dtype.element_ty), mask=m)
    _signal_and_wait(flag_table, pid, 1, RANK, WORLD, MAX_PROGRAMS, MAX_POLLS)
    pdl_release(PDL)


def _num_warps(block: int, world: int) -> int:
    """Enough threads that the `world` rows in flight fit in registers (sm_90, 8 x 8192-wide bf16 rows: 255
    registers and 40-72 B of stack spills at 8 warps; at 16, <= 128 and 2 of 18 variants spill 64-96 B)."""
    if block * world >= 32768:
        return 16
    return 1 if block <= 256 else 4 if block <= 2048 else 8


def _check(x: torch.Tensor, buffers: torch.Tensor, flags: torch.Tensor, world: int) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"one-shot all-reduce takes a 2-D row-major tensor, got shape {tuple(x.shape)}")
    if world not in ONE_SHOT_WORLD_SIZES or buffers.numel() != world or flags.numel() != world:
        raise ValueError(f"one-shot all-reduce: world size {world} (2, 4 or 8) and {world} buffer / flag "
                         f"addresses expected, got {buffers.numel()} / {flags.numel()}")


def one_shot_all_reduce(
    x: torch.Tensor, buffers: torch.Tensor, flags: torch.Tensor, rank: int, world: int, *, max_polls: int = MAX_POLLS
) -> torch.Tensor:
    """The sum over ranks of x [T, H] (each rank passes its own), in x's dtype, identical on every rank.
    buffers / flags: int64 [world], every rank's data buffer (>= T * H elements of x's dtype) and zeroed flag
    area (>= flag_area_ints(world) int32), in rank order, addressable from this device. max_polls: how long a
    barrier waits for a peer (tests shorten it)."""
    return _launch(x, buffers, flags, rank, world, None, None, 0.0, False, max_polls)[0]


def one_shot_all_reduce_add_rms_norm(
    x: torch.Tensor, buffers: torch.Tensor, flags: torch.Tensor, rank: int, world: int,
    residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: bool, *, max_polls: int = MAX_POLLS,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(rms_norm(s), s, (y_fp8, y_scale) or None) with s = all_reduce(x) + residual: add_rms_norm (and the
    quantization of kernels.rms_norm_quant) of the reduced x, in one kernel."""
    y, s, q, qs = _launch(x, buffers, flags, rank, world, residual, weight, eps, quant, max_polls)
    return y, s, ((q, qs) if quant else None)


def _launch(x, buffers, flags, rank, world, residual, weight, eps, quant, max_polls):
    _check(x, buffers, flags, world)
    t, h = x.shape
    norm = residual is not None
    out_dtype = torch.result_type(weight, x) if norm else x.dtype
    y = torch.empty(t, h, dtype=out_dtype, device=x.device)
    s = torch.empty(t, h, dtype=x.dtype, device=x.device) if norm else y
    r = residual if norm else x
    if norm and (r.shape != x.shape or r.stride(-1) != 1):
        raise ValueError(f"residual {tuple(r.shape)} must be a row-major tensor of x's shape {tuple(x.shape)}")
    q, qs = fp8_row_outputs(t, h, x.device) if quant else (None, None)
    if t:
        block = next_pow2(h)
        _one_shot_kernel[(min(t, MAX_PROGRAMS),)](
            x, r, weight if norm else x, y, s, q if quant else y, qs if quant else y, buffers, flags,
            t, h, eps, x.stride(0), r.stride(0), y.stride(0), s.stride(0), q.stride(0) if quant else 0,
            RANK=rank, WORLD=world, NORM=norm, QUANT=quant, X_BF16=x.dtype == torch.bfloat16, BLOCK=block,
            MAX_PROGRAMS=MAX_PROGRAMS, MAX_POLLS=max_polls,
            num_warps=_num_warps(block, world), enable_fp_fusion=False,
            **pdl_launch(x.device),
        )
    return y, s, q, qs


__all__ = ["MAX_PROGRAMS", "flag_area_ints", "one_shot_all_reduce", "one_shot_all_reduce_add_rms_norm"]  # re-exported
