"""One GLM-4.7 decoder layer: pre-norm attention and pre-norm MLP (dense or MoE), residual carried fused."""
from __future__ import annotations

import torch
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.context import ForwardContext
from model.layers import DenseMLP, RMSNorm
from model.moe import MoE
from model.parallel import TPGroup, divide
from model.quant_plan import QuantPlan


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPGroup, plan: QuantPlan, dtype, device) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(
            cfg, layer_id, tp,
            plan.linear(f"{prefix}.self_attn.q_proj", tp, column=True),
            plan.linear(f"{prefix}.self_attn.o_proj", tp, column=False),
            dtype, device, fused_qk_norm_rope=plan.fused_qk_norm_rope, attention_backend=plan.attention_backend,
            prefill_attention_backend=plan.prefill_attention_backend,
        )
        self.is_moe = cfg.is_moe_layer(layer_id)
        if self.is_moe:
            self.mlp: nn.Module = MoE(cfg, tp, plan, f"{prefix}.mlp", dtype, device)
        else:
            inter = divide(cfg.intermediate_size, tp.size, "intermediate_size")
            self.mlp = DenseMLP(cfg.hidden_size, inter, plan.mlp(f"{prefix}.mlp", cfg.intermediate_size, tp), dtype, device)
        self.tp = tp
        # norms also emit per-token FP8 for consumers that quantize that way (fused where a kernel exists)
        self.quant_attn_input = self.self_attn.qkv_proj.quant == "fp8_channel"
        self.quant_mlp_input = _first_quant(self.mlp) == "fp8_channel"

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the embedding (residual None) or the previous layer's output. Returns (this rank's partial sums of
        the MLP output, residual): the all-reduce under TP is left to the norm that consumes them (this class's
        next layer, the model's final norm), where it fuses with the residual add and the norm."""
        hq = None
        if residual is None:
            residual = x
            if self.quant_attn_input:
                h, _, hq = self.input_layernorm.forward_quant(x)
            else:
                h = self.input_layernorm(x)
        else:
            h, residual, hq = self.input_layernorm.forward_reduced(x, residual, self.tp, self.quant_attn_input)
        h = self.self_attn(h, ctx, cos_sin, hq)  # partial sums of o_proj
        routing = None
        if self.is_moe and not self.tp.fused_reduce(h):  # norm + router in one kernel at decode sizes
            h, residual, hq, routing = self.mlp.norm_and_route(
                self.post_attention_layernorm, self.tp.all_reduce(h), residual, self.quant_mlp_input
            )
        else:
            h, residual, hq = self.post_attention_layernorm.forward_reduced(h, residual, self.tp,
                                                                            self.quant_mlp_input)
        if self.is_moe:
            return self.mlp(h, hq, routing), residual
        return self.mlp(h, hq), residual


def _first_quant(mlp: nn.Module) -> str:
    """The quantization of the MLP's first GEMM (dense gate_up, or the routed experts)."""
    if isinstance(mlp, MoE):
        return mlp.experts.quant
    return mlp.gate_up_proj.quant
