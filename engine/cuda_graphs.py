"""CUDA graphs for decode steps: one graph per batch-size bucket, captured largest first in one memory pool.

A decode step (every sequence computes exactly one token and samples it) is copied into static input
buffers, padded to the next bucket, and replayed; the LM head runs inside the graph. Padding rows write
nothing (slot -1) and attend over one token of page 0, so they are harmless; their logits are dropped.
Attention is told the largest possible KV length so its launch grid does not depend on the batch."""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from engine.model_runner import StepInputs, fill_future
from model.context import ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16 up to max_batch (always including max_batch)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, min(max_batch, 64) + 1, 8))
    sizes += list(range(80, max_batch + 1, 16))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sorted(set(sizes))


def is_graphable(inp: StepInputs, max_batch: int) -> bool:
    b = len(inp.seq_lens)
    return (
        b <= max_batch
        and len(inp.input_ids) == b
        and inp.logits_rows == list(range(b))
    )


class DecodeGraphs:
    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.k_scale, self.v_scale = k_scale, v_scale
        self.sizes = graph_batch_sizes(max_batch)
        m = max_batch
        max_blocks = -(-max_model_len // block_size)
        # ids, positions, slots and lengths arrive in one host-to-device copy into `rows`; the graph itself
        # converts the lengths to the int32 the kernels read
        self.rows = torch.zeros(4, m, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens_long = self.rows.unbind(0)
        self.slot_mapping.fill_(-1)
        self.seq_lens_long.fill_(1)
        self.block_tables = torch.zeros(m, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(m, dtype=torch.int32, device=device)
        # pinned host staging for `rows`, two in turn: a buffer is refilled only once the copy that last read
        # it has run (its event), so an overlapped next step never overwrites data still being copied
        self.host_rows = [torch.zeros(4, m, dtype=torch.long).pin_memory() for _ in range(2)]
        self.host_read = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0
        self.query_start_loc = torch.arange(m + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _forward(self, b: int) -> torch.Tensor:
        self.seq_lens[:b].copy_(self.seq_lens_long[:b])
        ctx = ForwardContext(
            positions=self.positions[:b],
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            kv_caches=self.kv_caches,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return self.model.compute_logits(self.model(self.input_ids[:b], ctx))

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        self.slot_mapping.fill_(-1)  # capture runs must not write the KV cache
        self.seq_lens_long.fill_(1)
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in tqdm(sorted(self.sizes, reverse=True), desc="Capturing CUDA graphs", disable=not progress):
                for _ in range(2):  # warm up: Triton autotuning / compilation outside the capture
                    self._forward(b)
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                if self.pool is None:
                    self.pool = g.pool()
                self.graphs[b] = g
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured %d decode CUDA graphs for batch sizes %s", len(self.graphs), self.sizes)

    def bucket(self, b: int) -> int:
        return next(s for s in self.sizes if s >= b)

    @torch.inference_mode()
    def run(self, inp: StepInputs, future: torch.Tensor | None = None) -> torch.Tensor:
        b = len(inp.seq_lens)
        size = self.bucket(b)
        turn, self.turn = self.turn, 1 - self.turn
        self.host_read[turn].synchronize()  # the copy that last read this staging buffer has run
        host = self.host_rows[turn]
        host[:, :b] = torch.tensor([inp.input_ids, inp.positions, inp.slot_mapping, inp.seq_lens], dtype=torch.long)
        if size > b:  # padding rows: token 0 at position 0, write nothing (slot -1), read one token of page 0
            host[:2, b:size] = 0
            host[2, b:size] = -1
            host[3, b:size] = 1
            self.block_tables[b:size, 0] = 0
        # the whole [4, max_batch] buffer: a contiguous pinned source keeps the copy asynchronous (a strided
        # slice would go through a pageable temporary and stall the host); columns past `size` are not read
        self.rows.copy_(host, non_blocking=True)
        self.host_read[turn].record()
        fill_future(self.input_ids, inp, future)
        width = len(inp.block_tables[0])
        tables = torch.tensor(inp.block_tables, dtype=torch.int32).pin_memory()
        self.block_tables[:b, :width].copy_(tables, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:b]
