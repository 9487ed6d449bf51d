"""The fused MoE's last step (kernels/triton_moe.py, above the sizes whose down kernel fuses it): the top-k sum of
the down GEMM's rows (in pair order t * k + j) back in token order."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, pdl_launch, pdl_release, pdl_wait, to_out

REDUCE_BLOCK_H = 1024


@triton.jit
def _topk_sum_kernel(
    y_ptr, w_ptr, ids_ptr, out_ptr, H, stride_ym, stride_wt, stride_ot,
    TOPK: tl.constexpr, BLOCK_H: tl.constexpr, REMOTE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[t] = sum_j w[t, j] * y[t * TOPK + j] in fp32 (rank order of j: deterministic). REMOTE: slots whose id is
    -1 (another rank's expert) have no y row and are left out (a token with none gets 0)."""
    pdl_wait(PDL)  # before any read of an earlier kernel's output or any write
    pdl_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        w = tl.load(w_ptr + t * stride_wt + j)
        row = t * TOPK + j
        mj = m
        if REMOTE:  # a vector compare against a bound that is 0 for another rank's slot
            mj = h < tl.where(tl.load(ids_ptr + row) >= 0, H, 0)
        acc += tl.load(y_ptr + row * stride_ym + h, mask=mj, other=0.0).to(tl.float32) * w
    tl.store(out_ptr + t * stride_ot + h, to_out(acc, out_ptr.dtype.element_ty), mask=m)


def topk_sum(y: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor,
             topk_ids: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H] <- sum_j topk_weights[t, j] * y[t * k + j] (fp32 sum, j in rank order); y [T * k, H] in pair
    order. topk_ids (contiguous [T, k]): given when ids may be -1 (expert parallelism), whose slots are skipped."""
    t, h = out.shape
    if t == 0:
        return out
    tw = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    remote = topk_ids is not None
    _topk_sum_kernel[(t, cdiv(h, REDUCE_BLOCK_H))](
        y, tw, topk_ids if remote else tw, out, h, y.stride(0), tw.stride(0), out.stride(0), TOPK=tw.shape[1],
        BLOCK_H=REDUCE_BLOCK_H, REMOTE=remote, num_warps=4, **pdl_launch(out.device),
    )
    return out


__all__ = ["topk_sum"]
