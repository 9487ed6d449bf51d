"""What every TP rank runs: its model shard, its KV cache and the runner. Rank 0 (inside EngineCore)
broadcasts each step's inputs; the other ranks sit in `serve_forever` and execute them."""
from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig
from engine.distributed import DistInfo, broadcast_object, min_across_ranks
from engine.kv_cache import allocate_kv_caches, kv_bytes_per_token, kv_cache_dtype
from engine.model_runner import ModelRunner, StepInputs
from model.builder import build_model

log = logging.getLogger(__name__)

STOP = "stop"  # control message: leave the worker loop
END_OF_CALL = "end_of_call"  # control message: rank 0's generate() returned (torchrun offline scripts)


class ModelWorker:
    def __init__(self, config: EngineConfig, dist: DistInfo) -> None:
        self.config = config
        self.dist = dist
        if config.device == "cuda":
            self.device = torch.device("cuda", dist.local_rank if dist.world_size > 1 else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(config.seed)
        self.model = build_model(
            config.model, self.device, config.torch_dtype, dist.tp, config.load_format, config.seed,
            with_mtp=False, progress=dist.is_driver,
        )
        self.block_size = config.cache.block_size
        kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, config.torch_dtype)
        layer_ids = list(range(config.model.num_hidden_layers))
        self.num_blocks = min_across_ranks(self._num_kv_blocks(kv_dtype, len(layer_ids)), dist)
        self._check_capacity()
        kv = allocate_kv_caches(config.model, dist.tp, layer_ids, self.num_blocks, self.block_size, kv_dtype, self.device)
        self.runner = ModelRunner(self.model, kv, self.device)

    def _num_kv_blocks(self, kv_dtype: torch.dtype, num_layers: int) -> int:
        cc, bs = self.config.cache, self.block_size
        max_len = self.config.scheduler.max_model_len
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1.0 - cc.mem_fraction_static) * total
            per_block = kv_bytes_per_token(self.config.model, self.dist.tp, kv_dtype, num_layers) * bs
            return max(0, int(budget // per_block))
        return -(-max(2 * max_len, 32768) // bs)

    def _check_capacity(self) -> None:
        max_len = self.config.scheduler.max_model_len
        need = -(-max_len // self.block_size)
        if self.num_blocks < need:
            raise RuntimeError(
                f"the KV cache holds {self.num_blocks} pages ({self.num_blocks * self.block_size} tokens), fewer "
                f"than one request of max_model_len={max_len} needs ({need} pages); lower max_model_len or give the "
                f"KV cache more memory (num_kv_blocks / mem_fraction_static)"
            )

    def execute(self, inp: StepInputs) -> torch.Tensor:
        """Rank 0: send the step to the other ranks, then run it here too."""
        if self.dist.world_size > 1:
            broadcast_object(inp, self.dist)
        return self.runner.run(inp)

    def send_control(self, message: str) -> None:
        if self.dist.world_size > 1:
            broadcast_object(message, self.dist)

    def serve_forever(self, until: str = STOP) -> None:
        """Ranks > 0: execute broadcast steps until `until` (or STOP) arrives."""
        while True:
            msg = broadcast_object(None, self.dist)
            if isinstance(msg, StepInputs):
                self.runner.run(msg)
            elif msg == STOP or msg == until:
                return
            else:
                raise RuntimeError(f"unexpected control message {msg!r}")


def spawned_worker_main(rank: int, world_size: int, init_method: str, config: EngineConfig) -> None:
    """Entry point of a TP rank the engine started itself (multiprocessing spawn)."""
    from engine.distributed import init_distributed, shutdown_distributed

    logging.basicConfig(level=logging.WARNING)
    info = init_distributed(world_size, config.device, rank=rank, init_method=init_method)
    try:
        ModelWorker(config, info).serve_forever()
    finally:
        shutdown_distributed()
