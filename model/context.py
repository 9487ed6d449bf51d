"""The per-forward context: what the engine's runner fills for one step and the attention layers read."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels import fa4_prefill
from kernels.packed_kv import PackedKV, pack_index


AttentionCore = Callable[..., torch.Tensor]  # (ctx, *tensors) -> output shaped like tensors[0]
# (core, ctx, tensors) -> the core's output: how a piecewise-captured forward runs an attention core
AttentionSplit = Callable[[AttentionCore, "ForwardContext", tuple[torch.Tensor, ...]], torch.Tensor]


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
    host_query_start_loc, host_seq_lens
                        optional host copies of query_start_loc / seq_lens (the runner's lists); paths that need
                        per-sequence lengths on the host (the SDPA prefill split) read them through host_lengths()
    max_packed_kv       keys a prefill step may gather out of the pages into one packed K/V (FA4's gathered
                        path, kernels/packed_kv.py): the workspace the worker reserved; 0 = never
    split               where a forward is captured in pieces (engine/prefill_graphs.py), what runs each layer's
                        attention core between the captured pieces (attention()); None = run it in place
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
    host_query_start_loc: list[int] | None = None
    host_seq_lens: list[int] | None = None
    max_packed_kv: int = 0
    split: AttentionSplit | None = None
    _packed_kv: PackedKV | None = field(default=None, init=False, repr=False)
    _gathers: bool | None = field(default=None, init=False, repr=False)

    def attention(self, core: AttentionCore, *tensors: torch.Tensor) -> torch.Tensor:
        """A layer's attention core, core(ctx, *tensors) -> a tensor shaped like tensors[0]: the part of the
        forward that reads the step's per-sequence layout (lengths, block tables, host lists); everything around it
        reads only per-row inputs (ids, positions, slots), which is what lets piecewise CUDA graphs capture it."""
        if self.split is None:
            return core(self, *tensors)
        return self.split(core, self, tensors)

    def host_lengths(self) -> tuple[list[int], list[int]]:
        """(query_start_loc, seq_lens) as host lists: the given copies, else read from the device once (one
        sync per forward) and kept for the other layers."""
        if self.host_query_start_loc is None:
            self.host_query_start_loc = self.query_start_loc.tolist()
        if self.host_seq_lens is None:
            self.host_seq_lens = self.seq_lens.tolist()
        return self.host_query_start_loc, self.host_seq_lens

    def packed_kv(self, page_size: int, widens: bool) -> PackedKV | None:
        """The packed-K/V index of this forward's sequences where FA4's prefill gathers them
        (kernels/fa4_prefill.py `gathers`; widens: FP8 pages), else None: decided and built once, shared by every
        layer (one KV cache dtype per model)."""
        if self._gathers is None:
            self._gathers = fa4_prefill.gathers(*self.host_lengths(), self.max_packed_kv, widens)
        if self._gathers and self._packed_kv is None:
            self._packed_kv = pack_index(self.block_tables, self.host_lengths()[1], page_size)
        return self._packed_kv

    def one_prompt_alone(self) -> bool:
        """One sequence whose keys are all new this step (no cached prefix, no earlier chunk)."""
        query_start, seq_lens = self.host_lengths()
        return len(seq_lens) == 1 and seq_lens[0] == query_start[1] - query_start[0]

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1
