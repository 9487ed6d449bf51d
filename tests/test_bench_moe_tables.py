"""bench.kernels' MoE table writer (the tuner's --write-tables): merges tuned buckets into an existing table."""
import json
import os

import torch

from bench.kernels import _padding_share, _routings, save_tuned_configs, write_moe_tables
from kernels.triton_moe import CONFIG_DIR, default_config

NAME = "E=161,N=1536,device=Test_GPU,quant=fp8_channel.json"


def test_write_moe_tables_merges_buckets_and_copies(tmp_path, monkeypatch):
    cfg_dir, out = tmp_path / "configs", tmp_path / "out"
    cfg_dir.mkdir()
    out.mkdir()
    # by name: the module write_moe_tables imports at call time (tests/kernels' conftest may have reloaded it)
    monkeypatch.setattr("kernels.triton_moe.CONFIG_DIR", str(cfg_dir))
    (cfg_dir / NAME).write_text(json.dumps({"_doc": "old", "1024": {"BLOCK_M": 64}, "4096": {"BLOCK_M": 64}}))
    write_moe_tables({NAME: {"4096": {"BLOCK_M": 128}, "16384": {"BLOCK_M": 128}},
                      "fp8_linear.json": {"x": 1}}, str(out))
    merged = json.loads((cfg_dir / NAME).read_text())
    assert merged["1024"] == {"BLOCK_M": 64}  # a bucket not tuned stays
    assert merged["4096"] == merged["16384"] == {"BLOCK_M": 128}
    assert merged["_doc"].startswith("old;") and "4096, 16384" in merged["_doc"]
    assert list(merged) == ["_doc", "1024", "4096", "16384"]  # buckets in numeric order
    assert json.loads((out / NAME).read_text()) == merged
    assert not (cfg_dir / "fp8_linear.json").exists()  # only MoE tables are merged


def testsave_tuned_configs_writes_what_is_done_so_far(tmp_path):
    save_tuned_configs({NAME: {"4096": {"BLOCK_M": 128}}}, str(tmp_path / "o"))
    assert json.loads((tmp_path / "o" / "tuned_configs.json").read_text()) == {NAME: {"4096": {"BLOCK_M": 128}}}
    save_tuned_configs({NAME: {}}, "")  # no --out: nothing to write, no error


def test_expert_parallel_routings_are_rank_zeros_pairs():
    """--moe-ep 8: the tuner's routings are what EP rank 0 receives (its 20 experts, 1/8 of the shared rows)."""
    (w, ids), = _routings(64, 161, 8, 1, ep=8, device="cpu")
    (_, whole), = _routings(64, 161, 8, 1, device="cpu")
    assert ids.shape == whole.shape == (64, 9) and w.shape == (64, 9)
    assert int(ids.min()) == -1 and int(ids.max()) <= 20
    routed, shared = ids[:, :8], ids[:, 8]
    assert ((routed == -1) | ((routed >= 0) & (routed < 20))).all()
    assert shared.tolist() == [20 if t % 8 == 0 else -1 for t in range(64)]
    assert 0 < int((routed >= 0).sum()) < 64 * 8  # some pairs local, most remote
    assert whole.min() >= 0 and (whole[:, 8] == 160).all()  # ep=1: global ids, the shared expert on every token


def test_committed_moe_tables_use_known_keys():
    """Every committed fused-MoE table (tuned or merged by hand) parses and names only keys the kernels read."""
    known = set(default_config(4096, 161, 1536, 5120, "fp8_channel")) | {"TMA1", "TMA2", "PERSIST2", "FAST_ACC",
                                                                         "N_LOOP2", "PAIR_MAX", "FUSE_REDUCE_MAX_T"}
    names = [n for n in os.listdir(CONFIG_DIR) if n.startswith("E=")]
    assert any(n.startswith("E=21,") for n in names)  # the EP8 rank's table
    for name in names:
        table = json.loads(open(os.path.join(CONFIG_DIR, name)).read())
        buckets = [b for b in table if not b.startswith("_")]
        assert buckets and all(b.isdigit() for b in buckets), name
        for b in buckets:
            assert set(table[b]) <= known, (name, b, set(table[b]) - known)


def test_balanced_routings_give_every_expert_the_same_count_and_no_padding():
    """--moe-routing balanced: distinct experts per token, equal counts; at 5120 tokens whole 128-row blocks."""
    for t, want in ((5120, 256), (4096, None)):
        routes = _routings(t, 161, 8, 2, device="cpu", balanced=True)
        for _, ids in routes:
            assert all(len(set(row)) == 9 for row in ids.tolist())  # 8 routed, distinct, + the shared expert
            counts = torch.bincount(ids[:, :8].flatten().long(), minlength=160)
            assert int(counts.max()) - int(counts.min()) <= 1
            if want:
                assert int(counts.min()) == want
        assert not torch.equal(routes[0][1], routes[1][1])  # variants differ (rotated inputs for the timing)
    assert _padding_share(_routings(5120, 161, 8, 1, device="cpu", balanced=True), 128) == 0.0
    # 4096 tokens: 204-205 pairs per routed expert -> 256 rows, the shared expert 4096 -> 4096
    share = _padding_share(_routings(4096, 161, 8, 1, device="cpu", balanced=True), 128)
    assert abs(share - (1 - 4096 * 9 / (160 * 256 + 4096))) < 1e-9
    # a random routing's uneven counts: 64-row blocks pad less than 128-row ones
    random_routes = _routings(4096, 161, 8, 1, device="cpu")
    assert 0 < _padding_share(random_routes, 64) < _padding_share(random_routes, 128)
