"""Host-to-device copies of the step loop's lists (engine/device_copy.py): the C-array path for long int lists
gives what torch.tensor gives, errors included, and block tables keep their row layout."""
import pickle
from array import array

import pytest
import torch

from engine.device_copy import host_tensor, to_device
from engine.block_pool import BlockPool
from engine.block_tables import BlockTables, page_array, table_width
from engine.config import SchedulerConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 5000])
def test_host_tensor_equals_torch_tensor(dtype, n):
    data = [(i * 7919) % 100_003 - 50_000 for i in range(n)]
    got = host_tensor(data, dtype)
    want = torch.tensor(data, dtype=dtype)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(to_device(data, dtype, torch.device("cpu")), want)


@pytest.mark.parametrize("data", [[(i, i % 7) for i in range(300)], [[i, i + 1] for i in range(300)],
                                  [float(i) + 0.5 for i in range(300)]])
def test_host_tensor_of_other_lists_is_torch_tensor(data):
    # (row, col) pairs (the sampler's penalty index), nested lists, floats: torch.tensor's shape and casts
    want = torch.tensor(data, dtype=torch.long)
    got = host_tensor(data, torch.long)
    assert got.shape == want.shape and torch.equal(got, want)


def test_host_tensor_keeps_its_buffer_alive():
    t = host_tensor(list(range(1000)), torch.long)
    junk = [list(range(1000, 2000)) for _ in range(50)]  # reuse freed memory if the array were not referenced
    assert junk and t.tolist() == list(range(1000))


def test_host_tensor_rejects_what_torch_tensor_rejects():
    for dtype, bad in ((torch.int32, 1 << 31), (torch.long, 1 << 63)):
        with pytest.raises((RuntimeError, ValueError)):
            torch.tensor([bad] * 300, dtype=dtype)
        with pytest.raises(OverflowError):
            host_tensor([bad] * 300, dtype)


def test_block_table_rows_padded():
    tables = [list(range(1, 300)), [7, 8], []]
    bt = BlockTables.build(tables)
    t = bt.to_device(torch.device("cpu"))
    width = table_width(299)
    assert (bt.rows, bt.width) == (3, width) and t.shape == (3, width) and t.dtype == torch.int32
    assert t[0, :299].tolist() == tables[0] and t[0, 299:].eq(0).all()
    assert t[1, :2].tolist() == [7, 8] and t[1, 2:].eq(0).all() and t[2].eq(0).all()
    assert bt.row(1) == [7, 8] + [0] * (width - 2)


def test_block_tables_from_page_arrays_equal_lists():
    """Requests keep their pages in int32 arrays (copied into the step's table as memory); lists, ranges and
    arrays of another type code give the same table; a table pickles as bytes (TP ranks get it that way)."""
    rows = [[(i * 37 + j) % 9000 for j in range(n)] for i, n in enumerate((2126, 1, 16, 17, 0))]
    want = BlockTables.build(rows)
    for got in (BlockTables.build([page_array(r) for r in rows]), BlockTables.build([array("q", r) for r in rows]),
                BlockTables.build([tuple(r) for r in rows])):
        assert got.width == want.width == table_width(2126) and torch.equal(got.tensor(), want.tensor())
    back = pickle.loads(pickle.dumps(want))
    assert torch.equal(back.tensor(), want.tensor()) and len(pickle.dumps(want)) < 4 * want.rows * want.width + 200
    with pytest.raises(ValueError):
        BlockTables.build([])
    with pytest.raises(OverflowError):
        BlockTables.build([[1 << 31]])


def test_request_pages_stay_int32_arrays_through_the_scheduler():
    """Admission, growth, a verify step's length cut and release keep Request.block_ids an int32 array, so a
    step's table never falls back to the element-by-element copy."""
    pool = BlockPool(64, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(64, 4, 256), pool)
    req = Request("a", 0, list(range(10)), SamplingParams(max_tokens=8), 8)
    sched.add(req)
    out = sched.schedule()
    assert out.scheduled and isinstance(req.block_ids, array) and req.block_ids.typecode == "i"
    assert len(req.block_ids) == 3
    assert sched.reserve(req, 20) == 20 and len(req.block_ids) == 5 and req.block_ids.typecode == "i"
    req.num_computed_tokens = 18  # a verify step computed 8 drafts past the 10 tokens; none was accepted
    sched.commit(req, 10)
    assert isinstance(req.block_ids, array) and len(req.block_ids) == 3
    sched.finish(req, "abort")
    assert isinstance(req.block_ids, array) and len(req.block_ids) == 0 and pool.num_free == 64
