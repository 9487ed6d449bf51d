"""attention_backend="fa3" end to end on CPU: a fake flash_attn (tests/fake_flash_attn.py) stands in for the
library, and kernels.flash_attn_adapter.device_supported is overridden (the real library is CUDA-only)."""
from __future__ import annotations

import random

import fake_flash_attn
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from kernels import flash_attn_adapter
from model.attention import Attention
from model.builder import build_model
from model.config import load_model_config

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def cpu_ok(monkeypatch):
    monkeypatch.setattr(flash_attn_adapter, "device_supported", lambda device: True)


def _prompts():
    rng = random.Random(0)
    shared = [rng.randrange(0, 1470) for _ in range(40)]
    return [shared + [rng.randrange(0, 1470) for _ in range(rng.randint(1, 30))] for _ in range(4)] + [
        [rng.randrange(0, 1470) for _ in range(rng.randint(3, 60))] for _ in range(4)
    ]


def _run(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kind,block_size", [("fa3", 16), ("fa2", 256)])
def test_fa3_backend_gives_the_default_backends_tokens(monkeypatch, cpu_ok, tiny_bf16, kind, block_size):
    prompts = _prompts()
    # chunked prefill (budget 24) and prefix caching: extends over a cached prefix, mixed with decodes
    kw = {"device": "cpu", "dtype": "bfloat16", "kv_block_size": block_size, "max_num_batched_tokens": 24,
              "enable_prefix_caching": True}
    expected = _run(LLM(str(tiny_bf16), **kw), prompts[:1]) + _run(LLM(str(tiny_bf16), **kw), prompts[1:])
    calls = fake_flash_attn.install(monkeypatch, kind)
    llm = LLM(str(tiny_bf16), attention_backend="fa3", **kw)
    assert llm.config.attention_backend == "fa3"
    attns = [m for m in llm.engine.worker.model.modules() if isinstance(m, Attention)]
    assert attns and all(a.attention_backend == "fa3" for a in attns)
    got = _run(llm, prompts[:1]) + _run(llm, prompts[1:])
    assert got == expected
    names = {c[0] for c in calls}
    decode_calls = [c for c in calls if len(c[1]) == 4]  # the batched [B, 1, H, D] decode form
    assert decode_calls and len(calls) > len(decode_calls)  # both decode and extend went through flash_attn
    assert names <= {f"{kind}.flash_attn_with_kvcache", f"{kind}.flash_attn_varlen_func"}
    if block_size == 16 and kind == "fa3":
        assert llm.stats()["prefix_cache_hit_tokens"] >= 3 * 32


def test_default_backend_never_touches_flash_attn(monkeypatch, tiny_bf16):
    calls = fake_flash_attn.install(monkeypatch, "fa3")
    llm = LLM(str(tiny_bf16), device="cpu")
    assert llm.config.attention_backend == "triton"
    _run(llm, _prompts()[:2])
    assert calls == []


def test_missing_library_is_a_clear_error(monkeypatch, cpu_ok, tiny_bf16):
    fake_flash_attn.hide(monkeypatch)
    with pytest.raises(ValueError, match="flash_attn_interface.*flash_attn"):
        EngineConfig.create(str(tiny_bf16), device="cpu", dtype="bfloat16", attention_backend="fa3")


def test_cpu_is_refused_without_the_override(monkeypatch, tiny_bf16):
    fake_flash_attn.install(monkeypatch, "fa3")
    with pytest.raises(ValueError, match="CUDA only"):
        LLM(str(tiny_bf16), device="cpu", dtype="bfloat16", attention_backend="fa3")


def test_config_errors(monkeypatch, cpu_ok, tiny_bf16):
    fake_flash_attn.install(monkeypatch, "fa3")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        EngineConfig.create(str(tiny_bf16), device="cpu", dtype="float32", attention_backend="fa3")
    with pytest.raises(ValueError, match="FP8"):  # config only: nothing touches CUDA
        EngineConfig.create(str(tiny_bf16), device="cuda", dtype="bfloat16", kv_cache_dtype="fp8_e4m3",
                            attention_backend="fa3")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig.create(str(tiny_bf16), device="cpu", attention_backend="flashinfer")
    fake_flash_attn.install(monkeypatch, "fa2")
    with pytest.raises(ValueError, match="divisible by 256"):
        EngineConfig.create(str(tiny_bf16), device="cpu", dtype="bfloat16", attention_backend="fa3")
    assert EngineConfig.create(str(tiny_bf16), device="cpu", dtype="bfloat16", kv_block_size=256,
                               attention_backend="fa3").attention_backend == "fa3"


def test_build_model_checks_the_backend(monkeypatch, tiny_bf16):
    cfg = load_model_config(str(tiny_bf16))
    fake_flash_attn.hide(monkeypatch)
    with pytest.raises(ValueError, match="needs the flash_attn package"):
        build_model(cfg, torch.device("cpu"), torch.bfloat16, attention_backend="fa3", progress=False)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        build_model(cfg, torch.device("cpu"), torch.bfloat16, attention_backend="torch", progress=False)
