"""What every TP rank runs: its model shard, its KV cache and the runner. Rank 0 (inside EngineCore)
broadcasts each step's inputs; the other ranks sit in `serve_forever` and execute them."""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed

from engine.block_tables import BlockTables
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.mtp_graphs import MtpDraftGraphs
from engine.prefill_graphs import PrefillGraphs
from engine.distributed import (
    IDLE_WAIT,
    DistInfo,
    broadcast_object,
    cuda_index,
    init_distributed,
    gather_objects,
    min_across_ranks,
    shutdown_distributed,
)
from engine.gc_control import freeze_startup_heap
from engine.kernel_warmup import AttentionShape, WarmupStep, step_inputs, warmup_steps
from engine.kv_connector import KVConnectorWorker
from engine.kv_cache import allocate_kv_caches, kv_bytes_per_token, kv_cache_dtype
from engine.model_runner import ModelRunner, StepInputs, StepOutput
from engine.logprobs import PromptRows, prompt_slice_rows
from engine.sampling_params import MAX_LOGPROBS
from engine.token_table import TokenTable
from kernels import fa4_prefill, packed_kv, sdpa_prefill
from model.attention import prefill_kernel, resolve_prefill_attention_backend
from model.builder import build_model
from model.parallel import HeadPartition
from spec import MtpBatch, MtpDraftBatch, StepCost, StepCosts

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256
GRAPH_AND_COMM_RESERVE = 1 << 30  # CUDA graph pool, NCCL and cuBLAS workspaces (not seen by the profile)
STOP = "stop"  # control message: leave the worker loop
END_OF_CALL = "end_of_call"  # control message: rank 0's generate() returned (torchrun offline scripts)
# builds a rank's KV connector worker (disaggregation); picklable, so spawned ranks get it too
KVWorkerFactory = Callable[[EngineConfig, int], KVConnectorWorker]
T = TypeVar("T")


@dataclass(frozen=True)
class ConnectorCall:
    """Control message: run the KV connector worker's handle(message) on every rank, gather the results."""

    message: Any


@dataclass(frozen=True)
class ConnectorError:
    message: str


class ModelWorker:
    def __init__(self, config: EngineConfig, dist: DistInfo, kv_worker_factory: KVWorkerFactory | None = None) -> None:
        self.config = config
        self.dist = dist
        if config.device == "cuda":
            index = cuda_index(dist.local_rank, dist.world_size, config.parallel.base_gpu_id)
            torch.cuda.set_device(index)  # Triton launches on the current device
            self.device = torch.device("cuda", index)
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(config.seed)
        with_mtp = config.speculative is not None and config.speculative.uses_mtp
        self.model = build_model(
            config.model, self.device, config.torch_dtype, dist.tp, config.load_format, config.seed,
            with_mtp=with_mtp, fuse_shared_experts=config.enable_shared_experts_fusion,
            fused_qk_norm_rope=config.enable_fused_qk_norm_rope, progress=dist.is_driver,
            attention_backend=config.attention_backend, prefill_attention_backend=config.prefill_attention_backend,
            expert_parallel=config.parallel.enable_expert_parallel,
        )
        self.block_size = config.cache.block_size
        kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, config.torch_dtype)
        # the MTP (NextN) layer has its own KV, layer id num_hidden_layers, in the same pages
        layer_ids = list(range(config.model.num_hidden_layers + (1 if with_mtp else 0)))
        self.num_blocks = min_across_ranks(self._num_kv_blocks(kv_dtype, len(layer_ids)), dist)
        self._check_capacity()
        kv = allocate_kv_caches(config.model, dist.tp, layer_ids, self.num_blocks, self.block_size, kv_dtype, self.device)
        self.kv_worker: KVConnectorWorker | None = None
        if kv_worker_factory is not None:
            self.kv_worker = kv_worker_factory(config, dist.rank)
            self.kv_worker.register(kv, dist.rank)
        table = TokenTable(config.scheduler.max_num_seqs, self.device) if config.overlap_scheduling else None
        self.runner = ModelRunner(self.model, kv, self.device, token_table=table)
        self.runner.decode_max_seq_len = config.scheduler.max_model_len
        self.runner.max_packed_kv = self._max_packed_kv()
        self.runner.prompt_slice_rows = prompt_slice_rows(config.scheduler.max_num_seqs)  # profiled (below)
        if self.device.type == "cuda" and config.kernel_warmup:
            self._warm_up_kernels(kv_dtype)
        if self.device.type == "cuda" and not config.enforce_eager:
            spec = config.speculative
            self.runner.graphs = DecodeGraphs(
                self.model, kv, self.device, min(config.scheduler.max_num_seqs, MAX_GRAPH_BATCH),
                config.scheduler.max_model_len, self.block_size,
                max_drafts=spec.num_speculative_tokens if spec is not None else 0,
            )
            # the draft budget's step cost, measured on this model and GPU (every rank times: graphs all-reduce)
            time = spec is not None and spec.draft_budget and spec.measure_step_cost
            self.runner.graphs.capture(progress=dist.is_driver, time=time)
            if with_mtp:
                self.runner.mtp_graphs = MtpDraftGraphs(
                    self.model, kv, self.device, min(config.scheduler.max_num_seqs, MAX_GRAPH_BATCH),
                    config.scheduler.max_model_len, self.block_size, spec.mtp_chain_length,
                    spec.num_speculative_tokens, config.model.hidden_size, config.torch_dtype,
                )
                self.runner.mtp_graphs.capture(progress=dist.is_driver, time=time)
        if self.device.type == "cuda" and config.prefill_graph_tokens:
            r = self.runner
            r.prefill_graphs = PrefillGraphs(self.model, kv, self.device, config.prefill_graph_tokens, self.block_size,
                                             r.k_scale, r.v_scale, r.max_packed_kv)
            r.prefill_graphs.capture(progress=dist.is_driver)
        # rank 0: why the ranks no longer run steps together (its part of a broadcast step raised), or None
        self.lost_lock_step: str | None = None
        if config.gc_freeze and not dist.is_driver:  # rank 0 freezes once its EngineCore is built
            freeze_startup_heap()

    def measured_step_costs(self) -> StepCosts | None:
        """The draft budget's costs from the graph replays timed at capture: the target step by rows (batch x
        rows per request) and, with MTP draft graphs, the chain as a whole by batch (a draft replay minus the
        extend-only replay of the same shape, averaged over the shapes of that batch). None: not measured."""
        graphs, drafts = self.runner.graphs, self.runner.mtp_graphs
        if graphs is None or not graphs.replay_ms:
            return None
        step = StepCost.measured((b * q, ms) for (b, q), ms in graphs.replay_ms.items())
        if drafts is None or not drafts.replay_ms:
            return StepCosts(step, self.config.speculative.mtp_step_cost_ms)
        by_batch: dict[int, list[float]] = {}
        for (b, q, chain), ms in drafts.replay_ms.items():
            if chain:
                by_batch.setdefault(b, []).append(max(0.0, ms - drafts.replay_ms[(b, q, False)]))
        chain_cost = StepCost.measured((b, sum(v) / len(v)) for b, v in by_batch.items())
        return StepCosts(step, chain_step_ms=0.0, chain_fixed=chain_cost)

    def release_graphs(self) -> None:
        """Destroy the CUDA graphs. Must precede leaving the process group: graphs that captured NCCL
        all-reduces keep the communicator in use, and destroying it under them stalled the shutdown of a TP=2
        engine on 2x H200 indefinitely."""
        r = self.runner
        if r.graphs is not None or r.mtp_graphs is not None or r.prefill_graphs is not None:
            r.graphs = r.mtp_graphs = r.prefill_graphs = None
            gc.collect()
            torch.cuda.synchronize(self.device)

    def _num_kv_blocks(self, kv_dtype: torch.dtype, num_layers: int) -> int:
        cc, bs = self.config.cache, self.block_size
        max_len = self.config.scheduler.max_model_len
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type == "cuda":
            weights = torch.cuda.memory_allocated(self.device)
            peak = self._profile_peak_memory(kv_dtype)
            if self.config.prefill_graph_tokens:  # the piecewise graphs' pool keeps a step's activations for good
                largest = min(self.config.scheduler.max_num_batched_tokens, max_len)
                peak += int((peak - weights) * min(1.0, self.config.prefill_graph_tokens / largest))
            _, total = torch.cuda.mem_get_info(self.device)
            peak += self._prefill_workspace_bytes(kv_dtype)
            budget = cc.mem_fraction_static * total - peak - GRAPH_AND_COMM_RESERVE
            per_block = kv_bytes_per_token(self.config.model, self.dist.tp, kv_dtype, num_layers) * bs
            log.info("memory: total %.1f GiB, weights+activation peak %.1f GiB, KV budget %.1f GiB",
                     total / 2**30, peak / 2**30, budget / 2**30)
            return max(0, int(budget // per_block))
        return -(-max(2 * max_len, 32768) // bs)

    def _prefill_kernel(self, kv_dtype: torch.dtype) -> str:
        """triton / sdpa / fa4: what runs the attention of this worker's prefill steps."""
        backend = resolve_prefill_attention_backend(self.config.prefill_attention_backend, self.device)
        return prefill_kernel(backend, kv_dtype, self.config.torch_dtype)

    def _max_packed_kv(self) -> int:
        """Keys a prefill step may gather into packed K/V (FA4's gathered path): one sequence's longest context."""
        backend = resolve_prefill_attention_backend(self.config.prefill_attention_backend, self.device)
        return self.config.scheduler.max_model_len if backend == "fa4" else 0

    def _prefill_workspace_bytes(self, kv_dtype: torch.dtype) -> int:
        """What prefill attention needs at the longest context beyond the profiling step (a chunk without a
        cached prefix): the SDPA path's K/V gather grows with the context (~0.9 GB at 200K tokens with 8 KV
        heads), as do FA4's packed K/V (up to _max_packed_kv keys); FA4 over the pages needs nothing."""
        mc, sc, dtype = self.config.model, self.config.scheduler, self.config.torch_dtype
        heads = HeadPartition.build(mc.num_attention_heads, mc.num_key_value_heads, self.dist.tp)
        need = packed_kv.workspace_bytes(self._max_packed_kv(), heads.num_kv_heads, mc.head_dim, dtype, kv_dtype)
        if self._prefill_kernel(kv_dtype) == "sdpa":
            need = max(need, sdpa_prefill.workspace_bytes(sc.max_num_batched_tokens, sc.max_model_len,
                                                          heads.num_heads, heads.num_kv_heads, mc.head_dim, dtype))
        return need

    @torch.inference_mode()
    def _profile_peak_memory(self, kv_dtype: torch.dtype) -> int:
        """Peak bytes allocated by the weights plus the largest step (max_num_batched_tokens tokens), measured
        with a throwaway forward over a temporary KV cache just big enough for it."""
        sc = self.config.scheduler
        n = min(sc.max_num_batched_tokens, sc.max_model_len)
        bs = self.block_size
        blocks = -(-n // bs)
        layers = list(range(self.config.model.num_hidden_layers))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        kv = allocate_kv_caches(self.config.model, self.dist.tp, layers, blocks, bs, kv_dtype, self.device)
        slice_rows = prompt_slice_rows(sc.max_num_seqs)
        last_rows = list(range(n - min(n, sc.max_num_seqs), n))
        scored_rows = list(range(n - min(n, slice_rows), n))
        inp = StepInputs(
            input_ids=[0] * n, positions=list(range(n)), slot_mapping=list(range(n)),
            block_tables=BlockTables.build([range(blocks)]), seq_lens=[n], query_start_loc=[0, n],
            logits_rows=last_rows,  # a step's sampled rows, and one slice of prompt-logprob rows scored beside them
            prompt=PromptRows(scored_rows, [0] * len(scored_rows), MAX_LOGPROBS),
        )
        runner = ModelRunner(self.model, kv, self.device)
        runner.prompt_slice_rows = slice_rows
        runner.run(inp)
        del runner
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv.values())
        del kv
        torch.cuda.empty_cache()
        return peak - kv_bytes

    @torch.inference_mode()
    def _warm_up_kernels(self, kv_dtype: torch.dtype) -> None:
        """Compile every launch variant a serving step can select, before any request (engine/kernel_warmup.py):
        eager steps over page 0 of the KV cache, the same on every rank."""
        sc, mc = self.config.scheduler, self.config.model
        heads = HeadPartition.build(mc.num_attention_heads, mc.num_key_value_heads, self.dist.tp)
        shape = AttentionShape(heads.num_kv_heads, heads.num_heads // heads.num_kv_heads, mc.head_dim,
                               kv_dtype == torch.float8_e4m3fn,
                               torch.cuda.get_device_properties(self.device).multi_processor_count)
        sdpa = self._prefill_kernel(kv_dtype) == "sdpa"
        steps = warmup_steps(sc.max_num_batched_tokens, sc.max_num_seqs, sc.max_model_len, shape,
                             sdpa_prefill.sdpa_from_tokens(heads.num_heads) if sdpa else None)
        # FA4 compiles a kernel per configuration, not per length (kernels/fa4_prefill.py). The prompts above compile
        # its batch entry point (a prompt alone over its own K/V; with an FP8 cache, the values the cache holds);
        # a step that attends cached keys compiles its page-table one or the SDPA path's plans (FP8 pages; packed
        # K/V off in this loop), then, below, its packed one (and the gather)
        fa4_q = min(sc.max_num_batched_tokens, sc.max_model_len - 1)
        fa4_cached = WarmupStep(1, fa4_q, fa4_q + 1)  # one cached key: >= 1,024 pairs per key from 2,048 tokens
        fa4 = self.runner.max_packed_kv > 0 and fa4_prefill.takes(fa4_q)
        steps += [fa4_cached] if fa4 else []
        start = time.perf_counter()
        packed, self.runner.max_packed_kv = self.runner.max_packed_kv, 0
        try:
            for step in steps:
                self.runner.run(step_inputs(step, self.block_size, self.num_blocks))
        finally:
            self.runner.max_packed_kv = packed
        if fa4:
            self.runner.run(step_inputs(fa4_cached, self.block_size, self.num_blocks))
        torch.cuda.synchronize(self.device)
        if self.dist.is_driver:
            log.info("kernel warm-up: %d steps in %.1f s", len(steps), time.perf_counter() - start)

    def _check_capacity(self) -> None:
        max_len = self.config.scheduler.max_model_len
        need = -(-max_len // self.block_size)
        if self.num_blocks < need:
            raise RuntimeError(
                f"the KV cache holds {self.num_blocks} pages ({self.num_blocks * self.block_size} tokens), fewer "
                f"than one request of max_model_len={max_len} needs ({need} pages); lower max_model_len or give the "
                f"KV cache more memory (num_kv_blocks / mem_fraction_static)"
            )

    def execute(self, inp: StepInputs, prev_tokens: torch.Tensor | None = None) -> StepOutput:
        """Rank 0: send the step to the other ranks, then run it here too. `prev_tokens`: the previous step's
        sampled tokens (device tensor), sent to the other ranks on the model group when the step records them
        in the token table."""
        if self.dist.world_size == 1:
            return self._run(inp, prev_tokens)

        def run() -> StepOutput:
            tokens = self._broadcast_tokens(len(inp.table_writes), prev_tokens) if inp.table_writes else None
            return self._run(inp, tokens)

        return self._on_every_rank(inp, run)

    def check_lock_step(self) -> None:
        if self.lost_lock_step is not None:
            raise RuntimeError(f"the tensor-parallel ranks are out of lock step since rank 0 failed inside a step "
                               f"({self.lost_lock_step}); the engine must be restarted")

    def _on_every_rank(self, message: Any, run: Callable[[], T]) -> T:
        """Rank 0 under TP: broadcast `message`, then run(), this rank's part of it. If that raises, the other
        ranks may be inside the step's collectives, waiting for this rank: from then on every call refuses at once
        instead of pairing its collectives with theirs (a wait for the collective timeout, or wrong results)."""
        self.check_lock_step()
        try:
            broadcast_object(message, self.dist)
            return run()
        except BaseException as exc:  # KeyboardInterrupt too: the other ranks run the step all the same
            self.lost_lock_step = f"{type(exc).__name__}: {exc}"
            raise

    def _run(self, inp: StepInputs, prev_tokens: torch.Tensor | None) -> StepOutput:
        out = self.runner.run(inp, prev_tokens)
        if inp.kv_sends:  # the forward that writes these pages is enqueued: the transfer thread takes over
            self.kv_worker.after_forward(inp.kv_sends)
        return out

    def connector_call(self, message: Any) -> list[Any]:
        """Rank 0: the KV connector worker's handle(message) on every rank; results in rank order."""
        if self.dist.world_size == 1:
            results = [self._handle_connector(message)]
        else:
            results = self._on_every_rank(
                ConnectorCall(message), lambda: gather_objects(self._handle_connector(message), self.dist))
        errors = [f"rank {r}: {res.message}" for r, res in enumerate(results) if isinstance(res, ConnectorError)]
        if errors:
            raise RuntimeError("; ".join(errors))
        return results

    def _handle_connector(self, message: Any) -> Any:
        """A failing handler is an answer, not a dead rank (a rank that raised would leave rank 0 in gather)."""
        try:
            return self.kv_worker.handle(message)
        except Exception as exc:
            log.exception("KV connector message %s failed", type(message).__name__)
            return ConnectorError(f"{type(exc).__name__}: {exc}")

    def close_connector(self) -> None:
        if self.kv_worker is not None:
            self.kv_worker.close()

    def execute_mtp(self, batch: MtpBatch) -> torch.Tensor:
        """Rank 0: one NextN-layer forward on every rank (the drafter's model calls); rank 0's logits."""
        if self.dist.world_size > 1:
            return self._on_every_rank(batch, lambda: self.runner.run_mtp(batch))
        return self.runner.run_mtp(batch)

    def mtp_graph_rows(self, batch: int, max_kept: int) -> int:
        """Rows per request of a captured MTP draft graph for `batch` requests keeping up to max_kept
        positions each; 0: draft eagerly."""
        return self.runner.mtp_graph_rows(batch, max_kept)

    def execute_mtp_draft(self, batch: MtpDraftBatch) -> list[list[int]]:
        """Rank 0: the step's whole NextN draft in one graph replay on every rank; the drafts."""
        if self.dist.world_size > 1:
            return self._on_every_rank(batch, lambda: self.runner.run_mtp_draft(batch))
        return self.runner.run_mtp_draft(batch)

    def _broadcast_tokens(self, n: int, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:
            tokens = torch.empty(n, dtype=torch.long, device=self.device)
        tokens = tokens[:n].to(device=self.device, dtype=torch.long).contiguous()
        torch.distributed.broadcast(tokens, src=0, group=self.dist.tp.group)
        return tokens

    def graph_rows_for(self, batch: int, max_chain: int) -> int:
        """Rows per request to pad an all-decode/verify step of `batch` requests to, so that a captured CUDA
        graph runs it; 0 when none does (run eagerly, unpadded)."""
        graphs = self.runner.graphs
        return graphs.padded_rows(batch, max_chain) if graphs is not None else 0

    def send_control(self, message: str) -> None:
        if self.dist.world_size > 1:
            self._on_every_rank(message, lambda: None)

    def serve_forever(self, until: str = STOP) -> None:
        """Ranks > 0: execute broadcast steps until `until` (or STOP) arrives."""
        while True:
            msg = broadcast_object(None, self.dist, wait=IDLE_WAIT)  # rank 0 may be idle for long
            if isinstance(msg, StepInputs):
                prev = self._broadcast_tokens(len(msg.table_writes), None) if msg.table_writes else None
                self._run(msg, prev)
            elif isinstance(msg, ConnectorCall):
                gather_objects(self._handle_connector(msg.message), self.dist)
            elif isinstance(msg, MtpBatch):
                self.runner.run_mtp(msg)
            elif isinstance(msg, MtpDraftBatch):
                self.runner.run_mtp_draft(msg)
            elif msg == STOP or msg == until:
                return
            else:
                raise RuntimeError(f"unexpected control message {msg!r}")


def leave_process_group(worker: ModelWorker | None) -> None:
    """Drop the worker's CUDA graphs, then leave the process group (that order: see release_graphs)."""
    if worker is not None:
        worker.close_connector()
        worker.release_graphs()
    shutdown_distributed()


def spawned_worker_main(
    rank: int, world_size: int, init_method: str, config: EngineConfig, kv_worker_factory: KVWorkerFactory | None = None
) -> None:
    """Entry point of a TP rank the engine started itself (multiprocessing spawn)."""
    logging.basicConfig(level=logging.WARNING)
    info = init_distributed(world_size, config.device, rank=rank, init_method=init_method,
                            parallel=config.parallel)
    worker = None
    try:
        worker = ModelWorker(config, info, kv_worker_factory)
        worker.serve_forever()
    finally:
        leave_process_group(worker)
