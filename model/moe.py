"""GLM-4.x MoE block: fp32 sigmoid router with selection-only correction bias, group-limited top-k,
renormalized x routed_scaling_factor, SwiGLU experts stacked per expert, plus the always-on shared expert.

With fuse_shared_experts the shared expert is stored as expert E of the stacked weights and routed to every
token with weight 1.0 (one fused MoE call instead of two GEMM chains).

Under expert parallelism (model.parallel.ExpertPartition) a rank stores its 1/tp of the routed experts whole; every
rank routes every token, maps the chosen ids to its own (-1 elsewhere) and computes only its pairs. The shared expert
is a tensor-parallel DenseMLP, or with fuse_shared_experts stored whole on every rank as local expert `count`, each
token's shared pair computed by rank t % tp alone (kernels.moe_local_ids). Either way the output is this rank's
partial sum, which the next norm all-reduces."""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.quant import FP8_DTYPE
from model.config import ModelConfig
from model.layers import DenseMLP, RMSNorm
from model.linear import scale_shape
from model.parallel import ExpertPartition, TPGroup, divide
from model.quant_plan import QuantPlan


Routing = tuple[torch.Tensor, torch.Tensor]  # (weights fp32 [T, k], expert ids int32 [T, k])


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, device) -> None:
        super().__init__()
        e = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size, dtype=torch.float32, device=device), False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(e, dtype=torch.float32, device=device), False)


class StackedExperts(nn.Module):
    """w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I], I = this rank's slice of the width."""

    def __init__(self, num_experts: int, hidden: int, inter_local: int, quant: str, dtype, device) -> None:
        super().__init__()
        self.quant = quant
        wdtype = dtype if quant == "none" else FP8_DTYPE
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter_local, hidden, dtype=wdtype, device=device), False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter_local, dtype=wdtype, device=device), False)
        s13 = scale_shape(quant, 2 * inter_local, hidden)
        s2 = scale_shape(quant, hidden, inter_local)
        mk = lambda s: nn.Parameter(torch.empty(num_experts, *s, dtype=torch.float32, device=device), False)  # noqa: E731
        self.w13_scale = mk(s13) if s13 else None
        self.w2_scale = mk(s2) if s2 else None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, plan: QuantPlan, prefix: str, dtype, device) -> None:
        """prefix: the checkpoint's module name of this MLP (model.layers.N.mlp), for the quantization plan."""
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.partition = ExpertPartition.build(cfg.n_routed_experts, cfg.moe_intermediate_size, tp,
                                               plan.expert_parallel)
        self.fused_shared = plan.fuse_shared_experts and cfg.n_shared_experts > 0
        self.gate = Router(cfg, device)
        num_slots = self.partition.count + (1 if self.fused_shared else 0)
        quant = plan.experts(f"{prefix}.experts.0", self.partition.width)
        self.experts = StackedExperts(num_slots, cfg.hidden_size, self.partition.width, quant, dtype, device)
        shared_width = divide(cfg.moe_intermediate_size * cfg.n_shared_experts, tp.size, "moe_intermediate_size")
        self.shared_experts = (
            DenseMLP(cfg.hidden_size, shared_width, plan.experts(f"{prefix}.shared_experts", shared_width), dtype,
                     device)
            if cfg.n_shared_experts and not self.fused_shared
            else None
        )

    def _routing_args(self) -> tuple:
        cfg = self.cfg
        return (self.gate.weight, self.gate.e_score_correction_bias, cfg.num_experts_per_tok, cfg.n_group,
                cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor, 1 if self.fused_shared else 0)

    def route(self, x: torch.Tensor) -> Routing:
        """(weights, global expert ids) of the tokens x: the router GEMM and the group-limited top-k."""
        return kernels.moe_gate_route(x, *self._routing_args())

    def norm_and_route(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor, quant: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, Routing]:
        """The pre-MoE norm of x + residual and the routing of its output, one kernel at decode sizes:
        (y, x + residual, (y_fp8, y_scale) or None, (weights, ids)) for forward(y, y_q, routing)."""
        y, summed, yq, weights, ids = kernels.rms_norm_gate_route(
            x, residual, norm.weight, norm.eps, quant, *self._routing_args()
        )
        return y, summed, yq, (weights, ids)

    def forward(self, x: torch.Tensor, x_q: tuple[torch.Tensor, torch.Tensor] | None = None,
                routing: Routing | None = None) -> torch.Tensor:
        """routing: (weights, ids) from norm_and_route; computed from x here when None."""
        weights, ids = routing if routing is not None else self.route(x)
        part = self.partition
        if part.expert_parallel:
            owner = (self.tp.rank, self.tp.size) if self.fused_shared else None
            ids = kernels.moe_local_ids(ids, part.start, part.count, owner)
        ex = self.experts
        xf, xs = x_q if x_q is not None and ex.quant == "fp8_channel" else (None, None)
        out = kernels.fused_moe(x, ex.w13, ex.w2, weights, ids, ex.w13_scale, ex.w2_scale, ex.quant,
                                x_fp8=xf, x_scale=xs, remote_ids=part.expert_parallel)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, x_q)
        return out  # partial sums under TP: the next norm all-reduces them (DecoderLayer)
