"""Piecewise CUDA graphs for prefill and mixed steps: the forward captured in pieces around each layer's
attention core, which runs eagerly between them.

An eager prefill launches ~20 kernels a layer from Python; at high TP a short chunk's kernels take less time than
launching them (bench/RESULTS.md, "A 4K prefill at the TP8 shard widths is host-bound"). Everything but the
attention core reads only per-row inputs (token ids, positions, KV slots), so it can be captured once per token
bucket and replayed for any step padded to that bucket; the core reads the step's per-sequence layout (lengths,
block tables, host lists, FA4's Python entry), so it runs eagerly (ForwardContext.attention). SGLang's and vLLM's
piecewise graphs split the forward the same way.

Per (token bucket, route) one CapturedForward: graphs[i] runs from the previous core (or the embedding) up to core
i and copies core i's inputs into static buffers; core i reads them, its output goes to a static buffer that
graphs[i + 1] reads; the last graph ends with the final norm. The route is whether the step's attention takes the
prompt-alone path (FA4 over a prompt's own K/V), which changes the kernels around the core. Padding rows (the
bucket beyond the step's tokens) carry token 0 at position 0 and write no KV (slot -1); no core reads them, and
the rows they add to the row-wise kernels never meet a real row's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from engine.block_tables import table_width
from model.context import AttentionCore, ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM

log = logging.getLogger(__name__)

MIN_BUCKET = 64


def token_buckets(max_tokens: int) -> list[int]:
    """64, 128, 256, 384, 512, 768, ...: powers of two and 1.5x each, up to max_tokens (always included)."""
    sizes, p = [], MIN_BUCKET
    while p < max_tokens:
        sizes += [s for s in (p, p * 3 // 2) if s < max_tokens and (s == p or p >= 256)]
        p *= 2
    return sorted(set(sizes + [max_tokens]))


class StaticBuffers:
    """The captured forwards' fixed addresses, max_tokens rows each: the per-row inputs (ids, positions, slots)
    and the attention cores' inputs and outputs, shared by every layer and bucket (one core runs at a time)."""

    def __init__(self, max_tokens: int, device: torch.device) -> None:
        self.max_tokens = max_tokens
        self.rows = torch.zeros(3, max_tokens, dtype=torch.long, device=device)
        self.ids, self.positions, self.slots = self.rows.unbind(0)
        self.slots.fill_(-1)
        self.cores: dict[tuple, torch.Tensor] = {}

    def core_buffer(self, role: tuple, like: torch.Tensor) -> torch.Tensor:
        """The buffer of `role` for tensors shaped like `like` past its rows (made zeroed on first use)."""
        key = (role, like.dtype, tuple(like.shape[1:]))
        if key not in self.cores:
            self.cores[key] = torch.zeros(self.max_tokens, *like.shape[1:], dtype=like.dtype, device=like.device)
        return self.cores[key]

    def load(self, input_ids: torch.Tensor, ctx: ForwardContext, bucket: int) -> None:
        """A step's rows into the buffers, its padding up to `bucket` as token 0 at position 0 writing nothing."""
        t = input_ids.numel()
        self.ids[:t].copy_(input_ids)
        self.positions[:t].copy_(ctx.positions)
        self.slots[:t].copy_(ctx.slot_mapping)
        if bucket > t:
            self.rows[:2, t:bucket].zero_()
            self.slots[t:bucket].fill_(-1)


@dataclass
class CapturedForward:
    graphs: list[torch.cuda.CUDAGraph]
    cores: list[tuple[AttentionCore, list[torch.Tensor], torch.Tensor]]  # (core, its inputs, its output)
    hidden: torch.Tensor  # the final-normed hidden states [bucket, H]


class Pieces:
    """ForwardContext.split of a forward run over the static buffers: copies each core's inputs into them, then
    either ends the piece being captured and starts the next one (pool given), or runs the core at once: on the
    forward's own context (the warm-up before a capture), or as a replay runs it, on `step`'s context and rows
    (PrefillGraphs.run_uncaptured)."""

    def __init__(self, statics: StaticBuffers, pool=None, step: tuple[ForwardContext, int] | None = None) -> None:
        self.statics = statics
        self.pool = pool
        self.step = step
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.cores: list[tuple[AttentionCore, list[torch.Tensor], torch.Tensor]] = []

    def begin(self) -> None:
        if self.pool is not None:
            self.graphs.append(torch.cuda.CUDAGraph())
            self.graphs[-1].capture_begin(pool=self.pool)

    def end(self) -> None:
        if self.pool is not None:
            self.graphs[-1].capture_end()

    def __call__(self, core: AttentionCore, ctx: ForwardContext, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        t = tensors[0].shape[0]
        inputs = []
        for j, x in enumerate(tensors):
            buf = self.statics.core_buffer(("in", j), x)[:t]
            buf.copy_(x)
            inputs.append(buf)
        out = self.statics.core_buffer(("out",), tensors[0])[:t]
        if self.pool is None:
            step_ctx, rows = self.step if self.step is not None else (ctx, t)
            out[:rows].copy_(core(step_ctx, *(x[:rows] for x in inputs)))
        else:
            self.end()
            self.cores.append((core, inputs, out))
            self.begin()
        return out


class PrefillGraphs:
    def __init__(
        self,
        model: Glm4MoeForCausalLM,
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        max_tokens: int,
        block_size: int,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        max_packed_kv: int = 0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.k_scale, self.v_scale = k_scale, v_scale
        self.max_packed_kv = max_packed_kv
        self.buckets = token_buckets(max_tokens)
        self.statics = StaticBuffers(max_tokens, device)
        self.forwards: dict[tuple[int, bool], CapturedForward] = {}

    def bucket_for(self, tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= tokens), None)

    def can_run(self, input_ids: torch.Tensor, ctx: ForwardContext) -> bool:
        """A step of more than one query row per sequence somewhere (decode steps have their own graphs and an
        attention fused with o_proj's quantization) whose tokens fit a bucket captured for its route."""
        bucket = self.bucket_for(input_ids.numel())
        return (ctx.max_query_len > 1 and bucket is not None
                and (bucket, self.model.attention_route(ctx)) in self.forwards)

    def capture_context(self, tokens: int, prompt_alone: bool) -> ForwardContext:
        """One sequence of `tokens` new rows over the static buffers (slots -1: nothing is written), alone or after
        one cached key (page 0 of the zeroed cache) so that the step attends through the pages."""
        seq_len = tokens + (0 if prompt_alone else 1)
        pages = -(-seq_len // self.block_size)
        dev = self.device
        s = self.statics
        s.positions[:tokens].copy_(torch.arange(seq_len - tokens, seq_len, device=dev))
        s.slots.fill_(-1)
        return ForwardContext(
            positions=s.positions[:tokens], slot_mapping=s.slots[:tokens],
            block_tables=torch.zeros(1, table_width(pages), dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=dev),
            max_query_len=tokens, max_seq_len=seq_len, kv_caches=self.kv_caches, k_scale=self.k_scale,
            v_scale=self.v_scale, host_query_start_loc=[0, tokens], host_seq_lens=[seq_len],
            max_packed_kv=self.max_packed_kv,
        )

    def _forward(self, tokens: int, prompt_alone: bool, pool=None) -> tuple[Pieces, torch.Tensor]:
        ctx = self.capture_context(tokens, prompt_alone)
        ctx.split = pieces = Pieces(self.statics, pool)
        pieces.begin()
        hidden = self.model(self.statics.ids[:tokens], ctx)
        pieces.end()
        return pieces, hidden

    def routes(self, tokens: int) -> list[bool]:
        """The attention routes a step of `tokens` rows can take: through the pages, and alone where that differs."""
        alone = self.model.attention_route(self.capture_context(tokens, prompt_alone=True))
        return [False, True] if alone else [False]

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """Every (bucket, route), largest bucket first, in one memory pool; each after an eager run of the same
        forward over the same buffers (compiles what it launches, makes the static buffers)."""
        keys = [(b, r) for b in sorted(self.buckets, reverse=True) for r in self.routes(b)]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # after routes()' writes to the buffers
        with torch.cuda.stream(stream):
            for tokens, route in tqdm(keys, desc="Capturing piecewise prefill graphs", disable=not progress):
                self._forward(tokens, route)  # warm-up
                torch.cuda.synchronize(self.device)
                pieces, hidden = self._forward(tokens, route, pool)
                self.forwards[(tokens, route)] = CapturedForward(pieces.graphs, pieces.cores, hidden)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured piecewise prefill graphs: %d forwards, token buckets %s", len(self.forwards),
                 self.buckets)

    def run(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The step's final hidden states [T, H] (a view of a static buffer): its captured pieces replayed, the
        attention cores run eagerly on the step's own context between them."""
        t = input_ids.numel()
        bucket = self.bucket_for(t)
        fwd = self.forwards[(bucket, self.model.attention_route(ctx))]
        self.statics.load(input_ids, ctx, bucket)
        for graph, (core, inputs, out) in zip(fwd.graphs, fwd.cores):
            graph.replay()
            out[:t].copy_(core(ctx, *(x[:t] for x in inputs)))
        fwd.graphs[-1].replay()
        return fwd.hidden[:t]

    def run_uncaptured(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """What run() computes, without graphs (any device): the forward over the padded static rows, each core
        on the step's context and rows. The step's host layout stays in the context, so it takes its own route."""
        t = input_ids.numel()
        bucket = self.bucket_for(t)
        self.statics.load(input_ids, ctx, bucket)
        s = self.statics
        padded = replace(ctx, positions=s.positions[:bucket], slot_mapping=s.slots[:bucket],
                         split=Pieces(s, step=(ctx, t)))
        hidden = self.model(s.ids[:bucket], padded)
        out = s.core_buffer(("hidden",), hidden)[:t]  # like a replay's, a view of a buffer the next step rewrites
        return out.copy_(hidden[:t])
