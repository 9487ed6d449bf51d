import pytest
import torch

from kernels.triton_moe_align import max_blocks, moe_align
from kernel_helpers import poisoned_empty


def _check_align(ids, e, bm, sorted_ids, bexp):
    np_ = ids.numel()
    flat = ids.reshape(-1).long().cpu()
    s = sorted_ids.long().cpu()
    b = bexp.long().cpu()
    assert s.numel() == b.numel() * bm == max_blocks(np_, e, bm) * bm
    here = flat >= 0  # -1: another rank's expert (expert parallelism), no sorted row
    counts = torch.bincount(flat[here], minlength=e)
    nblk = (counts + bm - 1) // bm
    assert (b[: nblk.sum()] == torch.repeat_interleave(torch.arange(e), nblk)).all()
    assert (b[nblk.sum():] == -1).all()
    seen = torch.zeros(np_, dtype=torch.int64)
    for blk in range(int(nblk.sum())):
        rows = s[blk * bm:(blk + 1) * bm]
        real = rows[rows < np_]
        assert (rows[rows >= np_] == np_).all()
        assert (flat[real] == b[blk]).all()
        seen[real] += 1
    assert (seen[here] == 1).all() and (seen[~here] == 0).all()  # every local pair exactly once, no other
    assert (s[nblk.sum() * bm:] == np_).all()
    real = s[s < np_]
    order = flat.argsort(stable=True)
    assert (real == order[here[order]]).all()  # deterministic: index order within each expert


@pytest.mark.parametrize("t,k,e,bm", [(1, 8, 160, 16), (1, 9, 161, 16), (13, 4, 8, 16), (40, 3, 5, 32), (7, 2, 64, 64)])
def test_moe_align(device, t, k, e, bm):
    # random routing with some experts unused: draw from a subset
    pool = torch.randperm(e, device=device)[: max(k, e // 2)]
    ids = torch.stack([pool[torch.randperm(pool.numel(), device=device)[:k]] for _ in range(t)]).to(torch.int32)
    with poisoned_empty():
        sorted_ids, bexp = moe_align(ids, e, bm)
    _check_align(ids, e, bm, sorted_ids, bexp)


@pytest.mark.parametrize("t,k,e,bm,small_max",
                         [(300, 8, 161, 64, 0), (129, 9, 20, 16, 1000), (2, 2, 5, 16, 0), (2100, 9, 161, 128, 0)])
def test_moe_align_chunked(device, t, k, e, bm, small_max):
    # the grid (hist -> scan -> scatter) path: several 1024-pair chunks, a ragged last chunk; 2100 x 9 pairs are
    # 19 chunks, two of the scan's 16-chunk groups (the second ragged)
    ids = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(t)]).to(torch.int32)
    with poisoned_empty():
        sorted_ids, bexp = moe_align(ids, e, bm, small_max=small_max)
    _check_align(ids, e, bm, sorted_ids, bexp)


@pytest.mark.parametrize("t,k,e,bm,small_max", [(13, 4, 8, 16, 512), (300, 8, 20, 64, 0), (1, 9, 20, 16, 512)])
def test_moe_align_skips_other_ranks_experts(device, t, k, e, bm, small_max):
    """Expert parallelism: ids are this rank's experts or -1 (kernels.moe_local_ids); -1 pairs get no row, in the
    one-program and the chunked path, including a token with no local pair and a rank with none at all."""
    ids = torch.stack([torch.randperm(2 * e, device=device)[:k] for _ in range(t)]).to(torch.int32)
    ids = torch.where(ids < e, ids, -1).to(torch.int32)
    ids[0] = -1
    with poisoned_empty():
        sorted_ids, bexp = moe_align(ids, e, bm, small_max=small_max)
    _check_align(ids, e, bm, sorted_ids, bexp)
    if t == 1:
        assert (bexp == -1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096, 16384])
def test_moe_align_gpu(t):
    e, k = 161, 9
    ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)]).to(torch.int32)
    for bm in (16, 64, 128):
        with poisoned_empty():
            sorted_ids, bexp = moe_align(ids, e, bm)
        _check_align(ids, e, bm, sorted_ids, bexp)
