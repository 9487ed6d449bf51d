"""GLM-4.7 attention: fused QKV (+bias) -> per-head QK RMSNorm -> partial NeoX RoPE -> paged GQA -> o_proj."""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels import fa4_prefill, flash_attn_adapter, sdpa_prefill
from model.config import ModelConfig
from model.context import ForwardContext
from model.linear import Linear
from model.parallel import HeadPartition, TPGroup

ATTENTION_BACKENDS = ("triton", "fa3")  # triton: kernels.paged_attention (reference on CPU); fa3: flash_attn
# prefill steps: triton = whatever attention_backend runs; sdpa = torch SDPA (cuDNN) over the gathered K/V of each
# sequence with >= sdpa_prefill.sdpa_from_tokens(heads) new tokens (kernels/sdpa_prefill.py), the other rows stay on
# attention_backend; fa4 = FlashAttention-4 for every row of a step whose longest query has >= fa4_prefill.FROM_TOKENS
# new tokens: a prompt alone over its own fresh K/V, other steps over K/V gathered out of the pages where that paid,
# else over the pages (kernels/fa4_prefill.py; FP8 KV pages that are not gathered take sdpa); auto = fa4 on a Hopper or
# newer GPU where flash-attn-4 imports (fastest on every shape measured, bench/RESULTS.md), else sdpa on CUDA
# (1.4-1.8x faster than our Triton extend kernel at 4K-32K tokens on the H200), triton elsewhere (the CPU
# reference path)
PREFILL_ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "fa4")


def resolve_prefill_attention_backend(name: str, device: torch.device | str) -> str:
    """The prefill backend that runs on `device`: "auto" -> "fa4" where it can run, else "sdpa" on CUDA, else
    "triton"."""
    if name not in PREFILL_ATTENTION_BACKENDS:
        raise ValueError(f"prefill_attention_backend must be one of {PREFILL_ATTENTION_BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    if torch.device(device).type != "cuda":
        return "triton"
    return "fa4" if fa4_prefill.library() is not None and fa4_prefill.device_supported(device) else "sdpa"


def prefill_kernel(backend: str, kv_dtype: torch.dtype, dtype: torch.dtype) -> str:
    """What a resolved prefill backend runs for a KV cache dtype on a step whose K/V it does not gather: FA4 reads
    pages in the model dtype only, FP8 pages go to the SDPA path (its gather dequantizes them)."""
    return "sdpa" if backend == "fa4" and kv_dtype != dtype else backend


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        tp: TPGroup,
        qkv_quant: str,
        o_quant: str,
        dtype: torch.dtype,
        device,
        fused_qk_norm_rope: bool = False,
        attention_backend: str = "triton",
        prefill_attention_backend: str = "auto",
    ) -> None:
        super().__init__()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        self.layer_id = layer_id
        self.tp = tp
        self.fused_qk_norm_rope = fused_qk_norm_rope
        self.attention_backend = attention_backend
        self.prefill_attention_backend = resolve_prefill_attention_backend(prefill_attention_backend, device)
        self.heads = HeadPartition.build(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
        self.sdpa_from_tokens = sdpa_prefill.sdpa_from_tokens(self.heads.num_heads)  # the SDPA path's threshold
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim**-0.5
        self.q_size = self.heads.num_heads * cfg.head_dim
        self.kv_size = self.heads.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, qkv_quant, dtype, device
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, False, o_quant, dtype, device)
        if cfg.use_qk_norm:
            self.q_norm = nn.Parameter(torch.empty(cfg.head_dim, dtype=dtype, device=device), False)
            self.k_norm = nn.Parameter(torch.empty(cfg.head_dim, dtype=dtype, device=device), False)
        else:
            self.q_norm = self.k_norm = None

    def prompt_alone(self, ctx: ForwardContext) -> bool:
        """FA4 over the step's own K/V: one sequence without cached keys (kernels/fa4_prefill.py). takes() first:
        only eager prefill steps read host lengths. The same for every layer of a step."""
        return (self.prefill_attention_backend == "fa4" and fa4_prefill.takes(ctx.max_query_len)
                and fa4_prefill.FRESH_PROMPTS and ctx.one_prompt_alone())

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cos_sin: torch.Tensor,
                x_q: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        t = x.shape[0]
        k_cache, v_cache = ctx.kv_caches[self.layer_id]
        prompt_alone = self.prompt_alone(ctx)
        if self.fused_qk_norm_rope and not prompt_alone:  # projection + norm + RoPE + KV store (one kernel at decode)
            lin = self.qkv_proj
            q = kernels.qkv_norm_rope(
                x, x_q, lin.weight, lin.weight_scale, lin.bias, lin.quant, self.heads.num_heads,
                self.heads.num_kv_heads, self.q_norm, self.k_norm, cos_sin, ctx.positions, self.eps, k_cache, v_cache,
                ctx.slot_mapping, ctx.k_scale, ctx.v_scale,
            )
            return self._attend(q, ctx)
        qkv = self.qkv_proj(x, x_q)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.heads.num_heads, self.head_dim)
        k = k.reshape(t, self.heads.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.heads.num_kv_heads, self.head_dim)
        if prompt_alone:  # norm + RoPE + KV store in one kernel; FA4 attends the k and v it stored (fa4_prefill.py)
            # an FP8 cache: the kernel also writes the values the cache holds, widened, and FA4 attends those
            wide = None if k_cache.dtype == x.dtype else (k.new_empty(k.shape), v.new_empty(v.shape))
            q, k = kernels.qk_norm_rope(q, k, self.q_norm, self.k_norm, cos_sin, ctx.positions, self.eps, v=v,
                                        k_cache=k_cache, v_cache=v_cache, slot_mapping=ctx.slot_mapping,
                                        k_scale=ctx.k_scale, v_scale=ctx.v_scale, kv_out=wide)
            o = ctx.attention(self._prompt_core, q, *(wide or (k, v)))
            return self.o_proj(o.reshape(t, self.q_size))
        q, k = kernels.qk_norm_rope(q, k, self.q_norm, self.k_norm, cos_sin, ctx.positions, self.eps)
        kernels.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, ctx.k_scale, ctx.v_scale)
        return self._attend(q, ctx)

    def _prompt_core(self, ctx: ForwardContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """FA4 over a prompt's own K/V (an FP8 cache: the widened values the cache holds, and its scales)."""
        fp8_cache = ctx.kv_caches[self.layer_id][0].dtype != q.dtype
        scales = (ctx.k_scale, ctx.v_scale) if fp8_cache else ()
        return fa4_prefill.prompt_attention_fa4(q, k, v, self.scale, *scales)

    def _attend(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = q.shape[0]
        absmax = None
        if self.o_proj.quant == "fp8_channel" and ctx.max_query_len == 1 and self.attention_backend == "triton":
            # decode: the attention kernels also give max |o| per head, o_proj's per-token FP8 scale
            absmax = torch.empty(t, self.heads.num_heads, dtype=torch.float32, device=q.device)
            k_cache, v_cache = ctx.kv_caches[self.layer_id]
            o = kernels.paged_attention(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, ctx.query_start_loc,
                                        self.scale, ctx.k_scale, ctx.v_scale, max_query_len=1,
                                        max_seq_len=ctx.max_seq_len, absmax_out=absmax)
        else:
            o = ctx.attention(self._paged_core, q)
        # partial sums under TP: the post-attention norm all-reduces them (DecoderLayer)
        return self.o_proj(o.reshape(t, self.q_size), x_absmax_parts=absmax)

    def _paged_core(self, ctx: ForwardContext, q: torch.Tensor) -> torch.Tensor:
        """Attention of q's rows over the paged cache (their K/V already stored), by the step's backend."""
        k_cache, v_cache = ctx.kv_caches[self.layer_id]
        args = (q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, ctx.query_start_loc, self.scale,
                ctx.k_scale, ctx.v_scale)
        hints = dict(max_query_len=ctx.max_query_len, max_seq_len=ctx.max_seq_len)
        prefill = prefill_kernel(self.prefill_attention_backend, k_cache.dtype, q.dtype)
        fa4_step = self.prefill_attention_backend == "fa4" and fa4_prefill.takes(ctx.max_query_len)
        packed = ctx.packed_kv(k_cache.shape[1], widens=k_cache.dtype != q.dtype) if fa4_step else None
        if packed is not None:
            return fa4_prefill.paged_attention_prefill_fa4(*args, **hints, packed=packed)
        if fa4_step and prefill == "fa4":
            return fa4_prefill.paged_attention_prefill_fa4(*args, **hints)
        if prefill == "sdpa" and ctx.max_query_len >= self.sdpa_from_tokens:
            rest = flash_attn_adapter.paged_attention_fa if self.attention_backend == "fa3" else kernels.paged_attention
            qsl, lens = ctx.host_lengths()
            return sdpa_prefill.paged_attention_prefill_sdpa(*args, rest=rest, query_start_host=qsl, seq_lens_host=lens,
                                                             min_prefill_tokens=self.sdpa_from_tokens)
        if self.attention_backend == "fa3":
            return flash_attn_adapter.paged_attention_fa(*args, **hints)
        return kernels.paged_attention(*args, **hints)
