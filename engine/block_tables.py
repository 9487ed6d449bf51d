"""A step's block tables as one flat int32 array: rows padded with page 0 to a common width.

Every decode step ships its requests' page lists to the device (and, under TP, to every rank through the control
plane). As padded lists of Python ints, built, pickled and read by torch.tensor, that took 13.8 ms a step for 64
requests of 34K tokens on the CI machine (2,126 pages each; bench/step_host_cost.py), more than the 10.7 ms an H200
needs to read those pages' KV at the TP8 shard: long-context decode was host-bound. Requests keep their pages in
an int32 `array` (Request.block_ids), so a step's table is one memcpy per row, pickles as bytes and reaches torch
without a copy (`torch.frombuffer`): 0.12 ms there.
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.device_copy import pinned_to_device

# Block tables on the device have widths in multiples of this: the attention kernels take the width as the
# table's row stride, and Triton compiles a variant per divisibility of an int argument by 16, so a width that
# followed the step's longest sequence would compile new variants inside serving (kernels/triton_common.py).
TABLE_WIDTH_MULTIPLE = 16


def table_width(pages: int) -> int:
    """A block table's width for rows of up to `pages` pages: a multiple of TABLE_WIDTH_MULTIPLE."""
    return max(1, -(-pages // TABLE_WIDTH_MULTIPLE)) * TABLE_WIDTH_MULTIPLE


def page_array(pages: Sequence[int] = ()) -> array:
    """An int32 array of page ids (a copy; a memcpy where `pages` is one already)."""
    return array("i", pages)


@dataclass(frozen=True)
class BlockTables:
    """int32 [rows, width], row-major in `flat`; row i = request i's pages, then zeros (page 0, never read: past
    each sequence's length)."""

    flat: array
    rows: int
    width: int

    @staticmethod
    def build(tables: Sequence[Sequence[int]]) -> "BlockTables":
        """From per-request page lists or int32 arrays (arrays copy as memory, lists element by element)."""
        if not tables:
            raise ValueError("a step's block tables need at least one request")
        width = table_width(max(len(t) for t in tables))
        flat = array("i", bytes(4 * width * len(tables)))
        for i, pages in enumerate(tables):
            if len(pages):
                src = pages if isinstance(pages, array) and pages.typecode == "i" else array("i", pages)
                flat[i * width : i * width + len(src)] = src
        return BlockTables(flat, len(tables), width)

    def row(self, i: int) -> list[int]:
        """Row i, padding included."""
        return self.flat[i * self.width : (i + 1) * self.width].tolist()

    def tensor(self) -> torch.Tensor:
        """A CPU int32 [rows, width] tensor over `flat` (shares its memory: do not write to it)."""
        return torch.frombuffer(self.flat, dtype=torch.int32).view(self.rows, self.width)

    def to_device(self, device: torch.device) -> torch.Tensor:
        return pinned_to_device(self.tensor(), device)
