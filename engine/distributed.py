"""Process groups for tensor parallelism: torchrun ranks or ranks spawned by the engine itself.

One group carries the model's collectives (NCCL on CUDA, gloo on CPU, so TP is testable on a laptop); a
second, always-gloo group carries the control plane (rank 0 broadcasts each step's plan)."""
from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.config import ParallelConfig
from model import one_shot_allreduce
from model.parallel import TPGroup

# Collectives that never complete (a peer died) fail after this long instead of hanging forever.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("GLINT_DIST_TIMEOUT_S", "120")))
# Ranks > 0 waiting for rank 0's next step: an engine may be idle for hours. Not unbounded (gloo adds it to a clock in
# nanoseconds); a dead rank 0 still ends the wait at once (its sockets close).
IDLE_WAIT = timedelta(days=365)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: TPGroup
    control: Any  # gloo ProcessGroup for the control plane (None when world_size == 1)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def single_process() -> DistInfo:
    return DistInfo(0, 1, 0, TPGroup(), None)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_index(local_rank: int, world_size: int, base_gpu_id: int | None) -> int:
    """The CUDA device a rank runs on: base_gpu_id + its local rank; without a base, its local rank under TP and
    the current device alone."""
    if base_gpu_id is not None:
        return base_gpu_id + local_rank
    return local_rank if world_size > 1 else torch.cuda.current_device()


def init_distributed(
    world_size: int, device_type: str, rank: int | None = None, init_method: str | None = None,
    parallel: ParallelConfig = ParallelConfig(),
) -> DistInfo:
    """Join (or create) the default process group. Under torchrun rank/address come from the environment.
    `parallel`: which GPU rank 0 takes (base_gpu_id) and whether the model's all-reduces go through the fused
    one-shot kernel (allreduce_fusion, CUDA only)."""
    if world_size == 1:
        return single_process()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (see the device notes)
    if not dist.is_initialized():
        if rank is None:
            rank = int(os.environ["RANK"])
            env_world = int(os.environ["WORLD_SIZE"])
            if env_world != world_size:
                raise ValueError(
                    f"tensor_parallel_size={world_size} but torchrun started {env_world} processes "
                    f"(use --nproc-per-node {world_size})"
                )
            init_method = "env://"
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(cuda_index(int(os.environ.get("LOCAL_RANK", rank)), world_size,
                                             parallel.base_gpu_id))
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    model_group = dist.new_group(list(range(world_size)))
    control = dist.new_group(list(range(world_size)), backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    one_shot = None
    if parallel.allreduce_fusion and one_shot_allreduce.available(device_type):
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        one_shot = one_shot_allreduce.OneShotAllReduce(model_group, rank, world_size, device)
    return DistInfo(rank, world_size, local_rank, TPGroup(rank, world_size, model_group, one_shot), control)


def broadcast_object(obj: Any, info: DistInfo, wait: timedelta | None = None) -> Any:
    """Rank 0 sends `obj`; every rank returns it. `wait`: how long the other ranks wait for rank 0 to send (default
    the collective timeout); once it did, the object itself arrives within the collective timeout."""
    size = torch.zeros(1, dtype=torch.long)
    data = None
    if info.is_driver:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size[0] = data.numel()
    _broadcast(size, info, wait)
    if data is None:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    _broadcast(data, info, None)
    return obj if info.is_driver else pickle.loads(data.numpy().tobytes())


def _broadcast(t: torch.Tensor, info: DistInfo, timeout: timedelta | None) -> None:
    """dist.broadcast from rank 0 on the control group, with this call's own timeout (dist.broadcast has none)."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    if timeout is not None:
        opts.timeout = timeout
    info.control.broadcast([t], opts).wait()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank contributes `obj`; rank 0 returns them in rank order (the others get [])."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_driver else None
    dist.gather_object(obj, out, dst=0, group=info.control)
    return out if out is not None else []


def min_across_ranks(value: int, info: DistInfo) -> int:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=info.control)
    return int(t.item())


def shutdown_distributed(info: DistInfo | None = None) -> None:
    """Leave the process group; with `info`, first wait (bounded) until every rank got here, so no rank tears
    down its sockets while a peer still talks to it."""
    if not dist.is_initialized():
        return
    if info is not None and info.control is not None:
        try:
            dist.monitored_barrier(group=info.control, timeout=timedelta(seconds=30))
        except RuntimeError:
            pass  # a peer is gone already: nothing left to coordinate with
    dist.destroy_process_group()
