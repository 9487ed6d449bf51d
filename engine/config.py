"""The engine's one frozen config tree, and the one declaration of its options.

Every option a user sets is declared with `option(...)` on the field it fills (engine/options.py): its
`LLM(...)` / `EngineConfig.create` keyword (vLLM-shaped), default, help, choices and server flags (SGLang's
names first). `engine_options()` lists them; LLM takes exactly these keywords and server/cli.py builds its flags
from them."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch

from engine.kv_cache import kv_cache_dtype as _kv_torch_dtype
from engine.options import REQUIRED, EngineOption, option, option_of
from kernels import fa4_prefill, flash_attn_adapter
from kernels.allreduce import ONE_SHOT_WORLD_SIZES
from model.attention import ATTENTION_BACKENDS, PREFILL_ATTENTION_BACKENDS
from model.config import ModelConfig, load_model_config
from spec import SpeculativeConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISAGGREGATION_MODES = ("null", "prefill", "decode")
TRANSFER_BACKENDS = ("auto", "nixl", "local")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = option(
        "kv_block_size", 16, "tokens per KV page (a power of two)",
        flags=("--page-size", "--kv-block-size", "--block-size"), type=int)
    num_blocks: int | None = option(
        "num_kv_blocks", None, "KV pages in the pool (default: sized from GPU memory, or a CPU default)",
        flags=("--num-kv-blocks",), type=int)
    enable_prefix_caching: bool = option(
        "enable_prefix_caching", True, "reuse the KV pages of earlier requests' shared prompt prefixes",
        flags=("--enable-prefix-caching",), type=bool, off_flags=("--disable-radix-cache",))
    kv_cache_dtype: str = option(
        "kv_cache_dtype", "auto", "KV cache element type: auto (the model dtype) or fp8_e4m3 (CUDA only)",
        flags=("--kv-cache-dtype",), choices=("auto", "fp8_e4m3"))
    mem_fraction_static: float = option(
        "mem_fraction_static", 0.85, "fraction of GPU memory for weights + KV cache",
        flags=("--mem-fraction-static", "--gpu-memory-utilization"), type=float)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = option(
        "max_num_batched_tokens", None, "token budget per engine step (default: 8192 on CUDA, 2048 on CPU)",
        flags=("--chunked-prefill-size", "--max-num-batched-tokens"), type=int, field_default=8192)
    max_num_seqs: int = option(
        "max_num_seqs", None, "most requests running at once (default: 256 on CUDA, 64 on CPU)",
        flags=("--max-running-requests", "--max-num-seqs"), type=int, field_default=256)
    max_model_len: int = option(
        "max_model_len", None, "context length in tokens (default: the model's max_position_embeddings)",
        flags=("--max-model-len", "--context-length"), type=int, field_default=4096)
    max_prefill_tokens_while_decoding: int | None = option(
        "max_prefill_tokens_while_decoding", None, "most prompt tokens a step computes while it also runs "
        "decodes: smaller prefill chunks next to decodes bound their inter-token latency (default: no cap "
        "beyond the step budget)", flags=("--max-prefill-tokens-while-decoding",), type=int)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = option(
        "tensor_parallel_size", 1, "GPUs (processes) the model is sharded over; without torchrun the engine "
        "spawns the extra ranks itself", flags=("--tp-size", "--tp", "--tensor-parallel-size", "-tp"), type=int)
    base_gpu_id: int | None = option(
        "base_gpu_id", None, "CUDA device of TP rank 0 (rank r uses base + r): several instances on one host "
        "without hiding GPUs from each other (CUDA_VISIBLE_DEVICES would keep their processes from mapping a peer "
        "GPU's memory, which KV transfer between instances uses); default: the current device (TP 1) or the "
        "rank's local index", flags=("--base-gpu-id",), type=int)
    allreduce_fusion: bool = option(
        "allreduce_fusion", False, "tensor-parallel CUDA ranks all-reduce messages of up to 512 KiB (decode steps) "
        "with a one-shot kernel over peer-mapped buffers, fused with the residual add and RMSNorm after it, instead "
        "of NCCL (TP 2, 4 or 8; CPU ranks keep gloo). The seed's --enable-flashinfer-allreduce-fusion turns it on "
        "too (glint's own kernel, not FlashInfer's)",
        flags=("--enable-allreduce-fusion", "--enable-flashinfer-allreduce-fusion"), type=bool)
    enable_expert_parallel: bool = option(
        "enable_expert_parallel", False, "MoE layers split their routed experts across the tensor-parallel ranks "
        "(1/tp of the experts each, at full width) instead of slicing every expert's width; attention stays "
        "tensor parallel, the shared expert too (with --enable-shared-experts-fusion it is kept whole on every "
        "rank, each computing it for 1/tp of the tokens). Faster prefill at TP4/TP8 (full-width expert GEMMs, 1/tp "
        "of the down GEMM's rows per rank); small decode batches wait on the rank that drew the most experts",
        flags=("--enable-expert-parallel", "--enable-ep-moe"), type=bool)


@dataclass(frozen=True)
class DisaggregationConfig:
    """Prefill/decode disaggregation (disagg/): this instance's role and how it hands KV pages over."""

    mode: str = option(
        "disaggregation_mode", "null", "prefill/decode disaggregation: this instance's role (null: colocated); "
        "a prefill or decode instance serves the requests `python -m disagg.router` forwards",
        flags=("--disaggregation-mode",), choices=DISAGGREGATION_MODES)
    transfer_backend: str = option(
        "disaggregation_transfer_backend", "auto", "how KV pages move between instances: nixl, local (the "
        "in-tree fallback) or auto (nixl where installed)",
        flags=("--disaggregation-transfer-backend",), choices=TRANSFER_BACKENDS)
    async_transfer: bool = option(
        "disaggregation_async_transfer", False, "send each prefill chunk's KV pages as soon as the GPU wrote "
        "them (a CUDA event)", flags=("--disaggregation-async-transfer",), type=bool)
    async_last_chunk_sync: bool = option(
        "disaggregation_async_last_chunk_sync", None, "with async transfer: post a request's last chunk the way "
        "sync transfer does (after its step, which then does not overlap the next), so that on a GPU the prefill "
        "instance shares its copy is not queued behind the next chunk's kernels (default: on with async transfer)",
        flags=("--disaggregation-async-last-chunk-sync",), type=bool,
        off_flags=("--disable-disaggregation-async-last-chunk-sync",), field_default=False)
    bootstrap_host: str = option(
        "disaggregation_bootstrap_host", "127.0.0.1", "prefill instance: where its KV handshake socket listens",
        flags=("--disaggregation-bootstrap-host",), type=str)
    bootstrap_port: int = option(
        "disaggregation_bootstrap_port", 8998, "prefill instance: the port of its KV handshake socket",
        flags=("--disaggregation-bootstrap-port",), type=int)
    timeout_s: float = option(
        "disaggregation_timeout", 60.0, "seconds per request, both sides: handshake + prefill + KV transfer "
        "must end by then", flags=("--disaggregation-timeout",), type=float)

    @property
    def enabled(self) -> bool:
        return self.mode != "null"


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    device: str = option(
        "device", "auto", "where the model runs (auto: cuda when available)",
        flags=("--device",), choices=("auto", "cuda", "cpu"), field_default=REQUIRED)
    dtype: str = option(
        "dtype", "auto", "weights and activations (auto: bfloat16 on CUDA, float32 on CPU)",
        flags=("--dtype",), choices=("auto", *_DTYPES), field_default=REQUIRED)
    load_format: str = option(
        "load_format", "auto", "weights: from the checkpoint (auto, safetensors) or random (dummy, for timing)",
        flags=("--load-format",), choices=("auto", "safetensors", "dummy"))
    seed: int = option("seed", 0, "sampling seed of the engine", flags=("--seed", "--random-seed"), type=int)
    enforce_eager: bool = option(
        "enforce_eager", False, "no CUDA graphs (every step runs eagerly)",
        flags=("--enforce-eager", "--disable-cuda-graph"), type=bool)
    piecewise_cuda_graph_max_tokens: int = option(
        "piecewise_cuda_graph_max_tokens", 4096, "prefill and mixed steps of up to this many tokens (capped at the "
        "step budget; CUDA without --enforce-eager) replay CUDA graphs captured in pieces around each layer's "
        "attention core, which runs eagerly between them (engine/prefill_graphs.py): the host's ~20 launches a "
        "layer go, and the step shapes are the captured buckets (no compile stalls); the graphs' activations are "
        "reserved before the KV cache is sized; 0 = off", flags=("--piecewise-cuda-graph-max-tokens",), type=int)
    gc_freeze: bool = option(
        "gc_freeze", True, "after start-up, move every live object to the garbage collector's permanent "
        "generation (gc.freeze): collections of the oldest generation no longer walk the loaded engine, a "
        "~0.1 s stall each", off_flags=("--disable-gc-freeze",))
    kernel_warmup: bool = option(
        "kernel_warmup", True, "compile the Triton kernels' launch variants for every step shape at start-up "
        "(CUDA), so that no serving step stalls on a compile", off_flags=("--disable-kernel-warmup",))
    overlap_scheduling: bool = option(  # plan step N+1 on the CPU while the device runs step N
        "overlap_scheduling", None, "plan the next step on the CPU while the device runs this one (default: on "
        "with CUDA, off on CPU; with speculation only steps without drafts overlap, and with MTP only those of "
        "requests retired from MTP drafting)",
        off_flags=("--disable-overlap-schedule",), field_default=False)
    enable_shared_experts_fusion: bool = option(
        "enable_shared_experts_fusion", False, "run the shared expert as expert E of the fused MoE (weight 1.0)",
        flags=("--enable-shared-experts-fusion",), type=bool)
    enable_fused_qk_norm_rope: bool = option(
        "enable_fused_qk_norm_rope", False, "one kernel for QK RMSNorm + RoPE + KV-cache store",
        flags=("--enable-fused-qk-norm-rope",), type=bool)
    attention_backend: str = option(
        "attention_backend", "triton", "paged attention: the engine's Triton kernels or flash_attn (fa3: "
        "FlashAttention-3 `flash_attn_interface`, else FlashAttention-2 `flash_attn`; CUDA, bf16/fp16 KV only)",
        flags=("--attention-backend",), choices=ATTENTION_BACKENDS)
    prefill_attention_backend: str = option(
        "prefill_attention_backend", "auto", "attention of prefill steps: triton = the --attention-backend kernels "
        "like every other row; sdpa = torch scaled_dot_product_attention (cuDNN on Hopper) for each sequence with "
        ">= 3584-8192 new tokens (by heads per rank) over its K/V gathered from the paged cache (FP8 KV "
        "dequantized; the gather's workspace at max_model_len is reserved before the KV cache is sized), other "
        "rows on --attention-backend; fa4 = FlashAttention-4 (pip flash-attn-4, Hopper or newer) over the paged "
        "cache for every row of a step whose longest query has >= 2048 new tokens (FP8 KV: sdpa); auto = fa4 "
        "where it can run, else sdpa on CUDA, triton elsewhere",
        flags=("--prefill-attention-backend",), choices=PREFILL_ATTENTION_BACKENDS)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = option(
        "speculative_config", None, "speculative decoding, a dict: {'method': 'suffix' | 'mtp' | 'hybrid', "
        "'num_speculative_tokens': ..., ...} (spec.SpeculativeConfig); the server sets it with the "
        "--speculative-* flags")
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    tokenizer: str | None = option(
        "tokenizer", None, "tokenizer folder (default: the model's)", flags=("--tokenizer", "--tokenizer-path"),
        type=str)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def prefill_graph_tokens(self) -> int:
        """Most tokens of a step the piecewise prefill graphs take (0: none are captured)."""
        if self.enforce_eager or self.device != "cuda":
            return 0
        return min(self.piecewise_cuda_graph_max_tokens, self.scheduler.max_num_batched_tokens)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @staticmethod
    def create(model: str, **options: Any) -> "EngineConfig":
        """The config for a checkpoint folder and engine options (keywords: `engine_options()`, the same as
        LLM's); unset options take their declared defaults. ValueError names a bad value, TypeError an unknown
        keyword."""
        o = option_values(options)
        mcfg = load_model_config(model)
        device, dtype = o["device"], o["dtype"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        o["device"], o["dtype"] = device, dtype
        limit = mcfg.max_position_embeddings
        if o["max_model_len"] is None:
            o["max_model_len"] = limit
        if not 1 < o["max_model_len"] <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] (the model's max_position_embeddings), "
                             f"got {o['max_model_len']}")
        block_size = o["kv_block_size"]
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"kv_block_size must be a power of two, got {block_size}")
        if o["max_num_batched_tokens"] is None:
            o["max_num_batched_tokens"] = 8192 if device == "cuda" else 2048
        if o["max_num_batched_tokens"] < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {o['max_num_batched_tokens']}")
        cap = o["max_prefill_tokens_while_decoding"]
        if cap is not None and cap < 1:
            raise ValueError(f"max_prefill_tokens_while_decoding must be >= 1, got {cap}")
        if o["piecewise_cuda_graph_max_tokens"] < 0:
            raise ValueError("piecewise_cuda_graph_max_tokens must be >= 0, got "
                             f"{o['piecewise_cuda_graph_max_tokens']}")
        if o["max_num_seqs"] is None:
            o["max_num_seqs"] = 256 if device == "cuda" else 64
        if o["max_num_seqs"] < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {o['max_num_seqs']}")
        if o["num_kv_blocks"] is not None and o["num_kv_blocks"] < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {o['num_kv_blocks']}")
        kv_cache_dtype = o["kv_cache_dtype"]
        if kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8_e4m3', got {kv_cache_dtype!r}")
        if kv_cache_dtype == "fp8_e4m3" and device != "cuda":
            raise ValueError("kv_cache_dtype 'fp8_e4m3' needs device 'cuda'")
        if o["mem_fraction_static"] is None:  # accepted for callers that passed None for "the default"
            o["mem_fraction_static"] = 0.85
        if not 0 < o["mem_fraction_static"] <= 1:  # before the weights load: 90 (a percentage) would OOM only then
            raise ValueError(f"mem_fraction_static (--mem-fraction-static / --gpu-memory-utilization) must be in "
                             f"(0, 1], got {o['mem_fraction_static']}")
        if o["tensor_parallel_size"] < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {o['tensor_parallel_size']}")
        tp_size = o["tensor_parallel_size"]
        if o["enable_expert_parallel"] and tp_size > 1 and mcfg.n_routed_experts % tp_size:
            raise ValueError(f"enable_expert_parallel (--enable-expert-parallel) splits the {mcfg.n_routed_experts} "
                             f"routed experts across tensor_parallel_size {tp_size} ranks, which does not divide them")
        if o["base_gpu_id"] is not None:
            _check_base_gpu_id(o["base_gpu_id"], o["tensor_parallel_size"], device)
        if (o["allreduce_fusion"] and device == "cuda" and o["tensor_parallel_size"] > 1
                and o["tensor_parallel_size"] not in ONE_SHOT_WORLD_SIZES):
            raise ValueError(f"allreduce_fusion (--enable-allreduce-fusion) runs at tensor_parallel_size "
                             f"{ONE_SHOT_WORLD_SIZES}, not {o['tensor_parallel_size']}")
        backend = o["attention_backend"]
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        if backend == "fa3":
            torch_dtype = _DTYPES[dtype]
            kv_dtype = _kv_torch_dtype(kv_cache_dtype, torch_dtype)
            reason = flash_attn_adapter.unsupported_reason(device, torch_dtype, mcfg.head_dim, kv_dtype, block_size)
            if reason:
                raise ValueError(f"attention_backend 'fa3' (--attention-backend fa3) {reason}")
        if o["prefill_attention_backend"] not in PREFILL_ATTENTION_BACKENDS:
            raise ValueError(f"prefill_attention_backend must be one of {PREFILL_ATTENTION_BACKENDS}, got "
                             f"{o['prefill_attention_backend']!r}")
        if o["prefill_attention_backend"] == "fa4":
            reason = fa4_prefill.unsupported_reason(device, _DTYPES[dtype], mcfg.head_dim)
            if reason:
                raise ValueError(f"prefill_attention_backend 'fa4' (--prefill-attention-backend fa4) {reason}")
        if o["disaggregation_async_last_chunk_sync"] is None:  # measured: bench/RESULTS.md, session 14
            o["disaggregation_async_last_chunk_sync"] = o["disaggregation_async_transfer"]
        if o["disaggregation_async_last_chunk_sync"] and not o["disaggregation_async_transfer"]:
            raise ValueError("disaggregation_async_last_chunk_sync (--disaggregation-async-last-chunk-sync) needs "
                             "disaggregation_async_transfer (--disaggregation-async-transfer)")
        if o["disaggregation_mode"] not in DISAGGREGATION_MODES:
            raise ValueError(f"disaggregation_mode must be one of {DISAGGREGATION_MODES}, got "
                             f"{o['disaggregation_mode']!r}")
        if o["disaggregation_transfer_backend"] not in TRANSFER_BACKENDS:
            raise ValueError(f"disaggregation_transfer_backend must be 'auto', 'nixl' or 'local', got "
                             f"{o['disaggregation_transfer_backend']!r}")
        # zmq binds -1 as 65535 while the instance advertises :-1 to decode instances (and > 65535 fails to bind)
        if not 0 <= o["disaggregation_bootstrap_port"] <= 65535:
            raise ValueError(f"disaggregation_bootstrap_port (--disaggregation-bootstrap-port) must be in [0, 65535], "
                             f"got {o['disaggregation_bootstrap_port']}")
        if not o["disaggregation_timeout"] > 0:
            raise ValueError(f"disaggregation_timeout must be > 0 seconds, got {o['disaggregation_timeout']}")
        spec = None
        if o["speculative_config"] is not None:
            spec = SpeculativeConfig.from_dict(o["speculative_config"])
            if spec.uses_mtp and mcfg.num_nextn_predict_layers < 1:
                raise ValueError(
                    f"speculative_config method {spec.method!r} needs the checkpoint's MTP (NextN) layer, but "
                    f"{mcfg.path} has none (config.json num_nextn_predict_layers is 0)"
                )
        o["speculative_config"] = spec
        if o["overlap_scheduling"] is None:
            o["overlap_scheduling"] = device == "cuda"
        return _build(EngineConfig, o, model=mcfg)


def _check_base_gpu_id(base: int, tp: int, device: str) -> None:
    if device != "cuda":
        raise ValueError(f"base_gpu_id (--base-gpu-id) selects a CUDA device; the engine runs on {device!r}")
    if base < 0:
        raise ValueError(f"base_gpu_id must be >= 0, got {base}")
    count = torch.cuda.device_count()
    if base + tp > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"base_gpu_id={base} with tensor_parallel_size={tp} needs CUDA devices "
                         f"{base}..{base + tp - 1}, but this process sees {count} (CUDA_VISIBLE_DEVICES={visible!r})")


def engine_options(cls: type = EngineConfig) -> list[EngineOption]:
    """Every engine option, in declaration order (the sections' options where the section is declared)."""
    out: list[EngineOption] = []
    for f in fields(cls):
        opt = option_of(f)
        if opt is not None:
            out.append(opt)
        elif _is_section(f):
            out.extend(engine_options(f.default_factory))
    return out


def option_values(options: dict[str, Any]) -> dict[str, Any]:
    """The declared defaults overridden by `options` (TypeError for a keyword that is not an engine option)."""
    declared = {opt.name: opt.default for opt in engine_options()}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise TypeError(f"unknown engine option(s) {unknown}; the options are: {sorted(declared)}")
    return {**declared, **options}


def _build(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """A config section from option values: each option field takes its option's value, each section recurses."""
    kwargs = dict(fixed)
    for f in fields(cls):
        opt = option_of(f)
        if opt is not None:
            kwargs[f.name] = values[opt.name]
        elif _is_section(f):
            kwargs[f.name] = _build(f.default_factory, values)
    return cls(**kwargs)


def _is_section(f: Any) -> bool:
    """A nested config (cache, scheduler, parallel, disaggregation): a field whose default is a config class."""
    return isinstance(f.default_factory, type) and is_dataclass(f.default_factory)
