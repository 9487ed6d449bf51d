"""Tensor-parallel ranks for an engine on rank 0: join torchrun's group, or spawn ranks 1..N-1 ourselves;
check that they are alive; stop them in order."""
from __future__ import annotations

import multiprocessing as mp
import os

import torch

from engine.config import EngineConfig
from engine.distributed import DistInfo, free_port, init_distributed, launched_by_torchrun, single_process
from engine.model_worker import STOP, KVWorkerFactory, ModelWorker, leave_process_group, spawned_worker_main
from engine.spawn_guard import refuse_while_bootstrapping, run_started, wait_until_started


def start_ranks(
    config: EngineConfig, kv_worker_factory: KVWorkerFactory | None = None
) -> tuple[DistInfo, list[mp.Process]]:
    """TP > 1: join torchrun's group as rank 0, or spawn ranks 1..N-1 (returned, to be stopped later)."""
    world = config.parallel.tensor_parallel_size
    if world == 1:
        return single_process(), []
    if launched_by_torchrun():
        info = init_distributed(world, config.device, parallel=config.parallel)
        if not info.is_driver:
            raise RuntimeError("EngineCore runs on rank 0 only; other ranks run ModelWorker.serve_forever()")
        return info, []
    if torch.distributed.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group already exists in this process (an earlier tensor-parallel LLM "
            "that was not shut down, or the caller's own); call llm.shutdown() first, or launch with torchrun"
        )
    refuse_while_bootstrapping()
    port = int(os.environ.get("GLINT_DIST_PORT") or free_port())  # default: a free port (many instances/host)
    init_method = f"tcp://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    procs, started = [], []
    for rank in range(1, world):
        started.append(ctx.Event())
        args = (started[-1], spawned_worker_main, rank, world, init_method, config, kv_worker_factory)
        p = ctx.Process(target=run_started, args=args, daemon=True)
        p.start()
        procs.append(p)
    try:
        wait_until_started(procs, started)  # a rank that dies while booting never joins the rendezvous
    except RuntimeError:
        for p in procs:
            p.kill()
            p.join(5)
        raise
    return init_distributed(world, config.device, rank=0, init_method=init_method,
                            parallel=config.parallel), procs


def check_ranks_alive(procs: list[mp.Process]) -> None:
    for rank, p in enumerate(procs, start=1):
        if p.exitcode is not None:
            raise RuntimeError(f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}")


def stop_ranks(worker: ModelWorker, procs: list[mp.Process]) -> None:
    """Stop spawned ranks and leave the process group. Under torchrun the other ranks are the user's
    processes: they serve only inside generate() calls, so there is nothing to stop."""
    all_alive = all(p.is_alive() for p in procs)
    left = False
    try:
        if all_alive:
            worker.send_control(STOP)
            # NCCL's group teardown waits for every rank: leave together with the ranks, then reap them
            # (leaving after the join cost the join's full 30 s timeout on 2x H200).
            left = True
            leave_process_group(worker)
    except RuntimeError:
        all_alive = False  # a rank went away meanwhile: the others cannot finish the collective either
    finally:
        for p in procs:
            p.join(timeout=30 if all_alive else 1)
            if p.is_alive():
                p.kill()
                p.join(5)
        if not left:
            leave_process_group(worker)  # also after a dead rank: a stale group would hang the next engine
