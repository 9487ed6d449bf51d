"""The engine's one frozen config tree. `EngineConfig.create(**kwargs)` takes the LLM(...) keyword names
(vLLM-shaped); the server's CLI flags map onto the same keywords."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_cache import kv_cache_dtype as _kv_torch_dtype
from kernels import flash_attn_adapter
from model.attention import ATTENTION_BACKENDS
from model.config import ModelConfig, load_model_config
from spec import SpeculativeConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory (GPU) or a CPU default
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (= model dtype) | "fp8_e4m3"
    mem_fraction_static: float = 0.85


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 4096


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1


DISAGGREGATION_MODES = ("null", "prefill", "decode")


@dataclass(frozen=True)
class DisaggregationConfig:
    """Prefill/decode disaggregation (disagg/): this instance's role and how it hands KV pages over."""

    mode: str = "null"  # "null" (colocated) | "prefill" | "decode"
    transfer_backend: str = "auto"  # "nixl" | "local" (in-tree fallback) | "auto" (nixl where installed)
    async_transfer: bool = False  # send each chunk's pages as soon as the GPU wrote them (a CUDA event)
    bootstrap_host: str = "127.0.0.1"  # prefill side: where its handshake socket listens
    bootstrap_port: int = 8998
    timeout_s: float = 60.0  # per request, both sides: handshake + prefill + transfer must end by then

    @property
    def enabled(self) -> bool:
        return self.mode != "null"


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    device: str
    dtype: str
    load_format: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    overlap_scheduling: bool = False  # plan step N+1 on the CPU while the device runs step N
    enable_shared_experts_fusion: bool = False  # shared expert as expert E of the fused MoE (weight 1.0)
    enable_fused_qk_norm_rope: bool = False  # one kernel: QK RMSNorm + RoPE + KV-cache store
    attention_backend: str = "triton"  # "triton" | "fa3" (flash_attn, see kernels/flash_attn_adapter.py)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = None
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    tokenizer: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @staticmethod
    def create(
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
        kv_block_size: int = 16,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        load_format: str = "auto",
        seed: int = 0,
        speculative_config: dict[str, Any] | None = None,
        enforce_eager: bool = False,
        kv_cache_dtype: str = "auto",
        mem_fraction_static: float | None = None,
        tokenizer: str | None = None,
        overlap_scheduling: bool | None = None,
        enable_shared_experts_fusion: bool = False,
        enable_fused_qk_norm_rope: bool = False,
        attention_backend: str = "triton",
        disaggregation_mode: str = "null",
        disaggregation_transfer_backend: str = "auto",
        disaggregation_async_transfer: bool = False,
        disaggregation_bootstrap_host: str = "127.0.0.1",
        disaggregation_bootstrap_port: int = 8998,
        disaggregation_timeout: float = 60.0,
    ) -> "EngineConfig":
        mcfg = load_model_config(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        limit = mcfg.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        if not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] (the model's max_position_embeddings), got {max_model_len}")
        if kv_block_size < 1 or kv_block_size & (kv_block_size - 1):
            raise ValueError(f"kv_block_size must be a power of two, got {kv_block_size}")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 8192 if device == "cuda" else 2048
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_num_seqs is None:
            max_num_seqs = 256 if device == "cuda" else 64
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if num_kv_blocks is not None and num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {num_kv_blocks}")
        if kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8_e4m3', got {kv_cache_dtype!r}")
        if kv_cache_dtype == "fp8_e4m3" and device != "cuda":
            raise ValueError("kv_cache_dtype 'fp8_e4m3' needs device 'cuda'")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        if attention_backend == "fa3":
            torch_dtype = _DTYPES[dtype]
            kv_dtype = _kv_torch_dtype(kv_cache_dtype, torch_dtype)
            reason = flash_attn_adapter.unsupported_reason(device, torch_dtype, mcfg.head_dim, kv_dtype, kv_block_size)
            if reason:
                raise ValueError(f"attention_backend 'fa3' (--attention-backend fa3) {reason}")
        if disaggregation_mode not in DISAGGREGATION_MODES:
            raise ValueError(f"disaggregation_mode must be one of {DISAGGREGATION_MODES}, got {disaggregation_mode!r}")
        if disaggregation_transfer_backend not in ("auto", "nixl", "local"):
            raise ValueError(f"disaggregation_transfer_backend must be 'auto', 'nixl' or 'local', got "
                             f"{disaggregation_transfer_backend!r}")
        if not disaggregation_timeout > 0:
            raise ValueError(f"disaggregation_timeout must be > 0 seconds, got {disaggregation_timeout}")
        disagg = DisaggregationConfig(
            disaggregation_mode, disaggregation_transfer_backend, disaggregation_async_transfer,
            disaggregation_bootstrap_host, disaggregation_bootstrap_port, disaggregation_timeout,
        )
        spec = None
        if speculative_config is not None:
            spec = SpeculativeConfig.from_dict(speculative_config)
            if spec.uses_mtp and mcfg.num_nextn_predict_layers < 1:
                raise ValueError(
                    f"speculative_config method {spec.method!r} needs the checkpoint's MTP (NextN) layer, but "
                    f"{mcfg.path} has none (config.json num_nextn_predict_layers is 0)"
                )
            if overlap_scheduling:
                raise ValueError(
                    "overlap_scheduling does not work with speculative decoding: the drafter needs each step's "
                    "accepted tokens on the host before it drafts the next (turn one of them off)"
                )
            overlap_scheduling = False
        return EngineConfig(
            model=mcfg,
            device=device,
            dtype=dtype,
            load_format=load_format,
            seed=seed,
            enforce_eager=enforce_eager,
            overlap_scheduling=(device == "cuda") if overlap_scheduling is None else overlap_scheduling,
            enable_shared_experts_fusion=enable_shared_experts_fusion,
            enable_fused_qk_norm_rope=enable_fused_qk_norm_rope,
            attention_backend=attention_backend,
            cache=CacheConfig(
                block_size=kv_block_size,
                num_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching,
                kv_cache_dtype=kv_cache_dtype,
                mem_fraction_static=0.85 if mem_fraction_static is None else mem_fraction_static,
            ),
            scheduler=SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_model_len),
            parallel=ParallelConfig(tensor_parallel_size),
            speculative=spec,
            disaggregation=disagg,
            tokenizer=tokenizer,
        )
