"""Weight loading: clear errors for broken checkpoints, TP slicing at load, dummy weights."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.builder import build_model
from model.config import load_model_config
from model.loader import WeightLoadError
from model.parallel import TPGroup
from model.tiny import write_tiny_checkpoint

CPU = torch.device("cpu")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _first_shard(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))[0]


def _load(path, **kw):
    return build_model(load_model_config(path), CPU, torch.float32, progress=False, **kw)


def test_missing_shard(tiny_bf16, tmp_path):
    p = _copy(tiny_bf16, tmp_path / "c")
    _, shard = _first_shard(p)
    (p / shard).unlink()
    with pytest.raises(WeightLoadError, match=f"shard '{shard}'.*missing"):
        _load(p)


def _rewrite(p, fn):
    index, shard = _first_shard(p)
    tensors = load_file(p / shard)
    fn(tensors, index)
    save_file(tensors, p / shard)
    for k in tensors:
        index["weight_map"][k] = shard
    (p / "model.safetensors.index.json").write_text(json.dumps(index))


def test_wrong_shape(tiny_bf16, tmp_path):
    p = _copy(tiny_bf16, tmp_path / "c")
    _rewrite(p, lambda t, i: t.__setitem__("model.norm.weight", torch.ones(3)) if "model.norm.weight" in t
             else t.__setitem__("model.embed_tokens.weight", torch.ones(3, 3)))
    with pytest.raises(WeightLoadError, match=r"has shape \[3"):
        _load(p)


def test_wrong_dtype(tiny_dirs, tmp_path):
    p = _copy(tiny_dirs["fp8-channel"], tmp_path / "c")

    def corrupt(t, i):
        name = next(k for k in t if k.endswith("q_proj.weight"))
        t[name] = t[name].to(torch.int32)
    _rewrite(p, corrupt)
    with pytest.raises(WeightLoadError, match="dtype"):
        _load(p)


def test_unknown_and_missing_tensor(tiny_bf16, tmp_path):
    p = _copy(tiny_bf16, tmp_path / "c")
    _rewrite(p, lambda t, i: t.__setitem__("model.layers.0.mlp.mystery.weight", torch.ones(2)))
    with pytest.raises(WeightLoadError, match="unknown tensor.*mystery"):
        _load(p)
    p2 = _copy(tiny_bf16, tmp_path / "d")

    def drop(t, i):
        name = sorted(t)[0]
        del t[name]
        del i["weight_map"][name]
    _rewrite(p2, drop)
    with pytest.raises(WeightLoadError, match="missing from the checkpoint"):
        _load(p2)


@pytest.mark.parametrize("kv_heads, tp_size", [(2, 2), (1, 2), (2, 4)])
def test_tp_slices_match_full_weights(tmp_path, kv_heads, tp_size):
    p = write_tiny_checkpoint(tmp_path / "c", fmt="fp8-channel", num_key_value_heads=kv_heads)
    cfg = load_model_config(p)
    full = dict(_load(p).named_parameters())
    d, hq, hk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for rank in range(tp_size):
        tp = TPGroup(rank, tp_size)
        part = dict(build_model(cfg, CPU, torch.float32, tp=tp, progress=False).named_parameters())
        q_local = hq // tp_size * d
        kv_head = rank * hk // tp_size if hk >= tp_size else rank // (tp_size // hk)
        kv_local = max(1, hk // tp_size) * d
        qkv_full = full["layers.0.self_attn.qkv_proj.weight"]
        q_rows = qkv_full[rank * q_local : (rank + 1) * q_local]
        k_rows = qkv_full[hq * d + kv_head * d : hq * d + kv_head * d + kv_local]
        v_rows = qkv_full[(hq + hk) * d + kv_head * d : (hq + hk) * d + kv_head * d + kv_local]
        assert torch.equal(part["layers.0.self_attn.qkv_proj.weight"], torch.cat([q_rows, k_rows, v_rows]))
        o = full["layers.0.self_attn.o_proj.weight"][:, rank * q_local : (rank + 1) * q_local]
        assert torch.equal(part["layers.0.self_attn.o_proj.weight"], o)
        i_local = cfg.moe_intermediate_size // tp_size
        w13 = full["layers.1.mlp.experts.w13"]
        sl = slice(rank * i_local, (rank + 1) * i_local)
        gate, up = w13[:, : cfg.moe_intermediate_size], w13[:, cfg.moe_intermediate_size :]
        assert torch.equal(part["layers.1.mlp.experts.w13"], torch.cat([gate[:, sl], up[:, sl]], dim=1))
        assert torch.equal(part["layers.1.mlp.experts.w2"], full["layers.1.mlp.experts.w2"][:, :, sl])
        emb = part["embed_tokens.weight"]
        start = rank * emb.shape[0]
        real = full["embed_tokens.weight"][start : start + emb.shape[0]]
        assert torch.equal(emb[: real.shape[0]], real) and not emb[real.shape[0]:].any()


def test_tp_size_that_fits_neither_way(tiny_bf16):
    cfg = load_model_config(tiny_bf16)
    with pytest.raises(ValueError, match="tensor-parallel"):
        build_model(cfg, CPU, torch.float32, tp=TPGroup(0, 3), progress=False)


def test_dummy_weights_are_tp_invariant_and_finite(tiny_dirs):
    cfg = load_model_config(tiny_dirs["fp8-block"])
    full = dict(build_model(cfg, CPU, torch.float32, load_format="dummy", progress=False).named_parameters())
    part = dict(build_model(cfg, CPU, torch.float32, tp=TPGroup(1, 2), load_format="dummy", progress=False).named_parameters())
    assert all(torch.isfinite(t).all() for t in full.values())
    i_local = cfg.moe_intermediate_size // 2
    assert torch.equal(part["layers.1.mlp.experts.w2"], full["layers.1.mlp.experts.w2"][:, :, i_local:])
    assert full["layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0
    again = dict(build_model(cfg, CPU, torch.float32, load_format="dummy", seed=0, progress=False).named_parameters())
    other = dict(build_model(cfg, CPU, torch.float32, load_format="dummy", seed=1, progress=False).named_parameters())
    assert torch.equal(again["lm_head.weight"], full["lm_head.weight"])
    assert not torch.equal(other["lm_head.weight"], full["lm_head.weight"])


def test_fused_shared_expert_equals_separate(tiny_bf16):
    cfg = load_model_config(tiny_bf16)
    sep = build_model(cfg, CPU, torch.float32, progress=False)
    fused = build_model(cfg, CPU, torch.float32, fuse_shared_experts=True, progress=False)
    x = torch.randn(5, cfg.hidden_size)
    with torch.no_grad():
        assert torch.allclose(sep.layers[1].mlp(x), fused.layers[1].mlp(x), atol=1e-5)
    assert fused.layers[1].mlp.experts.w13.shape[0] == cfg.n_routed_experts + 1
