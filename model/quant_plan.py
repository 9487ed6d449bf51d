"""Which weight storage each linear layer gets, decided once before the model is built.

FP8 weights stay FP8 only on CUDA with a 16-bit activation dtype; elsewhere (CPU, float32) they are
dequantized at load so the CPU path runs plain matmuls and can be compared with HF transformers. Block-FP8
weights also stay FP8 only when this rank's slice is aligned to the 128x128 scale blocks (e.g. at TP8 the
192-wide expert shards are not, and are dequantized instead)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.linear import BLOCK
from model.parallel import HeadPartition, TPGroup, divide

# Module-name suffixes the GLM-4.x FP8 releases quantize (used for dummy weights, which have no checkpoint).
RELEASE_QUANTIZED_SUFFIXES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj",
)


@dataclass(frozen=True)
class QuantPlan:
    cfg: ModelConfig
    storage: str  # "none" | "fp8_channel" | "fp8_block": what FP8 checkpoint tensors are kept as
    quantized_modules: frozenset[str] | None  # FP8 modules in the checkpoint; None = the release's rule
    fuse_shared_experts: bool = False
    fused_qk_norm_rope: bool = False  # not quantization, but the same kind of build-time layer choice
    attention_backend: str = "triton"  # likewise: "triton" (kernels.paged_attention) | "fa3" (flash_attn)
    prefill_attention_backend: str = "auto"  # auto | triton | sdpa: model/attention.py
    expert_parallel: bool = False  # routed experts split across the TP ranks whole (model.parallel.ExpertPartition)

    @staticmethod
    def build(
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        checkpoint_names: set[str] | None,
        fuse_shared_experts: bool = False,
        fused_qk_norm_rope: bool = False,
        attention_backend: str = "triton",
        prefill_attention_backend: str = "auto",
        expert_parallel: bool = False,
    ) -> "QuantPlan":
        keep_fp8 = cfg.quant.is_fp8 and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        storage = cfg.quant.method if keep_fp8 else "none"
        quantized = None
        if checkpoint_names is not None:
            suffix = ".weight_scale" if cfg.quant.method == "fp8_channel" else ".weight_scale_inv"
            quantized = frozenset(n[: -len(suffix)] for n in checkpoint_names if n.endswith(suffix))
        return QuantPlan(cfg, storage, quantized, fuse_shared_experts, fused_qk_norm_rope, attention_backend,
                         prefill_attention_backend, expert_parallel)

    def is_quantized(self, module: str) -> bool:
        if self.quantized_modules is not None:
            return module in self.quantized_modules
        return module.endswith(RELEASE_QUANTIZED_SUFFIXES) or ".mlp.experts." in module

    def _fp8(self, module: str, aligned: bool) -> str:
        if self.storage == "none" or not self.is_quantized(module):
            return "none"
        if self.storage == "fp8_block" and not aligned:
            return "none"
        return self.storage

    def linear(self, module: str, tp: TPGroup, column: bool) -> str:
        """Attention projections: `module` is q_proj (for the fused qkv) or o_proj."""
        heads = HeadPartition.build(self.cfg.num_attention_heads, self.cfg.num_key_value_heads, tp)
        d = self.cfg.head_dim
        sizes = [heads.num_heads * d, heads.num_kv_heads * d, heads.q_head_start * d, heads.kv_head_start * d]
        return self._fp8(module, all(s % BLOCK == 0 for s in sizes))

    def mlp(self, prefix: str, intermediate: int, tp: TPGroup) -> str:
        local = divide(intermediate, tp.size, "intermediate size")
        return self._fp8(f"{prefix}.gate_proj", local % BLOCK == 0)

    def experts(self, module: str, local_width: int) -> str:
        """An MoE's routed experts (module: experts.0) or its shared expert, at this rank's width of them."""
        return self._fp8(f"{module}.gate_proj", local_width % BLOCK == 0)
