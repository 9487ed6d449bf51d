"""Assertions shared by engine tests."""
from __future__ import annotations


def assert_pages_clean(engine) -> None:
    """After every request finished: invariants hold and no page is still referenced."""
    engine.check_invariants()
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["used_kv_blocks"] == 0, stats
    assert stats["free_kv_blocks"] + stats["cached_kv_blocks"] == stats["total_kv_blocks"]
