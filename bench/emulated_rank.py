"""One rank of a tensor-parallel group, run alone in one process: the rank's shapes and kernels, no collectives.

`EmulatedRank(rank, size)` is a TPGroup whose all-reduce returns its input and whose vocab gather repeats this
rank's logits, so a model built with it has exactly rank `rank`'s weights (attention heads, dense and expert
widths, or under expert parallelism its experts) and runs its kernels on one GPU. The numbers it computes are not
the group's (no partial sums are added); its step times are the rank's compute without the communication. Used by
`bench.engine --emulate-tp N` to time a TP8 or EP8 rank's whole prefill on one GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.distributed import DistInfo
from model.parallel import TPGroup


@dataclass(frozen=True)
class EmulatedRank(TPGroup):
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] * self.size, dim=-1)


def emulated_dist(size: int, rank: int = 0) -> DistInfo:
    """A single process that builds rank `rank` of a TP group of `size`."""
    return DistInfo(0, 1, 0, EmulatedRank(rank, size), None)
