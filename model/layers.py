"""Small building blocks: RMSNorm, vocab-parallel embedding and LM head, dense SwiGLU MLP."""
from __future__ import annotations

import torch
from torch import nn

import kernels
from model.linear import Linear
from model.parallel import NormOutput, TPGroup, vocab_partition


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rms_norm(x). With residual: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)

    def forward_quant(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """(y, x + residual or None, (y_fp8, y_scale) or None): the norm with its output also quantized per
        token for an fp8_channel consumer, where the kernel can fuse it."""
        return kernels.rms_norm_quant(x, self.weight, self.eps, residual)

    def forward_reduced(self, x: torch.Tensor, residual: torch.Tensor, tp: TPGroup, quant: bool) -> NormOutput:
        """forward_quant (quant) or forward of all_reduce(x) + residual, where x holds this rank's partial sums
        of a row-parallel layer: one kernel with the fused all-reduce (TPGroup.all_reduce_add_rms_norm)."""
        return tp.all_reduce_add_rms_norm(x, residual, self.weight, self.eps, quant)


class VocabEmbedding(nn.Module):
    """Rows [start, start + local) of the (padded) vocabulary on each rank; an all-reduce assembles them."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, self.local = vocab_partition(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.local, hidden, dtype=dtype, device=device), False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.local)
        out = nn.functional.embedding(local.clamp(0, self.local - 1), self.weight)
        out = out * mask.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class LMHead(nn.Module):
    """Vocab-parallel output projection; logits are gathered on every rank and trimmed to vocab_size."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, self.local = vocab_partition(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.local, hidden, dtype=dtype, device=device), False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(h, self.weight)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate/up fused column-parallel and down row-parallel.

    The all-reduce is left to the caller so the MoE block can sum routed + shared partials first."""

    def __init__(self, hidden: int, intermediate_local: int, quant: str, dtype, device) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate_local, False, quant, dtype, device)
        self.down_proj = Linear(intermediate_local, hidden, False, quant, dtype, device)

    def forward(self, x: torch.Tensor, x_q: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.down_proj(kernels.silu_mul(self.gate_up_proj(x, x_q)))
