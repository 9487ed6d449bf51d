"""The one-shot all-reduce kernel (kernels/triton_allreduce.py) on CPU: W forked processes play the W ranks,
each running the kernel under the Triton interpreter on buffers and flag areas in shared memory (mapped at the
same address in every process, so the address tables are the same as on GPUs with peer mappings). The ranks
really run concurrently, so the barriers are exercised: one rank starts each call late and the buffers start
as NaN, so a rank that read a peer's rows before the peer wrote them would return NaN."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from kernel_helpers import fp8_mismatch
from kernels.allreduce import all_reduce_add_rms_norm_ref, all_reduce_ref
from kernels.quant import quant_fp8_per_token_ref
from kernels.triton_allreduce import MAX_PROGRAMS, flag_area_ints, one_shot_all_reduce, one_shot_all_reduce_add_rms_norm

# the calls every rank makes in order: (kind, rows); consecutive calls reuse the buffers and flags
CALLS = [("plain", 3), ("norm", 5), ("quant", 2), ("plain", 1), ("norm", 5)]
# more rows than programs: program p also owns rows p + 64, ...
LONG_CALLS = [("norm", MAX_PROGRAMS + 6), ("plain", MAX_PROGRAMS + 1)]


def _shared(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(n, dtype=dtype).share_memory_()


def _run_ranks(world: int, dtype: torch.dtype, hidden: int, late_rank: int,
               calls: list[tuple[str, int]] = CALLS) -> tuple[list, list, list, list]:
    torch.manual_seed(world * 7 + hidden)
    rows = max(t for _, t in calls)
    buffers = [_shared(rows * hidden, dtype).fill_(float("nan")) for _ in range(world)]
    flags = [_shared(flag_area_ints(world), torch.int32).zero_() for _ in range(world)]
    parts = [[torch.randn(t, hidden).to(dtype) for _ in range(world)] for _, t in calls]
    residuals = [torch.randn(t, hidden).to(dtype) for _, t in calls]
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    # per rank and call: y, summed (norm calls), fp8 bits and scale (quant calls)
    outs = _shared(world * len(calls) * 3 * rows * hidden, torch.float32).view(world, len(calls), 3, rows, hidden)
    scales = _shared(world * len(calls) * rows, torch.float32).view(world, len(calls), rows)

    def rank_main(rank: int) -> None:
        buf_table = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
        flag_table = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
        for c, (kind, t) in enumerate(calls):
            if rank == late_rank:
                time.sleep(0.2)
            x = parts[c][rank]
            if kind == "plain":
                outs[rank, c, 0, :t] = one_shot_all_reduce(x, buf_table, flag_table, rank, world).float()
                continue
            y, s, q = one_shot_all_reduce_add_rms_norm(
                x, buf_table, flag_table, rank, world, residuals[c], weight, 1e-5, kind == "quant")
            outs[rank, c, 0, :t], outs[rank, c, 1, :t] = y.float(), s.float()
            if q is not None:
                outs[rank, c, 2, :t] = q[0].view(torch.uint8).float()
                scales[rank, c, :t] = q[1][:, 0]

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r,)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed or hung"
    return parts, residuals, weight, [outs, scales, flags]


@pytest.mark.parametrize("world,dtype,hidden,calls", [
    (2, torch.bfloat16, 96, CALLS), (4, torch.bfloat16, 64, CALLS), (4, torch.float32, 40, CALLS),
    (2, torch.bfloat16, 16, LONG_CALLS)], ids=["2-bf16", "4-bf16", "4-fp32", "2-rows-over-programs"])
def test_every_rank_gets_the_reference_sum_and_norm(world, dtype, hidden, calls):
    parts, residuals, weight, (outs, scales, flags) = _run_ranks(world, dtype, hidden, world - 1, calls)
    for c, (kind, t) in enumerate(calls):
        for rank in range(world):
            y = outs[rank, c, 0, :t]
            if kind == "plain":
                torch.testing.assert_close(y, all_reduce_ref(parts[c]).float(), rtol=0, atol=0)
                continue
            y_ref, s_ref = all_reduce_add_rms_norm_ref(parts[c], residuals[c], weight, 1e-5)
            torch.testing.assert_close(outs[rank, c, 1, :t], s_ref.float(), rtol=0, atol=0)
            torch.testing.assert_close(y, y_ref.float(), rtol=0, atol=1e-6)
            if kind == "quant":
                q_ref, s_ref = quant_fp8_per_token_ref(y_ref)
                assert fp8_mismatch(outs[rank, c, 2, :t].to(torch.uint8), q_ref.view(torch.uint8)) == 0
                torch.testing.assert_close(scales[rank, c, :t], s_ref[:, 0], rtol=1e-6, atol=0)
    assert all(int(f.abs().sum()) == 0 for f in flags), "every barrier resets its flags"


def test_the_reference_sums_in_float32_and_rounds_once():
    parts = [torch.tensor([[v]], dtype=torch.bfloat16) for v in (1.0, 2.0 ** -8, 2.0 ** -8)]
    # adding in bf16 step by step loses both halves (1 + 2^-8 is a tie, rounded to the even 1.0); the fp32 sum
    # 1 + 2^-7 is a bf16
    assert ((parts[0] + parts[1]) + parts[2]).item() == 1.0
    assert all_reduce_ref(parts).item() == 1.0 + 2.0 ** -7


def test_a_missing_peer_ends_the_wait_instead_of_hanging():
    world, hidden = 2, 32
    buffers = [torch.zeros(hidden, dtype=torch.bfloat16) for _ in range(world)]
    flags = [torch.zeros(flag_area_ints(world), dtype=torch.int32) for _ in range(world)]
    buf_table = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    flag_table = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    x = torch.ones(1, hidden, dtype=torch.bfloat16)
    t0 = time.monotonic()
    one_shot_all_reduce(x, buf_table, flag_table, 0, world, max_polls=20)  # rank 1 never comes
    assert time.monotonic() - t0 < 60
    assert int(flags[1].sum()) == 2, "rank 0 signalled rank 1 on both channels"


def test_bad_arguments_are_refused():
    tables = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="world size 3"):
        one_shot_all_reduce(torch.zeros(1, 8), tables, tables, 0, 3)
    with pytest.raises(ValueError, match="2-D"):
        one_shot_all_reduce(torch.zeros(8), tables[:2], tables[:2], 0, 2)
    assert MAX_PROGRAMS * 2 * 8 == flag_area_ints(8)
