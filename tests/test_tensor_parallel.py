"""Tensor parallelism on CPU (gloo): TP=2 equals TP=1, spawned by the engine and under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed

import engine.distributed as dist_mod
from engine import LLM, SamplingParams
from engine.distributed import free_port
from engine.model_runner import ModelRunner
from model.moe import MoE
from model.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [{"prompt_token_ids": list(range(10, 60))}, {"prompt_token_ids": [5, 7, 9]}]


@pytest.fixture(scope="module", params=[2, 1], ids=["2kv", "1kv-replicated"])
def ckpt(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "c", fmt="fp8-channel",
                                 num_key_value_heads=request.param)


@pytest.fixture(scope="module")
def reference(ckpt):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    llm = LLM(str(ckpt), device="cpu")
    return llm.generate(PROMPTS, sp, use_tqdm=False)


@pytest.mark.parametrize("overlap,fusion", [(False, False), (True, False), (True, True)],
                         ids=["sync", "overlap", "overlap-fused-allreduce"])
def test_spawned_tp2_equals_tp1(ckpt, reference, overlap, fusion):
    # overlap: the next step's input tokens reach rank 1 through a broadcast on the model group. fusion: every
    # all-reduce of up to 512 KiB runs the one-shot kernel (under the interpreter, over /dev/shm buffers),
    # fused with the norm after it; prefill chunks too, at these sizes
    llm = LLM(str(ckpt), device="cpu", tensor_parallel_size=2, overlap_scheduling=overlap,
              allreduce_fusion=fusion)
    try:
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
        for a, b in zip(reference, outs):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert da.keys() == db.keys() and all(abs(da[k].logprob - db[k].logprob) <= 1e-4 for k in da)
            for da, db in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert all(abs(da[k].logprob - db[k].logprob) <= 1e-4 for k in da)
        assert llm.stats()["used_kv_blocks"] == 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("fuse_shared", [False, True], ids=["shared-tp", "shared-fused"])
def test_spawned_tp2_expert_parallel_equals_tp1(ckpt, reference, fuse_shared):
    # each rank holds 4 of the 8 routed experts whole and routes every token (ids of the other rank's experts ->
    # -1); the shared expert is tensor parallel, or fused: whole on both ranks, token t's pair on rank t % 2
    llm = LLM(str(ckpt), device="cpu", tensor_parallel_size=2, enable_expert_parallel=True,
              enable_shared_experts_fusion=fuse_shared)
    try:
        moe = next(m for m in llm.engine.worker.model.modules() if isinstance(m, MoE))
        assert (moe.partition.start, moe.partition.count) == (0, 4)
        assert moe.experts.w13.shape[0] == 4 + fuse_shared and (moe.shared_experts is None) == fuse_shared
        assert moe.partition.width == llm.engine.config.model.moe_intermediate_size
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
        for a, b in zip(reference, outs):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert da.keys() == db.keys() and all(abs(da[k].logprob - db[k].logprob) <= 1e-4 for k in da)
        assert llm.stats()["used_kv_blocks"] == 0
    finally:
        llm.shutdown()


def test_expert_parallel_needs_experts_divisible_by_tp(ckpt):
    with pytest.raises(ValueError, match="enable_expert_parallel.*8 routed experts.*3"):
        LLM(str(ckpt), device="cpu", tensor_parallel_size=3, enable_expert_parallel=True)


def test_torchrun_tp2_equals_tp1(ckpt, reference, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = tmp_path / "out.json"
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "tests/scripts/tp_offline.py"), str(ckpt), str(out), "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    ref_tokens = [o.outputs[0].token_ids for o in reference]
    assert got["tokens"] == ref_tokens + ref_tokens[:1]
    for ref, lps in zip(reference, got["logprobs"]):
        want = [lp[t].logprob for t, lp in zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs)]
        assert max(abs(a - b) for a, b in zip(want, lps)) <= 1e-4


def test_dead_rank_brings_the_group_down(tiny_bf16):
    llm = LLM(str(tiny_bf16), device="cpu", tensor_parallel_size=2)
    try:
        for p in llm.engine._procs:
            os.kill(p.pid, 9)
            p.join(5)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 .* exited|rank died"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - t0 < 30
    finally:
        t0 = time.monotonic()
        llm.shutdown()  # with a dead rank: no stop message, the group still torn down
        assert time.monotonic() - t0 < 15
    import torch.distributed as dist

    assert not dist.is_initialized()
    # and a new tensor-parallel engine starts and works in the same process
    again = LLM(str(tiny_bf16), device="cpu", tensor_parallel_size=2, max_model_len=256, num_kv_blocks=64)
    try:
        assert again.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    finally:
        again.shutdown()


def test_shutdown_drops_graphs_before_the_process_group(tiny_bf16, monkeypatch):
    """CUDA graphs that captured NCCL all-reduces must be destroyed before the group is (a TP=2 shutdown with
    them alive stalled on 2x H200). On CPU there are no graphs: check the order of the two steps on rank 0."""
    import engine.model_worker as worker_mod
    from engine.model_worker import ModelWorker

    llm = LLM(str(tiny_bf16), device="cpu", tensor_parallel_size=2, max_model_len=256, num_kv_blocks=64)
    events: list[str] = []
    sentinel = object()
    llm.engine.worker.runner.graphs = sentinel  # stands in for captured graphs
    real_release, real_shutdown = ModelWorker.release_graphs, worker_mod.shutdown_distributed

    def release(self):
        events.append("graphs" if self.runner.graphs is sentinel else "no graphs")
        self.runner.graphs = None  # (the real method also synchronizes the CUDA device)
        real_release(self)

    monkeypatch.setattr(ModelWorker, "release_graphs", release)
    monkeypatch.setattr(worker_mod, "shutdown_distributed", lambda *a: (events.append("group"), real_shutdown(*a)))
    llm.shutdown()
    assert events == ["graphs", "group"]
    assert llm.engine.worker.runner.graphs is None


def test_existing_process_group_is_a_clear_error(tiny_bf16):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="process group already exists"):
            LLM(str(tiny_bf16), device="cpu", tensor_parallel_size=2, max_model_len=256, num_kv_blocks=64)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method,prompt,counter", [
    # suffix: verify steps with accepted drafts and rollbacks on both ranks
    ("suffix", [11, 12, 13, 14, 15, 16] * 6, "spec_accepted_tokens"),
    # mtp: the NextN layer is sharded like the main model; every rank runs the extend and chain forwards
    ("mtp", list(range(40, 75)), "spec_draft_tokens"),
])
def test_spawned_tp2_speculation_equals_tp1_plain(ckpt, method, prompt, counter):
    prompts = [{"prompt_token_ids": prompt}, {"prompt_token_ids": list(range(200, 230))}]
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ref = LLM(str(ckpt), device="cpu").generate(prompts, sp, use_tqdm=False)
    # mtp with the fused all-reduce and expert parallelism: verify chains and the NextN layer's extend / chain steps
    # through them too (the NextN layer's MoE holds half the experts on each rank)
    llm = LLM(str(ckpt), device="cpu", tensor_parallel_size=2, allreduce_fusion=method == "mtp",
              enable_expert_parallel=method == "mtp",
              speculative_config={"method": method, "num_speculative_tokens": 4})
    try:
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
        stats = llm.stats()
        assert stats[counter] > 0 and stats["used_kv_blocks"] == 0
    finally:
        llm.shutdown()


def test_idle_spawned_ranks_outlive_the_collective_timeout(tiny_bf16, monkeypatch):
    """Ranks > 0 wait for rank 0's next step for as long as the engine is idle (no request for minutes is normal);
    the collective timeout bounds only the collectives of a step. It used to bound that wait too: an engine left
    idle for GLINT_DIST_TIMEOUT_S (120 s) lost its ranks and failed every later request."""
    monkeypatch.setenv("GLINT_DIST_TIMEOUT_S", "3")  # read by the spawned ranks when they import the engine
    llm = LLM(str(tiny_bf16), device="cpu", tensor_parallel_size=2, max_model_len=256, num_kv_blocks=64)
    try:
        sp = SamplingParams(temperature=0, max_tokens=2)
        first = llm.generate(PROMPTS[:1], sp, use_tqdm=False)[0].outputs[0].token_ids
        time.sleep(6)  # idle for twice the ranks' collective timeout
        llm.engine.check_health()
        assert llm.generate(PROMPTS[:1], sp, use_tqdm=False)[0].outputs[0].token_ids == first
    finally:
        llm.shutdown()


@pytest.mark.parametrize("where", ["forward", "mtp"])
def test_rank0_fault_inside_a_step_fails_fast_not_a_hang(tiny_bf16, monkeypatch, where):
    """Rank 0 raises in its own part of a step that rank 1 already runs (rank 1 now waits in the step's collectives
    for it): the ranks are out of lock step. Every later step (and MTP's per-request retry of a failed draft) must
    fail at once with that reason, health checks too, and shutdown must not wait for rank 1 to finish the step.
    It used to broadcast the next step into the stuck rank and wait for the collective timeout (120 s)."""
    monkeypatch.setattr(dist_mod, "COLLECTIVE_TIMEOUT", timedelta(seconds=20))  # rank 0's groups: a hang -> failure
    spec = {"method": "mtp", "num_speculative_tokens": 2} if where == "mtp" else None
    llm = LLM(str(tiny_bf16), device="cpu", tensor_parallel_size=2, max_model_len=256, num_kv_blocks=64,
              speculative_config=spec)
    try:
        def fault(*args, **kwargs):  # rank 0 only: the spawned rank runs the real method
            raise RuntimeError("injected rank-0 fault")

        monkeypatch.setattr(ModelRunner, "run" if where == "forward" else "run_mtp", fault)
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        t0 = time.monotonic()
        try:
            outs = llm.generate(PROMPTS, sp, use_tqdm=False)
            assert all(o.outputs[0].finish_reason == "error" for o in outs)  # MTP: failed while drafting
        except RuntimeError as exc:
            assert "injected rank-0 fault" in str(exc)
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match="out of lock step"):
            llm.generate(PROMPTS, sp, use_tqdm=False)
        with pytest.raises(RuntimeError, match="out of lock step"):
            llm.engine.check_health()
        assert time.monotonic() - t0 < 10
    finally:
        t0 = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - t0 < 10
    assert not torch.distributed.is_initialized()
