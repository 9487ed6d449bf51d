"""GLM-4.x MoE routing: fp32 sigmoid scores, correction bias for selection only, group-limited top-k,
weights from the unbiased scores, renormalized, times routed_scaling_factor. Torch reference."""
from __future__ import annotations

import torch


def moe_route_ref(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (topk_weights fp32 [T, k (+1)], topk_ids int32 [T, k (+1)]).

    With num_fused_shared_experts=1 the shared expert is appended as expert id E with weight exactly 1.0
    (no renormalization, no scaling factor), so a fused MoE over E+1 experts computes routed + shared.
    """
    t, e = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float() if correction_bias is not None else scores
    if n_group > 1:
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        choice = choice.masked_fill(score_mask == 0, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, topk_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    if num_fused_shared_experts:
        shared_ids = torch.full((t, 1), e, dtype=topk_ids.dtype, device=topk_ids.device)
        topk_ids = torch.cat([topk_ids, shared_ids], dim=1)
        weights = torch.cat([weights, torch.ones(t, 1, dtype=weights.dtype, device=weights.device)], dim=1)
    return weights, topk_ids.to(torch.int32)


def moe_gate_route_ref(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router and the routing in one op: fp32 logits x.float() @ gate_weight.T, then moe_route_ref."""
    logits = torch.nn.functional.linear(x.float(), gate_weight.float())
    return moe_route_ref(logits, correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor,
                         num_fused_shared_experts)


def moe_local_ids_ref(topk_ids: torch.Tensor, start: int, count: int,
                      shared_owner: tuple[int, int] | None = None) -> torch.Tensor:
    """Expert parallelism: global expert ids [T, k (+1)] -> this rank's (experts [start, start + count) become
    0..count-1) and -1 for an expert on another rank (fused_moe(remote_ids=True) skips those pairs).

    shared_owner = (rank, ranks): the last column is the fused shared expert (moe_route's id E), stored whole on
    every rank as local expert `count`; token t's shared pair is computed by rank t % ranks only, so each rank takes
    1/ranks of the shared expert's rows and the all-reduce adds it once."""
    local = topk_ids - start
    out = torch.where((local >= 0) & (local < count), local, torch.full_like(local, -1))
    if shared_owner is not None:
        rank, ranks = shared_owner
        tok = torch.arange(topk_ids.shape[0], device=topk_ids.device)
        out[:, -1] = torch.where(tok % ranks == rank, count, -1).to(out.dtype)
    return out
