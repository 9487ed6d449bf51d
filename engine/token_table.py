"""The device-side token table: the ids of tokens sampled on the device, indexed by (request slot, position).

With overlap scheduling step N+1 is planned and launched before step N's sampled tokens reach the host, so
some of step N+1's input ids exist only on the device. Each running request owns a row (its scheduler slot);
at the start of a step the tokens the previous step sampled are written at (slot, position), and the input ids
the host does not know yet are read from there. Rows are a ring over positions (width >= the most tokens a
request can append per step), so the table stays small however long the context is. Every TP rank keeps its
own copy, fed with the same writes (rank 0 broadcasts the sampled tokens), so no rank needs the host lists.
"""
from __future__ import annotations

import torch

from engine.device_copy import to_device

TABLE_WIDTH = 64


class TokenTable:
    def __init__(self, num_slots: int, device: torch.device, width: int = TABLE_WIDTH) -> None:
        self.width = width
        self.table = torch.zeros(num_slots, width, dtype=torch.long, device=device)

    def write(self, slots_positions: list[tuple[int, int]], tokens: torch.Tensor) -> None:
        """tokens[i] is the id at (slot, position) slots_positions[i]."""
        if not slots_positions:
            return
        idx = to_device([s * self.width + p % self.width for s, p in slots_positions], torch.long, self.table.device)
        self.table.view(-1).index_copy_(0, idx, tokens[: len(slots_positions)].to(self.table.dtype))

    def read_into(self, input_ids: torch.Tensor, reads: list[tuple[int, int, int]]) -> None:
        """input_ids[i] = table[slot, position] for each (i, slot, position)."""
        if not reads:
            return
        dev = self.table.device
        dst = to_device([i for i, _, _ in reads], torch.long, dev)
        src = to_device([s * self.width + p % self.width for _, s, p in reads], torch.long, dev)
        input_ids.index_copy_(0, dst, self.table.view(-1).index_select(0, src).to(input_ids.dtype))
