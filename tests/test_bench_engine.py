"""bench.engine / bench.real_shape / configs: the real GLM-4.7-FP8 config, the floor formulas at real shapes
(on a meta-device model, no memory), the launch presets, and a CPU smoke run of the whole benchmark."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.engine import (
    active_params_per_token,
    decode_bytes,
    expected_distinct_experts,
    prefill_flops,
)
from bench.real_shape import PRESETS_DIR, load_preset, real_shape_config, real_shape_model_dir
from model.config import config_from_dict, load_model_config
from model.glm4_moe import Glm4MoeForCausalLM
from model.parallel import TPGroup
from model.quant_plan import QuantPlan

ROOT = Path(__file__).resolve().parent.parent


def test_glm47_fp8_config_values():
    c = load_model_config(ROOT / "configs" / "glm47-fp8")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        5120, 92, 96, 8, 128,
    )  # fmt: skip
    assert c.partial_rotary_factor == 0.5 and c.rope_theta == 1e6 and c.max_position_embeddings == 202752
    assert (c.intermediate_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok) == (
        12288, 1536, 160, 8,
    )  # fmt: skip
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.first_k_dense_replace) == (1, 1, 2.5, 3)
    assert c.num_nextn_predict_layers == 1 and c.vocab_size == 151552 and c.n_shared_experts == 1
    assert c.eos_token_ids == (151329, 151336, 151338) and c.use_qk_norm and c.attention_bias
    assert c.quant.method == "fp8_channel"
    assert "lm_head" in c.quant.ignore and "model.layers.92.mlp.gate" in c.quant.ignore
    assert "model.layers.2.mlp.gate" not in c.quant.ignore and "model.layers.92.eh_proj" in c.quant.ignore


def test_real_shape_dir(tmp_path):
    d = real_shape_model_dir(15, 3, out_root=tmp_path)
    c = load_model_config(d)
    assert c.num_hidden_layers == 15 and c.first_k_dense_replace == 3 and c.hidden_size == 5120
    assert "model.layers.15.eh_proj" in c.quant.ignore and "model.layers.16.mlp.gate" not in c.quant.ignore
    assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    assert real_shape_model_dir(15, 3, out_root=tmp_path) == d  # cached
    assert load_model_config(real_shape_model_dir(2, 5, out_root=tmp_path)).first_k_dense_replace == 2
    assert load_model_config(real_shape_model_dir(4, 1, out_root=tmp_path)).first_k_dense_replace == 1
    small = load_model_config(real_shape_model_dir(2, 1, out_root=tmp_path, overrides={"vocab_size": 1536}))
    assert small.vocab_size == 1536 and all(e < 1536 for e in small.eos_token_ids)


def _meta_model(num_layers: int):
    cfg = config_from_dict(real_shape_config(num_layers, 3), Path("<test>/config.json"))
    model = Glm4MoeForCausalLM(cfg, QuantPlan(cfg, "fp8_channel", None), dtype=torch.bfloat16, device="meta")
    return cfg, model


def test_decode_bytes_under_expert_parallelism():
    """A TP8 rank reads a 1/8 slice of each touched expert; an EP8 rank whole experts, 1/8 of the touched ones on
    average: the same expected routed bytes. With the shared expert fused, EP stores it whole (8x TP's slice)."""
    cfg = config_from_dict(real_shape_config(4, 3), Path("<test>/config.json"))
    kv = {i: (torch.empty(1, 16, 1, 128, dtype=torch.bfloat16, device="meta"),) * 2 for i in range(4)}
    got = {}
    for ep in (False, True):
        plan = QuantPlan(cfg, "fp8_channel", None, fuse_shared_experts=True, expert_parallel=ep)
        model = Glm4MoeForCausalLM(cfg, plan, TPGroup(0, 8), dtype=torch.bfloat16, device="meta")
        got[ep] = {b: decode_bytes(model, cfg, b, 4096, kv) for b in (1, 64)}
    for b in (1, 64):
        # equal but for the per-channel scales: a TP rank keeps every touched expert's full [5120] down scales
        assert got[True][b]["routed_experts"] == pytest.approx(got[False][b]["routed_experts"], rel=0.01)
        assert got[True][b]["shared_expert"] == pytest.approx(8 * got[False][b]["shared_expert"], rel=0.01)
    assert got[True][1]["routed_experts"] == pytest.approx(8 / 8 * 3 * 1536 * 5120, rel=0.01)  # 1 MoE layer


def test_floors_match_reference_arithmetic():
    # reference/performance.md section 6: 8 experts at B=1, about 154 at B=64 (160 experts, top-8)
    assert expected_distinct_experts(160, 8, 1) == pytest.approx(8.0)
    assert expected_distinct_experts(160, 8, 64) == pytest.approx(154.0, abs=0.1)
    cfg, model = _meta_model(15)  # 3 dense + 12 MoE: section 6.4's H100 model
    ap = active_params_per_token(cfg)
    assert ap["attention_per_layer"] == pytest.approx(136.3e6, rel=1e-3)
    assert ap["dense_mlp_per_layer"] == pytest.approx(188.7e6, rel=1e-3)
    f = prefill_flops(cfg, 4096)
    assert f["linear"] == pytest.approx(42.3e12, rel=0.01)  # "42.3 TFLOP FP8"
    assert f["attention"] == pytest.approx(6.2e12, rel=0.01)  # "attention 6.2 TFLOP"
    # a 4096-token chunk after 4096 cached tokens: same linear work, attention over the prefix too (3x)
    g = prefill_flops(cfg, 4096, prefix=4096)
    assert g["linear"] == f["linear"] and g["attention"] == pytest.approx(3 * f["attention"])
    kv = {i: (torch.empty(1, 16, 8, 128, dtype=torch.bfloat16, device="meta"),) * 2 for i in range(15)}
    b1 = decode_bytes(model, cfg, 1, 4096, kv)
    assert b1["weights_total"] == pytest.approx(6.73e9, rel=0.01)  # "decode B = 1 floor 6.73 GB"
    assert b1["kv_read"] == 4096 * 15 * 2 * 8 * 128 * 2
    b64 = decode_bytes(model, cfg, 64, 4096, kv)
    assert b64["weights_total"] == pytest.approx(48.1e9, rel=0.01)  # "48.1 GB weights" at B = 64
    assert b64["kv_read"] == 64 * b1["kv_read"]
    forced = decode_bytes(model, cfg, 64, 4096, kv, distinct_experts=8.0)
    assert forced["routed_experts"] == pytest.approx(b1["routed_experts"])


def test_presets_parse_with_server_cli():
    from server.cli import build_parser

    names = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
    assert {"baseline", "optimized", "baseline-1gpu", "optimized-1gpu"} <= set(names)
    for name in names:
        data = json.loads((PRESETS_DIR / f"{name}.json").read_text())
        assert data["description"] and all(isinstance(a, str) for a in data["args"])
        ns = build_parser().parse_args(load_preset(name) + ["--model", "/x"])
        assert ns.tp_size == (1 if name.endswith("1gpu") else 4 if name.endswith("tp4") else 8)
        if name.startswith("optimized"):
            assert ns.kv_cache_dtype == "fp8_e4m3" and ns.chunked_prefill_size == 16384
            assert ns.enable_fused_qk_norm_rope and ns.enable_shared_experts_fusion
        else:
            assert ns.kv_cache_dtype == "auto" and not ns.enable_shared_experts_fusion
    opt, base = load_preset("optimized"), load_preset("baseline")
    assert base == opt[: len(base)]  # optimized = baseline + flags


SMOKE = [
    "--device", "cpu", "--layers", "2", "--dense-layers", "1", "--hidden", "64", "--experts", "8", "--topk", "2",
    "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--intermediate", "128", "--moe-intermediate", "32",
    "--vocab", "1536", "--batches", "1,3", "--context", "40", "--prefill", "48", "--hf-layers", "2",
    "--gen-prompts", "2", "--gen-input", "8", "--gen-output", "4",
]  # fmt: skip


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "engine.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.engine",
        *SMOKE,
        "--model-root",
        str(tmp_path / "models"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quantity" in proc.stdout and "vs HBM floor" in proc.stdout
    r = json.loads(out.read_text())
    assert r["schema"] == "glint.bench.engine/1" and "finished_at" in r
    assert _finite(r["hardware"]["bandwidth"]["GBps"]) and _finite(r["hardware"]["peaks"]["mm_tflops"])
    assert [d["batch"] for d in r["decode"]] == [1, 3]
    for d in r["decode"]:
        for key in ("step_ms", "floor_ms", "ratio_vs_floor", "eager_ratio_vs_floor"):
            assert _finite(d[key]), (key, d)
        assert _finite(d["bytes"]["total"]) and _finite(d["bytes"]["kv_read"])
        assert 0 < d["measured_distinct_experts"] <= 8 and _finite(d["floor_ms_measured_routing"])
        assert "graph" not in d  # no CUDA graphs on CPU
    p = r["prefill"]
    assert p["tokens"] == 48 and all(_finite(p[k]) for k in ("ms", "floor_ms", "ratio_vs_floor"))
    g = r["generate"]
    assert g["ours"]["output_tokens"] == 8 and g["hf"]["output_tokens"] == 8
    assert _finite(g["ours"]["output_tok_per_s"]) and _finite(g["hf"]["output_tok_per_s"])
    assert _finite(g["ours_vs_hf"])
    o = r["overlap"]
    if o["implemented"]:
        assert _finite(o["speedup"])
    else:
        assert "overlap: not implemented" in proc.stdout
    names = [row["name"] for row in r["summary"]]
    assert any(n.startswith("prefill") for n in names) and any("ours vs HF" in n for n in names)
    assert next(row for row in r["summary"] if row["name"].startswith("decode B=1"))["target"] == 1.5


def test_emulated_rank_run(tmp_path):
    """--emulate-tp 2 --enable-expert-parallel: the worker builds rank 0 of TP2 alone (half the heads, 4 of the 8
    experts whole) and runs decode and prefill steps without collectives; the prefill floor counts the rank's half
    of the FLOPs."""
    out, ref_out = tmp_path / "emu.json", tmp_path / "one.json"
    base = [sys.executable, "-m", "bench.engine", *SMOKE[: SMOKE.index("--hf-layers")], "--hf-layers", "0",
            "--no-hf", "--model-root", str(tmp_path / "models")]
    for cmd, dest in ((base + ["--emulate-tp", "2", "--enable-expert-parallel"], out), (base, ref_out)):
        proc = subprocess.run(cmd + ["--out", str(dest)], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r, one = json.loads(out.read_text()), json.loads(ref_out.read_text())
    assert r["main_model"]["emulated_tp"] == 2 and r["main_model"]["expert_parallel"]
    assert _finite(r["prefill"]["ms"]) and _finite(r["prefill"]["floor_ms"])
    for kind in ("linear", "attention"):  # the floor's FLOPs (each run measures its own peaks)
        assert r["prefill"]["flops"][kind] == pytest.approx(one["prefill"]["flops"][kind] / 2)
    # the rank holds half the attention and KV heads and half the experts (whole): fewer weight bytes than TP1
    assert r["main_model"]["weight_bytes"] < 0.75 * one["main_model"]["weight_bytes"]


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
def test_tp_decode_cpu_smoke(tmp_path, expert_parallel):
    """bench.tp_decode end to end on CPU: TP2 ranks spawned with gloo, tiny widths, with the served fusions and
    the fused all-reduce (the one-shot kernel under the interpreter, TRITON_INTERPRET from tests/conftest.py);
    with expert parallelism each rank holds 4 of the 8 experts whole."""
    out = tmp_path / "tp.json"
    widths = ["hidden_size=64", "n_routed_experts=8", "num_experts_per_tok=2", "num_attention_heads=4",
              "num_key_value_heads=2", "head_dim=32", "intermediate_size=128", "moe_intermediate_size=32",
              "vocab_size=1536"]
    cmd = [sys.executable, "-m", "bench.tp_decode", "--device", "cpu", "--tp", "2", "--layers", "2",
           "--dense-layers", "1", *[a for w in widths for a in ("--set", w)], "--batches", "1,3", "--context", "40",
           "--prefill", "48", "--tpot-tokens", "4", "--enable-shared-experts-fusion", "--enable-fused-qk-norm-rope",
           "--enable-allreduce-fusion", "--model-root", str(tmp_path / "models"), "--out", str(out)]
    cmd += ["--enable-expert-parallel"] if expert_parallel else []
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tp"] == 2 and sorted(r["decode"]) == ["1", "3"] and r["flags"]["enable_allreduce_fusion"]
    assert r["flags"]["enable_expert_parallel"] == expert_parallel
    for d in r["decode"].values():
        assert _finite(d["median_ms"]) and _finite(d["floor_ms"]) and _finite(d["ratio_vs_floor"])
        assert d["bytes_rank0"]["weights_total"] < r["weight_bytes_per_gpu"] + 1  # a rank's shard, not more
    assert _finite(r["prefill"]["median_ms"]) and _finite(r["prefill"]["floor_ms"])
    e2e = r["end_to_end"]
    assert _finite(e2e["ttft_ms"]) and _finite(e2e["tpot_ms"]) and e2e["tpot_ms"] > 0
    assert e2e["decode_steps"] == 2 * 4  # two runs of 1 + 4 tokens: 4 decode steps each


def test_engine_ab_script_alternates_variants(tmp_path):
    """bench/engine_ab.sh runs bench.engine once per variant per round, each under its own environment."""
    args = list(SMOKE)
    args[args.index("--hf-layers") + 1] = "0"
    args[args.index("--batches") + 1] = "1"
    args.append("--no-hf")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), ROUNDS="1",
               VARIANTS="GLINT_PDL=1|GLINT_PDL=0 GLINT_AB_PROBE=x")
    res = subprocess.run(["bash", "bench/engine_ab.sh", *args], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("[variant")]
    assert [ln.split(",")[0] for ln in lines] == ["[variant 0 round 1", "[variant 1 round 1"], res.stdout
    assert all("decode B=1:" in ln and "prefill 48:" in ln for ln in lines), res.stdout
    assert "variant 1: GLINT_PDL=0 GLINT_AB_PROBE=x" in res.stdout


def test_prefill_after_a_cached_prefix_with_the_sdpa_backend(tmp_path):
    """--prefill-prefix / --prefill-attention-backend (issue 21 item 3's chunked prefill after a prefix hit),
    --mixed-decodes (a step of decodes + that chunk) and --mixed-varying (mixed steps of changing chunk lengths)."""
    out = tmp_path / "engine.json"
    args = list(SMOKE)
    i = args.index("--hf-layers")
    del args[i : i + 2]
    args[args.index("--batches") + 1] = "1"
    cmd = [sys.executable, "-m", "bench.engine", *args, "--no-hf", "--hf-layers", "0", "--prefill-prefix", "32",
           "--prefill-attention-backend", "sdpa", "--model-root", str(tmp_path / "models"), "--out", str(out),
           "--host-profile", "--mixed-decodes", "3", "--mixed-varying", "4"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # --mixed-decodes: 3 decodes alone and in a step with the 48-token chunk (no piecewise graphs on a CPU)
    assert sorted(res["mixed"]) == ["decode_only", "eager"]
    assert all(_finite(m["median_ms"]) for m in res["mixed"].values())
    assert "mixed step, 3 decodes + 48 prefill tokens: decode_only" in proc.stdout
    # --mixed-varying: 4 steps of 24-48 chunk tokens, eager twice (no graphs here, no CUDA allocator)
    varying = res["mixed_varying"]
    assert sorted(varying) == ["eager", "eager_again"]
    assert all(v["steps"] == 4 and 0 < v["p50_ms"] <= v["max_ms"] and v["allocator"] == {} for v in varying.values())
    assert "mixed steps of 3 decodes + " in proc.stdout and "eager_again: mean" in proc.stdout
    p = res["prefill"]
    assert (p["tokens"], p["prefix"], p["attention_backend"]) == (48, 32, "sdpa") and _finite(p["ms"])
    assert "32 tokens cached before it, sdpa attention" in proc.stdout
    # --host-profile: the forward's host time and where it went (the runner's run() is among the functions)
    host = res["host_profile_prefill"]
    assert 0 < host["enqueue_ms"] <= host["finish_ms"] and _finite(host["finish_ms"])
    assert any("model_runner.py" in f["name"] and "(run)" in f["name"] for f in host["by_cumulative"])
    assert out.with_suffix(".prof").stat().st_size > 0
    sampled = host["sampled"]
    assert sampled["samples"] > 0 and any("(run)" in f["name"] for f in sampled["by_cumulative"])


def test_decode_only_run(tmp_path):
    """--prefill 0 times the decode steps and no prefill (it used to feed the runner a step of no tokens)."""
    args = list(SMOKE)
    args[args.index("--prefill") + 1] = "0"
    args[args.index("--hf-layers") + 1] = "0"
    args[args.index("--batches") + 1] = "1"
    out = tmp_path / "engine.json"
    cmd = [sys.executable, "-m", "bench.engine", *args, "--no-hf", "--model-root", str(tmp_path / "models"),
           "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [d["batch"] for d in r["decode"]] == [1] and _finite(r["decode"][0]["step_ms"])
    assert "prefill" not in r and "prefill 0" not in proc.stdout


def test_prefill_with_prompt_logprobs(tmp_path):
    """--prompt-logprobs K times the same prefill with every position scored (the forward returns the scores)."""
    args = list(SMOKE)
    args[args.index("--hf-layers") + 1] = "0"
    args[args.index("--batches") + 1] = "1"
    out = tmp_path / "engine.json"
    cmd = [sys.executable, "-m", "bench.engine", *args, "--no-hf", "--prompt-logprobs", "3",
           "--model-root", str(tmp_path / "models"), "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p = json.loads(out.read_text())["prompt_logprobs"]
    assert p["top_k"] == 3 and p["rows"] == 47  # a 48-token prefill scores positions 1..47
    assert _finite(p["ms"]) and _finite(p["lm_head_floor_ms"]) and math.isfinite(p["extra_ms"])
    assert math.isfinite(p["mean_target_logprob"]) and p["mean_target_logprob"] < 0
    assert "with prompt_logprobs=3" in proc.stdout
