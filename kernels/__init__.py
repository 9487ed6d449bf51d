"""Kernels: each op has a torch reference (`*_ref`, used on CPU) and, where written, a Triton kernel used
on CUDA. The functions re-exported here are what the model calls; they pick the implementation from the
tensor's device. No import of any other glint package."""
from kernels.dispatch import (
    add_rms_norm,
    fp8_linear_block,
    fp8_linear_channel,
    fused_moe,
    moe_gate_route,
    moe_local_ids,
    moe_route,
    one_shot_all_reduce,
    one_shot_all_reduce_add_rms_norm,
    paged_attention,
    qk_norm_rope,
    qkv_norm_rope,
    rms_norm,
    rms_norm_gate_route,
    rms_norm_quant,
    silu_mul,
    store_kv,
)
from kernels.rope import rope_cos_sin_cache

__all__ = [
    "add_rms_norm",
    "fp8_linear_block",
    "fp8_linear_channel",
    "fused_moe",
    "moe_gate_route",
    "moe_local_ids",
    "moe_route",
    "one_shot_all_reduce",
    "one_shot_all_reduce_add_rms_norm",
    "paged_attention",
    "qk_norm_rope",
    "qkv_norm_rope",
    "rms_norm",
    "rms_norm_gate_route",
    "rms_norm_quant",
    "rope_cos_sin_cache",
    "silu_mul",
    "store_kv",
]
