"""Host-to-device copies of the step loop's lists (engine/device_copy.py): the C-array path for long int lists
gives what torch.tensor gives, errors included, and block tables keep their row layout."""
import pytest
import torch

from engine.device_copy import host_tensor, to_device
from engine.model_runner import block_table_tensor, table_width


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
    t = block_table_tensor(tables, torch.device("cpu"))
    width = table_width(299)
    assert t.shape == (3, width) and t.dtype == torch.int32
    assert t[0, :299].tolist() == tables[0] and t[0, 299:].eq(0).all()
    assert t[1, :2].tolist() == [7, 8] and t[1, 2:].eq(0).all() and t[2].eq(0).all()
