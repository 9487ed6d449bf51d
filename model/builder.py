"""Build a GLM-4.7 model on a device and fill its weights (checkpoint folder or dummy)."""
from __future__ import annotations

import torch

from kernels import flash_attn_adapter
from model.config import ModelConfig
from model.dummy import DummySource
from model.glm4_moe import Glm4MoeForCausalLM
from model.loader import SafetensorsSource, TensorSource, load_weights
from model.parallel import TPGroup
from model.quant_plan import QuantPlan


def build_model(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    tp: TPGroup = TPGroup(),
    load_format: str = "auto",
    seed: int = 0,
    with_mtp: bool = False,
    fuse_shared_experts: bool = False,
    fused_qk_norm_rope: bool = False,
    progress: bool = True,
    attention_backend: str = "triton",
    prefill_attention_backend: str = "auto",
    expert_parallel: bool = False,
) -> Glm4MoeForCausalLM:
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}")
    if attention_backend == "fa3":
        reason = flash_attn_adapter.unsupported_reason(torch.device(device).type, dtype, cfg.head_dim)
        if reason:
            raise ValueError(f"--attention-backend fa3 {reason}")
    source: TensorSource = DummySource(cfg, seed) if load_format == "dummy" else SafetensorsSource(cfg.path)
    names = None if load_format == "dummy" else set(source.names())
    plan = QuantPlan.build(cfg, device, dtype, names, fuse_shared_experts, fused_qk_norm_rope, attention_backend,
                           prefill_attention_backend, expert_parallel)
    model = Glm4MoeForCausalLM(cfg, plan, tp, dtype, device, with_mtp=with_mtp)
    load_weights(model, cfg, source, tp, fuse_shared_experts, dtype, device, progress=progress,
                 expert_parallel=expert_parallel)
    model.eval()
    return model
