"""prefill_attention_backend="sdpa" end to end on the tiny model (CPU): greedy tokens equal the default path's,
with prompts long enough to be prefill rows (the threshold lowered for the tiny model), chunked prefill over
cached prefixes (prefix caching + a small step budget) and decode rows in the same steps."""
from __future__ import annotations

import random

import pytest

from engine import LLM, EngineConfig, SamplingParams
from kernels import sdpa_prefill
from model.attention import Attention

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(0, 1470) for _ in range(40)]
    return [shared + [rng.randrange(0, 1470) for _ in range(rng.randint(10, 30))] for _ in range(3)] + [
        [rng.randrange(0, 1470) for _ in range(rng.randint(3, 60))] for _ in range(3)
    ]


def _run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_sdpa_prefill_gives_the_default_tokens(monkeypatch, tiny_bf16):
    monkeypatch.setattr(sdpa_prefill, "MIN_PREFILL_TOKENS", 8)
    calls: list[tuple[int, int]] = []  # (new tokens, kv length) of every sequence the SDPA path attended
    real = sdpa_prefill.prefill_attention_sdpa

    def spy(q, k, v, *args, **kw):
        calls.append((q.shape[0], k.shape[0]))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(sdpa_prefill, "prefill_attention_sdpa", spy)
    prompts = _prompts()
    kw = {"device": "cpu", "max_num_batched_tokens": 24, "enable_prefix_caching": True}
    default = LLM(str(tiny_bf16), **kw)
    expected = _run(default, prompts[:1]) + _run(default, prompts[1:])
    assert calls == []  # the default never takes the SDPA path
    llm = LLM(str(tiny_bf16), prefill_attention_backend="sdpa", **kw)
    assert llm.config.prefill_attention_backend == "sdpa"
    attns = [m for m in llm.engine.worker.model.modules() if isinstance(m, Attention)]
    assert attns and all(a.prefill_attention_backend == "sdpa" for a in attns)
    got = _run(llm, prompts[:1]) + _run(llm, prompts[1:])
    assert got == expected
    assert any(kv == n for n, kv in calls) and any(kv > n for n, kv in calls)  # with and without a prefix
    assert llm.stats()["prefix_cache_hit_tokens"] > 0


def test_config_checks_the_choice(tiny_bf16):
    with pytest.raises(ValueError, match="prefill_attention_backend must be one of"):
        EngineConfig.create(str(tiny_bf16), device="cpu", prefill_attention_backend="cudnn")
    assert EngineConfig.create(str(tiny_bf16), device="cpu").prefill_attention_backend == "triton"
