"""KV cache tensors: one (K, V) pair of [num_blocks, block_size, kv_heads_local, head_dim] per layer, all views of
ONE allocation [num_layers, 2, num_blocks, ...] (layer-major: each view is dense, as the kernels want). One
allocation is also what a transfer engine registers for disaggregation: NIXL's CUDA-IPC path failed on a pool of
184 separate tensors that the caching allocator had packed into shared segments (disagg/nixl_backend.py)."""
from __future__ import annotations

import torch

from kernels.quant import FP8_DTYPE
from model.config import ModelConfig
from model.parallel import HeadPartition, TPGroup


def kv_cache_dtype(kind: str, model_dtype: torch.dtype) -> torch.dtype:
    return FP8_DTYPE if kind == "fp8_e4m3" else model_dtype


def kv_bytes_per_token(cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, num_layers: int) -> int:
    heads = HeadPartition.build(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
    return 2 * num_layers * heads.num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


def allocate_kv_caches(
    cfg: ModelConfig,
    tp: TPGroup,
    layer_ids: list[int],
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    heads = HeadPartition.build(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
    shape = (num_blocks, block_size, heads.num_kv_heads, cfg.head_dim)
    buf = torch.zeros((len(layer_ids), 2, *shape), dtype=dtype, device=device)
    return {lid: (buf[i, 0], buf[i, 1]) for i, lid in enumerate(layer_ids)}
