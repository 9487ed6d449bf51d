"""The KV page pool and the prefix cache.

Pages (blocks) of block_size tokens live in one pool. A page is either free (never filled, or evicted),
cached (holds a full, hashed block of tokens and nobody references it: reusable on a prefix hit, evictable
in LRU order), or used (ref_count > 0). Invariant: free + cached + used == total.

A full page's hash chains over its parent's: hash((parent_hash, tokens)), so equal hashes mean equal
prefixes; the stored tokens are compared too, so a hash collision can never map the wrong KV.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

NO_PARENT = 0x5EED


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((NO_PARENT if parent is None else parent, tokens))


@dataclass
class Page:
    id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] | None = None


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one page")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pages = [Page(i) for i in range(num_blocks)]
        # Unreferenced pages in LRU order (oldest first): both free and cached ones, O(1) removal.
        self._unreferenced: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self._num_cached = 0  # unreferenced pages that still hold a hashed block
        self.hit_tokens = 0
        self.queried_tokens = 0

    # -- counts -------------------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        return len(self.pages)

    @property
    def num_allocatable(self) -> int:
        """Pages that can be handed out now (free + cached-but-unreferenced)."""
        return len(self._unreferenced)

    @property
    def num_cached(self) -> int:
        return self._num_cached

    @property
    def num_free(self) -> int:
        return self.num_allocatable - self.num_cached

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_allocatable

    def check_invariants(self) -> None:
        used = sum(1 for p in self.pages if p.ref_count > 0)
        assert all(p.ref_count >= 0 for p in self.pages), "negative ref count"
        assert used == self.num_used, f"used pages {used} != total - unreferenced {self.num_used}"
        assert all(self.pages[i].ref_count == 0 for i in self._unreferenced), "referenced page in the free list"
        cached = sum(1 for i in self._unreferenced if self.pages[i].hash is not None)
        assert cached == self._num_cached, f"cached count {self._num_cached} != {cached}"
        assert self.num_free + self.num_cached + self.num_used == self.num_total
        for h, pid in self._by_hash.items():
            assert self.pages[pid].hash == h, "hash index out of sync"

    # -- allocation ---------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > len(self._unreferenced):
            raise RuntimeError(f"KV pool exhausted: asked for {n} pages, {len(self._unreferenced)} available")
        out = []
        for _ in range(n):
            pid, _ = self._unreferenced.popitem(last=False)
            page = self.pages[pid]
            if page.hash is not None:  # evict the cached content
                self._num_cached -= 1
                if self._by_hash.get(page.hash) == pid:
                    del self._by_hash[page.hash]
                page.hash, page.tokens = None, None
            page.ref_count = 1
            out.append(pid)
        # ascending: a request frees its pages tail first, so the LRU hands them back in descending order; sorted,
        # adjacent pages stay adjacent in the block table, and a KV transfer (disaggregation) moves each run of
        # them as one descriptor per layer instead of one per page (which pages are evicted does not change)
        out.sort()
        return out

    def free(self, page_ids: list[int]) -> None:
        """Drop one reference per page; tail pages first so a prefix outlives its suffixes in the LRU."""
        for pid in reversed(page_ids):
            page = self.pages[pid]
            if page.ref_count <= 0:
                raise RuntimeError(f"double free of KV page {pid}")
            page.ref_count -= 1
            if page.ref_count == 0:
                self._unreferenced[pid] = None
                self._num_cached += page.hash is not None

    def touch(self, page_ids: list[int]) -> None:
        """Take a reference on cached pages found by a prefix lookup."""
        for pid in page_ids:
            page = self.pages[pid]
            if page.ref_count == 0:
                del self._unreferenced[pid]
                self._num_cached -= page.hash is not None
            page.ref_count += 1

    # -- prefix cache -------------------------------------------------------------------------------
    def lookup(self, block_hashes: list[int], token_blocks: list[tuple[int, ...]]) -> list[int]:
        """Longest run of cached pages matching the given full blocks (hashes and tokens)."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        for h, toks in zip(block_hashes, token_blocks):
            pid = self._by_hash.get(h)
            if pid is None or self.pages[pid].tokens != toks:
                break
            hits.append(pid)
        return hits

    def register(self, page_id: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """Mark a used, now-full page as holding `tokens` under `block_hash` (first writer wins)."""
        if not self.enable_prefix_caching or block_hash in self._by_hash:
            return
        page = self.pages[page_id]
        if page.hash is not None:
            return
        page.hash, page.tokens = block_hash, tokens
        self._by_hash[block_hash] = page_id

    def record_query(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit
