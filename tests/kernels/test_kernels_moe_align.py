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
    counts = torch.bincount(flat, minlength=e)
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
    assert (seen == 1).all()  # every pair exactly once
    assert (s[nblk.sum() * bm:] == np_).all()
    real = s[s < np_]
    assert (real == flat.argsort(stable=True)).all()  # deterministic: index order within each expert


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


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096, 16384])
def test_moe_align_gpu(t):
    e, k = 161, 9
    ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)]).to(torch.int32)
    for bm in (16, 64, 128):
        with poisoned_empty():
            sorted_ids, bexp = moe_align(ids, e, bm)
        _check_align(ids, e, bm, sorted_ids, bexp)
