"""Device dispatch: the torch reference on CPU, the Triton kernel on CUDA where one exists.

Every public op keeps the reference's signature so the model never needs to know which one ran (a few take
optional keyword arguments for fusions: `qk_norm_rope(..., v=, k_cache=, v_cache=, slot_mapping=)` also stores
K/V into the paged cache, `fp8_linear_channel(..., x_fp8=, x_scale=)` takes an already quantized input).

Backend choice: `GLINT_KERNELS=auto` (default: Triton for CUDA tensors, reference otherwise), `ref` (always
the reference) or `triton` (always Triton, also on CPU tensors -- only meaningful under TRITON_INTERPRET=1,
for tests), read once at import. `with kernel_backend("ref"):` (optionally with `ops=`, the ops allowed on
Triton) overrides it for the code inside the block only -- a ContextVar, so nothing global changes.
`TRITON_OPS` lists the ops whose Triton kernel passed its GPU tests; an op missing from it always runs the
reference. The Triton modules are imported on first use, so importing this module never decorates a Triton
kernel (TRITON_INTERPRET is read at that moment).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Iterable, Iterator

import torch

from kernels.activation import silu_mul_ref
from kernels.attention import cache_values_ref, paged_attention_ref, store_kv_ref
from kernels.fp8_linear import fp8_linear_block_ref, fp8_linear_channel_ref
from kernels.fused_moe import fused_moe_ref
from kernels.moe_routing import moe_local_ids_ref, moe_route_ref
from kernels.norm import add_rms_norm_ref, rms_norm_ref
from kernels.packed_kv import PackedKV, gather_packed
from kernels.rope import qk_norm_rope_ref

BACKENDS = ("auto", "ref", "triton")

# ops with a Triton kernel that is dispatched to
TRITON_OPS = frozenset({
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "qk_norm_rope",
    "qkv_norm_rope",
    "store_kv",
    "fp8_linear_channel",
    "fp8_linear_block",
    "moe_route",
    "moe_gate_route",
    "rms_norm_gate_route",
    "moe_local_ids",
    "fused_moe",
    "paged_attention",
    "gather_packed_kv",
})


def _env_backend() -> str:
    name = os.environ.get("GLINT_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"GLINT_KERNELS must be one of {BACKENDS}, got {name!r}")
    return name


# (backend, ops allowed on Triton) for the current context; kernel_backend() scopes a change
_SELECTION: contextvars.ContextVar[tuple[str, frozenset[str]]] = contextvars.ContextVar(
    "glint_kernel_backend", default=(_env_backend(), TRITON_OPS)
)


@contextlib.contextmanager
def kernel_backend(name: str, ops: Iterable[str] | None = None) -> Iterator[None]:
    """Use backend `name` (and only `ops` on Triton, default TRITON_OPS) inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    allowed = TRITON_OPS if ops is None else frozenset(ops)
    unknown = allowed - TRITON_OPS
    if unknown:
        raise ValueError(f"no Triton kernel for {sorted(unknown)}")
    token = _SELECTION.set((name, allowed))
    try:
        yield
    finally:
        _SELECTION.reset(token)


def get_backend() -> str:
    return _SELECTION.get()[0]


def _triton(mod: str):
    name = f"kernels.triton_{mod}"
    return sys.modules.get(name) or importlib.import_module(name)  # import_module's own lookup costs ~5 us a call


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _use(op: str, t: torch.Tensor) -> bool:
    backend, ops = _SELECTION.get()
    if op not in ops or backend == "ref":
        return False
    return backend == "triton" or t.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use("rms_norm", x):
        return _triton("norm").rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use("add_rms_norm", x):
        return _triton("norm").add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """(rms_norm(x [+ residual]), x + residual or None, (y_fp8, y_scale) or None): the Triton kernel also
    quantizes its output per token (exactly as quant_fp8_per_token_ref(y)) for a following FP8 linear / MoE;
    the reference returns None there and the consumer quantizes itself (the same numbers)."""
    op = "rms_norm" if residual is None else "add_rms_norm"
    if _use(op, x) and x.dim() == 2 and x.dtype == torch.bfloat16:
        y, summed, q, qs = _triton("norm").rms_norm_fp8(x, weight, eps, residual)
        return y, summed, (q, qs)
    if residual is None:
        return rms_norm_ref(x, weight, eps), None, None
    y, summed = add_rms_norm_ref(x, residual, weight, eps)
    return y, summed, None


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    if _use("silu_mul", x):
        return _triton("activation").silu_mul(x)
    return silu_mul_ref(x)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    *,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With k_cache given, also stores the rotated k and v into the paged caches (as store_kv would); kv_out
    (two contiguous [T, Hk, D] tensors) receives the K and V values as the caches hold them, widened exactly to
    their dtype: attention over them with the scales equals attention over the pages."""
    if _use("qk_norm_rope", q) and (q_norm_weight is None) == (k_norm_weight is None):
        return _triton("rope").qk_norm_rope(
            q, k, q_norm_weight, k_norm_weight, cos_sin, positions, eps,
            v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping, k_scale=k_scale, v_scale=v_scale,
            kv_out=kv_out,
        )
    q, k = qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, cos_sin, positions, eps)
    if k_cache is not None:
        store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if kv_out is not None:
        if k_cache is None:
            raise ValueError("kv_out holds what the caches store: give the caches")
        kv_out[0].copy_(cache_values_ref(k, k_scale, k_cache.dtype).view_as(kv_out[0]))
        kv_out[1].copy_(cache_values_ref(v, v_scale, v_cache.dtype).view_as(kv_out[1]))
    return q, k


def fp8_linear_channel(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    x_fp8: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_absmax_parts: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_absmax_parts: max |x| over slices of each row (e.g. per attention head, from paged_attention's
    absmax_out), a hint that spares the GPU GEMM a pass over x when it quantizes x itself."""
    if _use("fp8_linear_channel", x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        mod = _triton("fp8_gemm")
        if x.is_cuda:
            y = mod.fp8_linear_channel_auto(x2, w_fp8, w_scale, bias, x_fp8, x_scale, x_absmax_parts)
        else:
            y = mod.fp8_linear_channel(x2, w_fp8, w_scale, bias, x_fp8, x_scale)
        return y.view(*lead, w_fp8.shape[0])
    return fp8_linear_channel_ref(x, w_fp8, w_scale, bias)


def qkv_norm_rope(
    x: torch.Tensor,
    x_q: tuple[torch.Tensor, torch.Tensor] | None,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    quant: str,
    num_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The attention prologue: qkv = linear(x) (quant: "none" / "fp8_channel" / "fp8_block"; x_q: x already
    quantized per token), per-head QK RMSNorm + RoPE, K and V stored into the paged caches; returns q
    [T, Hq, D]. On Triton, FP8-channel weights and decode sizes (<= 16 tokens) run as one kernel (the norm /
    RoPE / store as the swap-AB GEMM's epilogue), the rest as linear + qk_norm_rope."""
    t = x.shape[0]
    d = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    if (quant == "fp8_channel" and _use("qkv_norm_rope", x) and _use("fp8_linear_channel", x)
            and _use("qk_norm_rope", x) and x.dim() == 2 and 0 < t <= 16 and x.dtype != torch.float32
            and (q_norm_weight is None) == (k_norm_weight is None)):
        mod = _triton("fp8_gemm_swap")
        xf, xs = x_q if x_q is not None else (x, None)
        q, _ = mod.fp8_qkv_norm_rope(
            xf, xs, weight, weight_scale, bias, x.dtype, num_heads, num_kv_heads, q_norm_weight, k_norm_weight,
            cos_sin, positions, eps, k_cache, v_cache, slot_mapping, k_scale, v_scale,
            config=_triton("fp8_gemm").qkv_swap_config(x.device, weight.shape[0], x.shape[1], t),
        )
        return q
    if quant == "fp8_channel":
        xf, xs = x_q if x_q is not None else (None, None)
        qkv = fp8_linear_channel(x, weight, weight_scale, bias, x_fp8=xf, x_scale=xs)
    elif quant == "fp8_block":
        qkv = fp8_linear_block(x, weight, weight_scale, bias)
    else:
        qkv = torch.nn.functional.linear(x, weight, bias)
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, _ = qk_norm_rope(
        q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d), q_norm_weight, k_norm_weight, cos_sin,
        positions, eps, v=v.reshape(t, num_kv_heads, d), k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
        k_scale=k_scale, v_scale=v_scale,
    )
    return q


def fp8_linear_block(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if _use("fp8_linear_block", x):
        lead = x.shape[:-1]
        y = _triton("fp8_gemm").fp8_linear_block(x.reshape(-1, x.shape[-1]), w_fp8, w_scale_inv, bias)
        return y.view(*lead, w_fp8.shape[0])
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
    if _use("moe_route", router_logits):
        return _triton("moe_routing").moe_route(
            router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
            num_fused_shared_experts,
        )
    return moe_route_ref(
        router_logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
        num_fused_shared_experts,
    )


def moe_local_ids(topk_ids: torch.Tensor, start: int, count: int,
                  shared_owner: tuple[int, int] | None = None) -> torch.Tensor:
    """Expert parallelism: this rank's expert ids, -1 elsewhere (kernels.moe_routing.moe_local_ids_ref)."""
    if _use("moe_local_ids", topk_ids):
        return _triton("moe_routing").moe_local_ids(topk_ids, start, count, shared_owner)
    return moe_local_ids_ref(topk_ids, start, count, shared_owner)


def moe_gate_route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_route of the fp32 router logits x.float() @ gate_weight.T (on Triton: one launch for decode sizes)."""
    if _use("moe_gate_route", x) and _use("moe_route", x):
        return _triton("moe_routing").moe_gate_route(
            x, gate_weight, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
            num_fused_shared_experts,
        )
    logits = torch.nn.functional.linear(x.float(), gate_weight.float())
    return moe_route(logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
                     num_fused_shared_experts)


def rms_norm_gate_route(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    quant: bool,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
    """The post-attention norm and the MoE router: (y, x + residual, (y_fp8, y_scale) or None, weights, ids)
    with y = rms_norm(x + residual) (quantized per token too when `quant`, where a kernel does it) and the
    routing of y (moe_gate_route). On Triton one launch for decode sizes (bf16, <= 4 tokens)."""
    route = (gate_weight, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
             num_fused_shared_experts)
    if (_use("rms_norm_gate_route", x) and _use("add_rms_norm", x) and _use("moe_gate_route", x)
            and _use("moe_route", x) and x.dim() == 2 and x.dtype == residual.dtype == norm_weight.dtype
            == torch.bfloat16):
        mod = _triton("moe_routing")
        if 0 < x.shape[0] <= mod.GATE_ROUTE_MAX_T:
            return mod.rms_norm_gate_route(x, residual, norm_weight, eps, quant, *route)
    if quant:
        y, summed, yq = rms_norm_quant(x, norm_weight, eps, residual)
    else:
        (y, summed), yq = add_rms_norm(x, residual, norm_weight, eps), None
    w, ids = moe_gate_route(y, *route)
    return y, summed, yq, w, ids


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    quant: str = "none",
    *,
    x_fp8: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    remote_ids: bool = False,
) -> torch.Tensor:
    """x_fp8 / x_scale (fp8_channel): x already quantized per token, e.g. by rms_norm_fp8. remote_ids: topk_ids
    may hold -1 (expert parallelism: moe_local_ids), pairs that add nothing here."""
    # fp32 activations stay on the reference on GPU (the Triton dots would run in tf32)
    if _use("fused_moe", x) and (x.dtype != torch.float32 or not x.is_cuda):
        ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
        return _triton("moe").fused_moe(
            x, w13, w2, topk_weights, ids, w13_scale, w2_scale, quant,
            x_fp8=x_fp8 if quant == "fp8_channel" else None, x_scale=x_scale, remote_ids=remote_ids,
        )
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
    if _use("store_kv", k):
        _triton("kv_store").store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def gather_packed_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, packed: PackedKV,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's keys and values out of the paged caches, packed [total, Hk, D] in dtype (kernels/packed_kv.py):
    one Triton launch for both where the pages widen (FP8 caches), index_select (+ the widening) per cache in the
    reference. H100, session 28, 8K keys (96/8, FA4 after the gather): FP8 2.253 -> 2.074 ms; 16-bit pages
    2.163 vs 2.218 ms (index_select moves 16-bit rows well), so those keep the reference."""
    if _use("gather_packed_kv", k_cache) and k_cache.dtype != dtype:
        return _triton("packed_kv").gather_packed_kv(k_cache, v_cache, packed.slots, dtype)
    return gather_packed(k_cache, packed, dtype), gather_packed(v_cache, packed, dtype)


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
    absmax_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """max_query_len / max_seq_len are host-side hints for kernel choice (Triton: decode when max_query_len == 1
    and every sequence has its token, verify when max_query_len <= 16 -- speculative k+1 token chains --,
    extend above; see triton_attention.attention_path). absmax_out (fp32 [T, Hq], optional) receives max |o| per
    token and head (the Triton decode and verify kernels write it as they store o)."""
    d = q.shape[-1]
    if _use("paged_attention", q) and (q.dtype != torch.float32 or not q.is_cuda) and d == 1 << (d.bit_length() - 1):
        return _triton("attention").paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale,
            max_query_len=max_query_len, max_seq_len=max_seq_len, absmax_out=absmax_out,
        )
    out = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale)
    if absmax_out is not None:
        absmax_out.copy_(out.abs().amax(-1))
    return out


def one_shot_all_reduce(
    x: torch.Tensor, buffers: torch.Tensor, flags: torch.Tensor, rank: int, world: int
) -> torch.Tensor:
    """Tensor-parallel all-reduce of x [T, H] over peer-mapped buffers (kernels/triton_allreduce.py; Triton
    only: its torch reference, kernels.allreduce, takes every rank's tensor at once)."""
    return _triton("allreduce").one_shot_all_reduce(x, buffers, flags, rank, world)


def one_shot_all_reduce_add_rms_norm(
    x: torch.Tensor, buffers: torch.Tensor, flags: torch.Tensor, rank: int, world: int,
    residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """one_shot_all_reduce(x) + residual, then RMSNorm (+ per-token FP8), in one kernel: (y, summed, yq)."""
    return _triton("allreduce").one_shot_all_reduce_add_rms_norm(x, buffers, flags, rank, world, residual,
                                                                 weight, eps, quant)
