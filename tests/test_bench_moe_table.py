"""bench/moe_table.py: the QUACK key from a token count on, with every other count served as before."""
from bench.moe_table import clear_quack, set_quack


def _serve(table: dict, tokens: int) -> dict:
    buckets = sorted(int(k) for k in table if not k.startswith("_"))
    return table[str(next((b for b in buckets if b >= tokens), buckets[-1]))]


TABLE = {"_doc": "x", "1": {"A": 1}, "64": {"A": 2}, "1024": {"A": 3}, "4096": {"A": 4}}


def test_set_quack_keeps_configs_below_and_turns_it_on_above():
    for start in (1, 2, 64, 65, 1000, 2049, 4096, 4097, 9000):
        new = set_quack(TABLE, start, [[128, 192, True, 1], None])
        assert new["_doc"] == "x" and "QUACK" not in TABLE["4096"]  # the input is not modified
        for t in (1, 2, 63, 64, 65, 1000, 1024, 1025, 2048, 2049, 4095, 4096, 4097, 8999, 9000, 20000):
            before, after = _serve(TABLE, t), _serve(new, t)
            assert {k: v for k, v in after.items() if k != "QUACK"} == before, (start, t)
            assert ("QUACK" in after) == (t >= start), (start, t)
        assert "QUACK" not in clear_quack(new)["4096"]
