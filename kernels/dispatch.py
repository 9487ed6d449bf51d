"""Device dispatch: the torch reference on CPU, the Triton kernel on CUDA where one exists.

Every public op keeps the reference's signature so the model never needs to know which one ran.
"""
from __future__ import annotations

import torch

from kernels.activation import silu_mul_ref
from kernels.attention import paged_attention_ref, store_kv_ref
from kernels.fp8_linear import fp8_linear_block_ref, fp8_linear_channel_ref
from kernels.fused_moe import fused_moe_ref
from kernels.moe_routing import moe_route_ref
from kernels.norm import add_rms_norm_ref, rms_norm_ref
from kernels.rope import qk_norm_rope_ref


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm_ref(x, residual, weight, eps)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_mul_ref(x)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, cos_sin, positions, eps)


def fp8_linear_channel(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return fp8_linear_channel_ref(x, w_fp8, w_scale, bias)


def fp8_linear_block(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return fp8_linear_block_ref(x, w_fp8, w_scale_inv, bias)


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return moe_route_ref(
        router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
        num_fused_shared_experts,
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    quant: str = "none",
) -> torch.Tensor:
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, quant)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """max_query_len / max_seq_len are host-side hints for kernel choice (decode when max_query_len == 1)."""
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale)
