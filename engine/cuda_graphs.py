"""CUDA graphs for decode and verify steps: one graph per (batch-size bucket, rows per request), captured
largest first in one memory pool.

A decode step has one row per request; a verify step has 1 + K rows per request (its last token and K draft
tokens, shorter drafts padded with fillers by prepare_step). The step is copied into static input buffers,
padded to the next batch bucket, and replayed; the LM head runs inside the graph. Padding rows write nothing
(slot -1) and attend over their own few positions of page 0, so they are harmless; their logits are dropped.
Attention is told the largest possible KV length so its launch grid does not depend on the batch."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm import tqdm

from engine.block_tables import table_width
from engine.model_runner import StepInputs, uniform_rows
from model.context import ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM

log = logging.getLogger(__name__)

MAX_VERIFY_GRAPH_TOKENS = 512  # verify graphs cover batch x rows up to this (bounds their logits buffers)


def time_replays(graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph], device: torch.device,
                 repeats: int = 5) -> dict[tuple[int, ...], float]:
    """Median ms of each graph's replay (after one untimed replay), over their capture inputs (slot -1: they
    write nothing). Every TP rank must call it, in the same order: graphs hold the step's all-reduces."""
    out = {}
    for key, g in graphs.items():
        g.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            g.replay()
            end.record()
        torch.cuda.synchronize(device)
        out[key] = sorted(s.elapsed_time(e) for s, e in events)[repeats // 2]
    return out


def time_captured(graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph], shapes: list[tuple[int, int]],
                  seq_lens_long: torch.Tensor, positions: torch.Tensor, device: torch.device) -> dict[tuple[int, ...], float]:
    """time_replays over the longest capture chains of `shapes` (no row sits before position 0), logged."""
    q_max = max(q for _, q in shapes)
    seq_lens_long.fill_(q_max)
    positions.copy_(torch.arange(positions.numel(), device=device) % q_max)
    out = time_replays(graphs, device)
    log.info("graph replay ms: %s", {k: round(v, 3) for k, v in sorted(out.items())})
    return out


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16 up to max_batch (always including max_batch)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, min(max_batch, 64) + 1, 8))
    sizes += list(range(80, max_batch + 1, 16))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sorted(set(sizes))


def verify_row_counts(max_drafts: int) -> list[int]:
    """Rows per request of the verify graphs: 1 + K for K = 1, 2, 4, 8, ... below max_drafts, and max_drafts."""
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k < max_drafts] + [max_drafts] if max_drafts > 0 else []
    return [1 + k for k in ks]


class DecodeGraphs:
    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        max_drafts: int = 0,
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
        self.shapes: list[tuple[int, int]] = [(b, 1) for b in self.sizes]  # (batch, rows per request)
        for q in verify_row_counts(max_drafts):
            self.shapes += [(b, q) for b in self.sizes if b * q <= MAX_VERIFY_GRAPH_TOKENS]
        m = max(b * q for b, q in self.shapes)
        max_blocks = table_width(-(-max_model_len // block_size))
        # ids, positions, slots (per row) and lengths (per request, first max_batch columns) arrive in one
        # host-to-device copy into `rows`; the graph converts the lengths to the int32 the kernels read
        self.rows = torch.zeros(4, m, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens_long = self.rows.unbind(0)
        self.slot_mapping.fill_(-1)
        self.seq_lens_long.fill_(1)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        # pinned host staging for `rows`, two in turn: a buffer is refilled only once the copy that last read
        # it has run (its event), so an overlapped next step never overwrites data still being copied
        self.host_rows = [torch.zeros(4, m, dtype=torch.long).pin_memory() for _ in range(2)]
        self.host_read = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0
        self.query_start_loc = {
            q: torch.arange(0, (max_batch + 1) * q, q, dtype=torch.int32, device=device)
            for q in {q for _, q in self.shapes}
        }
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (logits, hidden)
        self.replay_ms: dict[tuple[int, int], float] = {}  # each graph's replay time (capture(time=True))
        self.pool = None

    def _forward(self, b: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.seq_lens[:b].copy_(self.seq_lens_long[:b])
        t = b * q
        ctx = ForwardContext(
            positions=self.positions[:t],
            slot_mapping=self.slot_mapping[:t],
            block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[q][: b + 1],
            max_query_len=q,
            max_seq_len=self.max_model_len,
            kv_caches=self.kv_caches,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        hidden = self.model(self.input_ids[:t], ctx)
        return self.model.compute_logits(hidden), hidden

    @torch.inference_mode()
    def capture(self, progress: bool = True, time: bool = False) -> None:
        """time: also time every graph's replay (self.replay_ms: the draft budget's step cost)."""
        self.slot_mapping.fill_(-1)  # capture runs must not write the KV cache
        self.block_tables.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            order = sorted(self.shapes, key=lambda s: (s[0] * s[1], s[1]), reverse=True)
            for b, q in tqdm(order, desc="Capturing CUDA graphs", disable=not progress):
                # chains of q rows at positions 0..q-1 (causal attention needs seq_len >= q)
                self.seq_lens_long.fill_(q)
                self.positions.copy_(torch.arange(self.positions.numel(), device=self.device) % q)
                for _ in range(2):  # warm up: Triton autotuning / compilation outside the capture
                    self._forward(b, q)
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    self.outputs[(b, q)] = self._forward(b, q)
                if self.pool is None:
                    self.pool = g.pool()
                self.graphs[(b, q)] = g
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs: batch sizes %s, rows per request %s", len(self.graphs), self.sizes,
                 sorted({q for _, q in self.shapes}))
        if time:
            self.replay_ms = time_captured(self.graphs, self.shapes, self.seq_lens_long, self.positions, self.device)

    def shape_for(self, batch: int, q: int) -> tuple[int, int] | None:
        """The captured (batch bucket, q) that runs `batch` requests of q rows each, or None."""
        for b, qq in self.shapes:
            if qq == q and b >= batch:
                return (b, q)
        return None

    def padded_rows(self, batch: int, max_chain: int) -> int:
        """Rows per request to pad a decode/verify batch to (the smallest captured q >= max_chain), or 0."""
        qs = sorted({q for b, q in self.shapes if q >= max_chain and b >= batch})
        return qs[0] if qs else 0

    def can_run(self, inp: StepInputs) -> bool:
        q = uniform_rows(inp)
        return q > 0 and self.shape_for(len(inp.seq_lens), q) is not None

    @torch.inference_mode()
    def run(self, inp: StepInputs, fill_inputs: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the step's graph: (logits, final hidden states) of its t rows (views of static buffers)."""
        b, q = len(inp.seq_lens), uniform_rows(inp)
        size, _ = self.shape_for(b, q)
        t, t_pad = b * q, size * q
        turn, self.turn = self.turn, 1 - self.turn
        self.host_read[turn].synchronize()  # the copy that last read this staging buffer has run
        host = self.host_rows[turn]
        host[:3, :t] = torch.tensor([inp.input_ids, inp.positions, inp.slot_mapping], dtype=torch.long)
        host[3, :b] = torch.tensor(inp.seq_lens, dtype=torch.long)
        if size > b:  # padding requests: token 0 at positions 0..q-1, write nothing (slot -1), page 0
            host[0, t:t_pad] = 0
            host[1, t:t_pad] = torch.arange(q).repeat(size - b)
            host[2, t:t_pad] = -1
            host[3, b:size] = q
            self.block_tables[b:size, 0] = 0
        # the whole staging buffer: a contiguous pinned source keeps the copy asynchronous (a strided slice
        # would go through a pageable temporary and stall the host); columns past the shape are not read
        self.rows.copy_(host, non_blocking=True)
        self.host_read[turn].record()
        fill_inputs(self.input_ids)
        tables = inp.block_tables
        self.block_tables[:b, :tables.width].copy_(tables.tensor().pin_memory(), non_blocking=True)
        self.graphs[(size, q)].replay()
        logits, hidden = self.outputs[(size, q)]
        return logits[:t], hidden[:t]
