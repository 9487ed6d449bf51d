"""KV pool layouts as the transfer layer sees them, and the page-major pool allocator.

A transfer moves *pages*: page p of a request is the same block index p in every layer's K and V tensor. The
transfer layer describes the pool as a few *regions*: uint8 views [num_pages, page_bytes] whose rows are
contiguous runs of memory (page p of region r starts at base_r + p * stride_r). A transfer of pages P costs one
descriptor per (region, run of adjacent pages), and a transfer engine pays per descriptor (~11 us each on NIXL),
so the number of regions is what matters:

* engine/kv_cache.py's layout (one tensor per layer and K/V, layer-major): 2 * num_layers regions, one 2 KiB
  descriptor per layer, K/V and page (a 4096-token TP8 prompt on 92 layers: 47K descriptors).
* page-major ([num_blocks, num_layers, 2, block_size, kv_heads, head_dim], one buffer): the 2 * num_layers
  per-layer views of one page are adjacent, so they coalesce into ONE region whose row is the page of all layers
  (368 KiB at TP8 FP8); adjacent pages then merge into one descriptor.

The per-layer K/V tensors the model reads are strided views into the page-major buffer: [num_blocks, block_size,
kv_heads, head_dim] with stride(0) = num_layers * 2 * block_size * kv_heads * head_dim (pages of one layer are
not adjacent), dense within a page.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.parallel import HeadPartition, TPGroup

KVCaches = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KVPageRegions:
    """The pool as regions: uint8 [num_pages, page_bytes_r] views, rows contiguous, all on one device."""

    regions: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("a KV pool needs at least one region")
        n, dev = self.regions[0].shape[0], self.regions[0].device
        for r in self.regions:
            if r.dtype != torch.uint8 or r.dim() != 2 or r.stride(1) != 1:
                raise ValueError("regions must be uint8 [num_pages, page_bytes] views with contiguous rows")
            if r.shape[0] != n or r.device != dev:
                raise ValueError("all regions must have the same number of pages and the same device")

    @property
    def num_pages(self) -> int:
        return self.regions[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.regions[0].device

    @property
    def page_bytes(self) -> list[int]:
        return [r.shape[1] for r in self.regions]

    def layout(self) -> list[tuple[int, int, int]]:
        """(base address, page stride in bytes, page bytes) per region."""
        return [(r.data_ptr(), r.stride(0), r.shape[1]) for r in self.regions]

    def spans(self) -> list[tuple[int, int]]:
        """Disjoint (address, length) memory ranges covering every region, for registration."""
        ranges = sorted((b, b + s * (self.num_pages - 1) + pb) for b, s, pb in self.layout())
        merged: list[list[int]] = []
        for lo, hi in ranges:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return [(lo, hi - lo) for lo, hi in merged]

    @classmethod
    def from_kv_caches(cls, kv_caches: KVCaches) -> KVPageRegions:
        """Regions of a {layer: (k, v)} pool of [num_blocks, ...] tensors (any of the layouts above), in (layer id,
        K, V) order, so that both sides of a transfer agree on it whatever their addresses; consecutive views that
        are adjacent within a page with a common page stride coalesce into one region."""
        views = [_page_view(t) for lid in sorted(kv_caches) for t in kv_caches[lid]]
        out: list[torch.Tensor] = []
        for v in views:
            last = out[-1] if out else None
            if (last is not None and last.stride(0) == v.stride(0)
                    and last.data_ptr() + last.shape[1] == v.data_ptr()
                    and last.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()):
                out[-1] = last.as_strided((last.shape[0], last.shape[1] + v.shape[1]), (last.stride(0), 1))
            else:
                out.append(v)
        return cls(tuple(out))


def _page_view(t: torch.Tensor) -> torch.Tensor:
    """uint8 [num_blocks, page_bytes] view of a [num_blocks, ...] cache tensor whose pages are dense."""
    es = t.element_size()
    page_elems = t[0].numel()
    if t.dim() < 2 or not t[0].is_contiguous():
        raise ValueError("each page (t[i]) of a KV cache tensor must be contiguous")
    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    return raw.as_strided((t.shape[0], page_elems * es), (t.stride(0) * es, 1), t.storage_offset() * es)


@dataclass(frozen=True)
class PageMajorKVPool:
    """One buffer [num_blocks, num_layers, 2, block_size, kv_heads, head_dim] and its per-layer (k, v) views."""

    buffer: torch.Tensor
    kv_caches: KVCaches

    @property
    def regions(self) -> KVPageRegions:
        return KVPageRegions.from_kv_caches(self.kv_caches)


def dense_layer_views(pool: PageMajorKVPool) -> tuple[KVCaches, int]:
    """The same pool as per-layer views with DENSE pages (what the Triton kernels assert today), plus the factor
    f = 2 * num_layers by which block ids must be scaled for them: the buffer is read as num_blocks * f pages of
    [block_size, kv_heads, head_dim]; layer i's K view starts at page 2i and its V view at page 2i + 1, so block
    b of layer i is page b * f of its view. With block tables * f and slot mapping = (block * f) * block_size +
    offset (one scaling per step, shared by every layer) the kernels run on the page-major pool unchanged."""
    nb, nl, _, bs, h, d = pool.buffer.shape
    f = 2 * nl
    pages = pool.buffer.view(nb * f, bs, h, d)
    n = (nb - 1) * f + 1  # one length for every view (K and V must match): page (nb - 1) * f is the last used
    return {lid: (pages[2 * i:2 * i + n], pages[2 * i + 1:2 * i + 1 + n]) for i, lid in enumerate(pool.kv_caches)}, f


def allocate_page_major_kv(
    layer_ids: list[int],
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> PageMajorKVPool:
    buf = torch.zeros((num_blocks, len(layer_ids), 2, block_size, kv_heads, head_dim), dtype=dtype, device=device)
    return PageMajorKVPool(buf, {lid: (buf[:, i, 0], buf[:, i, 1]) for i, lid in enumerate(layer_ids)})


def allocate_page_major_kv_caches(
    cfg: ModelConfig,
    tp: TPGroup,
    layer_ids: list[int],
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCaches:
    """Drop-in for engine.kv_cache.allocate_kv_caches (same arguments, same {layer: (k, v)} shapes), page-major."""
    heads = HeadPartition.build(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
    return allocate_page_major_kv(layer_ids, num_blocks, block_size, heads.num_kv_heads, cfg.head_dim, dtype,
                                  device).kv_caches
