"""Glm4MoeForCausalLM: embedding, decoder layers, final norm, untied LM head, and the optional NextN layer."""
from __future__ import annotations

import torch
from torch import nn

import kernels
from model.config import ModelConfig
from model.context import ForwardContext
from model.decoder import DecoderLayer
from model.layers import LMHead, RMSNorm, VocabEmbedding
from model.nextn import NextNLayer
from model.parallel import TPGroup
from model.quant_plan import QuantPlan


class Glm4MoeForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        plan: QuantPlan,
        tp: TPGroup = TPGroup(),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        with_mtp: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.dtype = dtype
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, tp, plan, dtype, device) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.mtp = NextNLayer(cfg, tp, plan, dtype, device) if with_mtp and cfg.num_nextn_predict_layers else None
        # RoPE cos/sin for every position, fp32 [max_positions, rotary_dim]; not a checkpoint tensor.
        self.register_buffer(
            "cos_sin",
            kernels.rope_cos_sin_cache(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, device),
            persistent=False,
        )

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Returns the final-normed hidden states [T, H] (the MTP layer consumes these too)."""
        h = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, ctx, self.cos_sin)
        h, _, _ = self.norm.forward_reduced(h, residual, self.tp, False)
        return h

    def attention_route(self, ctx: ForwardContext) -> bool:
        """Whether the step's attention takes the prompt-alone path (FA4 over a prompt's own K/V), the same in every
        layer: the kernels around the attention core differ, so piecewise graphs capture each route apart."""
        return self.layers[0].self_attn.prompt_alone(ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def mtp_forward(
        self, input_ids: torch.Tensor, prev_hidden: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """One NextN step: token ids shifted left by one, the target's final-normed hidden at the same rows."""
        if self.mtp is None:
            raise RuntimeError("this model was built without its MTP (NextN) layer")
        return self.mtp(self.embed_tokens(input_ids), prev_hidden, ctx, self.cos_sin)
