"""The per-forward context: what the engine's runner fills for one step and the attention layers read."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardContext:
    """Batch layout for one forward over T packed tokens of B sequences.

    positions[t]        absolute position of token t
    slot_mapping[t]     KV slot (block_id * block_size + offset) token t writes to; -1 = don't store
    block_tables[b]     page ids of sequence b (padded with 0)
    seq_lens[b]         KV length of sequence b after this step (cached prefix + new tokens)
    query_start_loc     [B+1] offsets of each sequence's new tokens in the packed batch
    kv_caches[layer]    (k_cache, v_cache) [num_blocks, block_size, kv_heads, head_dim], indexed by layer id
                        (the MTP layer uses index num_hidden_layers)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1
