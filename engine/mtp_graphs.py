"""MTP drafting in CUDA graphs: the NextN layer's whole draft of a step (extend + chain) in one replay.

After a decode or verify step every request kept n <= q of its q rows. The extend runs the NextN layer over
those positions (its KV stays aligned with the accepted tokens); its last row predicts the first draft. The
chain then runs K - 1 more NextN steps, one row per request, each reading the previous draft and the previous
NextN output (spec/mtp.py has the same steps eagerly). Eagerly that is K forwards of a full MoE layer, each
tens of kernel launches from Python plus a host sync for its argmax (~7 ms per step on the H200 for the small
trained model, against 0.5 ms for its graph-replayed target step); here it is one replay and one copy of the
[batch, K] drafts to the host.

Layout: q rows per request, the padding rows FIRST (slot -1: they write nothing), so that the request's real
rows are the last n of q and attention's end-aligned causal rule (row i of q sits at seq_len - q + i) puts
them at their positions, and the last row (the one whose logits give the first draft) is always row q - 1.
Chain rows past a request's draft limit write nothing either (slot -1): their pages may not be reserved.
The argmax and the next step's inputs stay on the device. On a machine without CUDA (tests), `replay=False`
runs the same function over the same static buffers eagerly.

Every shape is captured twice: with the chain, and as the extend alone, which a step replays when no request
drafts (the draft budget held every request at 0 drafts, or hybrid chose suffix drafts for all of them): the
NextN KV stays aligned and the chain is not paid for.
"""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from engine.cuda_graphs import MAX_VERIFY_GRAPH_TOKENS, graph_batch_sizes, time_captured, verify_row_counts
from engine.block_tables import BlockTables, table_width
from model.context import ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM
from spec import MtpDraftBatch

log = logging.getLogger(__name__)


class MtpDraftGraphs:
    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        chain_length: int,
        max_verify_drafts: int,
        hidden_size: int,
        dtype: torch.dtype,
        replay: bool = True,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """chain_length: drafts per request (K); max_verify_drafts: the most drafts a verify step carries (the
        extend then has up to 1 + that many rows per request)."""
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.max_model_len, self.block_size, self.chain_length = max_model_len, block_size, chain_length
        self.replay = replay
        self.k_scale, self.v_scale = k_scale, v_scale
        sizes = graph_batch_sizes(max_batch)
        self.shapes = [(b, q) for q in [1, *verify_row_counts(max_verify_drafts)] for b in sizes
                       if b * q <= max(MAX_VERIFY_GRAPH_TOKENS, b)]
        m = max(b * q for b, q in self.shapes)
        self.max_blocks = table_width(-(-max_model_len // block_size))
        # per row: ids, positions, slots; per request (first max_batch columns): seq_lens, draft limits
        self.rows = torch.zeros(5, m, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens_long, self.limits = self.rows.unbind(0)
        self.hidden_in = torch.zeros(m, hidden_size, dtype=dtype, device=device)
        self.block_tables = torch.zeros(max_batch, self.max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.query_start_loc = {
            q: torch.arange(0, (max_batch + 1) * q, q, dtype=torch.int32, device=device)
            for q in {1, *(q for _, q in self.shapes)}
        }
        # keys (batch bucket, q, chain): chain False is the extend alone
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, bool], torch.Tensor | None] = {}  # drafts [b, K] (None: extend alone)
        self.replay_ms: dict[tuple[int, int, bool], float] = {}  # each graph's replay time (capture(time=True))
        self.pool = None

    def shape_for(self, batch: int, q: int) -> tuple[int, int] | None:
        """The captured (batch bucket, q) that runs `batch` requests of q rows each, or None."""
        for b, qq in sorted(self.shapes):
            if qq == q and b >= batch:
                return (b, qq)
        return None

    def rows_for(self, batch: int, max_kept: int) -> int:
        """Rows per request to lay a draft of `batch` requests out in (the smallest captured q >= max_kept), or
        0 when no graph runs it."""
        qs = sorted({q for b, q in self.shapes if q >= max_kept and b >= batch})
        return qs[0] if qs else 0

    def _ctx(self, positions, slots, seq_lens, b: int, q: int) -> ForwardContext:
        return ForwardContext(
            positions=positions, slot_mapping=slots, block_tables=self.block_tables[:b], seq_lens=seq_lens,
            query_start_loc=self.query_start_loc[q][: b + 1], max_query_len=q, max_seq_len=self.max_model_len,
            kv_caches=self.kv_caches, k_scale=self.k_scale, v_scale=self.v_scale,
        )

    def _forward(self, b: int, q: int, chain: bool = True) -> torch.Tensor | None:
        t, model, bs = b * q, self.model, self.block_size
        self.seq_lens[:b].copy_(self.seq_lens_long[:b])
        ctx = self._ctx(self.positions[:t], self.slot_mapping[:t], self.seq_lens[:b], b, q)
        out = model.mtp_forward(self.input_ids[:t], self.hidden_in[:t], ctx)
        if not chain:
            return None
        # each request's last row, made contiguous: the chain feeds it to kernels that expect packed rows
        hidden = out.view(b, q, -1)[:, q - 1].contiguous()
        token = model.compute_logits(hidden).argmax(dim=-1)
        drafts = [token]
        last = self.positions[:t].view(b, q)[:, q - 1]
        limits = self.limits[:b]
        for j in range(1, self.chain_length):
            # chain step j: the NextN layer at position last + j reads draft j and its own previous output
            pos = (last + j).clamp(max=self.max_model_len - 1)
            page = self.block_tables[:b].gather(1, (pos // bs).unsqueeze(1)).squeeze(1).long()
            slots = torch.where(limits > j, page * bs + pos % bs, torch.full_like(pos, -1))
            ctx = self._ctx(pos, slots, (pos + 1).to(torch.int32), b, 1)
            hidden = model.mtp_forward(token, hidden, ctx)
            token = model.compute_logits(hidden).argmax(dim=-1)
            drafts.append(token)
        return torch.stack(drafts, dim=1)

    @torch.inference_mode()
    def capture(self, progress: bool = True, time: bool = False) -> None:
        """time: also time every graph's replay (self.replay_ms, reported with the step costs)."""
        if not self.replay:
            return
        self.slot_mapping.fill_(-1)  # capture runs must not write the KV cache
        self.limits.zero_()  # nor the chain steps
        self.block_tables.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            order = sorted(self.shapes, key=lambda s: (s[0] * s[1], s[1]), reverse=True)
            for b, q, chain in tqdm([(b, q, c) for b, q in order for c in (True, False)],
                                    desc="Capturing MTP draft graphs", disable=not progress):
                self.seq_lens_long.fill_(q)
                self.positions.copy_(torch.arange(self.positions.numel(), device=self.device) % q)
                for _ in range(2):  # Triton compilation outside the capture
                    self._forward(b, q, chain)
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    self.outputs[(b, q, chain)] = self._forward(b, q, chain)
                if self.pool is None:
                    self.pool = g.pool()
                self.graphs[(b, q, chain)] = g
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured %d MTP draft graphs (chain of %d)", len(self.graphs), self.chain_length)
        if time:
            self.replay_ms = time_captured(self.graphs, self.shapes, self.seq_lens_long, self.positions, self.device)

    @torch.inference_mode()
    def run(self, batch: MtpDraftBatch, target_hidden: torch.Tensor) -> list[list[int]]:
        """Every request's drafts, each cut to its limit (the extend runs for all of them; the chain only when
        some request drafts)."""
        b, q = len(batch.seq_lens), batch.rows_per_request
        chain = max(batch.max_drafts) > 0
        size, _ = self.shape_for(b, q)
        t, t_pad = b * q, size * q
        host = torch.zeros(5, t_pad, dtype=torch.long)
        host[:3, :t] = torch.tensor([batch.input_ids, batch.positions, batch.slot_mapping], dtype=torch.long)
        host[3, :b] = torch.tensor(batch.seq_lens, dtype=torch.long)
        host[4, :b] = torch.tensor(batch.max_drafts, dtype=torch.long)
        hidden_rows = list(batch.hidden_rows)
        if size > b:  # padding requests: positions 0..q-1 of page 0, write nothing, draft nothing
            host[1, t:t_pad] = torch.arange(q).repeat(size - b)
            host[2, t:t_pad] = -1
            host[3, b:size] = q
            self.block_tables[b:size, 0] = 0
            hidden_rows += [0] * (t_pad - t)
        self.rows[:, :t_pad].copy_(host.to(self.device, non_blocking=True))
        rows = torch.tensor(hidden_rows, dtype=torch.long).to(self.device, non_blocking=True)
        torch.index_select(target_hidden, 0, rows, out=self.hidden_in[:t_pad])
        tables = BlockTables.build(batch.block_tables)
        self.block_tables[:b, :tables.width].copy_(tables.to_device(self.device))
        if self.replay:
            self.graphs[(size, q, chain)].replay()
            drafts = self.outputs[(size, q, chain)]
        else:
            drafts = self._forward(size, q, chain)
        if drafts is None:
            return [[] for _ in range(b)]
        out = drafts[:b].tolist()
        return [d[:k] for d, k in zip(out, batch.max_drafts)]
