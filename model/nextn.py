"""The NextN / MTP layer GLM-4.7 stores at layer index num_hidden_layers.

    e   = enorm(embed(token_{p+1}));  hh = hnorm(h_p)      (h_p: target hidden after the final norm)
    u   = eh_proj([e ; hh])                                (order: embedding first, then hidden)
    u   = DecoderLayer(u) at position p, with its own KV    (a full MoE layer)
    out = shared_head.norm(u)  -> main lm_head (the checkpoint has no copies of embed/head for 4.6/4.7)
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.context import ForwardContext
from model.decoder import DecoderLayer
from model.layers import RMSNorm
from model.linear import Linear
from model.parallel import TPGroup
from model.quant_plan import QuantPlan


class NextNLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, plan: QuantPlan, dtype, device) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.layer_id = cfg.num_hidden_layers
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.eh_proj = Linear(2 * h, h, False, "none", dtype, device)  # replicated, BF16 in the releases
        self.layer = DecoderLayer(cfg, self.layer_id, tp, plan, dtype, device)
        self.shared_head_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.tp = tp

    def forward(
        self, embeds: torch.Tensor, prev_hidden: torch.Tensor, ctx: ForwardContext, cos_sin: torch.Tensor
    ) -> torch.Tensor:
        u = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden)], dim=-1))
        u, residual = self.layer(u, None, ctx, cos_sin)
        out, _, _ = self.shared_head_norm.forward_reduced(u, residual, self.tp, False)
        return out
