"""prefill_attention_backend="sdpa" end to end on the tiny model (CPU): greedy tokens equal the default path's,
with prompts long enough to be prefill rows (the threshold lowered for the tiny model), chunked prefill over
cached prefixes (prefix caching + a small step budget) and decode rows in the same steps."""
from __future__ import annotations

import random

import pytest
import torch

import fake_flash_attn
from engine import LLM, EngineConfig, SamplingParams
from kernels import fa4_prefill, sdpa_prefill
from model.attention import Attention, resolve_prefill_attention_backend

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
    monkeypatch.setattr(sdpa_prefill, "SDPA_FROM_TOKENS", ((1, 8),))
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


# gather never, some steps, every step that fits; fused: the one-kernel QKV prologue (a prompt alone leaves it);
# fresh off: a prompt alone reads the pages too (with no gather: every step over the pages)
@pytest.mark.parametrize("gather_min_pairs,fused,fresh", [
    (10**9, False, True), (6, False, True), (1, False, True), (6, True, True), (10**9, False, False),
])
def test_fa4_prefill_gives_the_default_tokens(monkeypatch, tiny_bf16, gather_min_pairs, fused, fresh):
    """prefill_attention_backend="fa4" with a fake flash-attn-4 (tests/fake_flash_attn.py: the real signature and
    argument checks, reference math): the same greedy tokens as the default path, every prefill step (chunks
    after cached prefixes and decode rows included) in one FA4 call over the pages or over packed K/V, decode-only
    steps on the engine's kernels."""
    calls = fake_flash_attn.install_fa4(monkeypatch)
    monkeypatch.setattr(fa4_prefill, "device_supported", lambda device: True)
    monkeypatch.setattr(fa4_prefill, "FROM_TOKENS", 8)
    monkeypatch.setattr(fa4_prefill, "GATHER_MIN_PAIRS", gather_min_pairs)
    monkeypatch.setattr(fa4_prefill, "FRESH_PROMPTS", fresh)
    prompts = _prompts()
    kw = {"device": "cpu", "dtype": "bfloat16", "max_num_batched_tokens": 24, "enable_prefix_caching": True}
    default = LLM(str(tiny_bf16), **kw)
    expected = _run(default, prompts[:1]) + _run(default, prompts[1:])
    assert calls == []  # auto on CPU is the reference path
    llm = LLM(str(tiny_bf16), prefill_attention_backend="fa4", enable_fused_qk_norm_rope=fused, **kw)
    attns = [m for m in llm.engine.worker.model.modules() if isinstance(m, Attention)]
    assert attns and all(a.prefill_attention_backend == "fa4" for a in attns)
    got = _run(llm, prompts[:1]) + _run(llm, prompts[1:])
    assert got == expected
    layers = len(attns)
    own_kv = [("fa4.flash_attn_func", (1, 24, 4, 32))] * layers  # the first chunk: a prompt alone
    assert (calls[:layers] == own_kv) == fresh
    assert fresh or all(name != "fa4.flash_attn_func" for name, _ in calls)
    calls = [c for c in calls if c[0] != "fa4.flash_attn_func"]
    assert calls and len(calls) % layers == 0  # every layer of a prefill step, nothing else
    assert llm.stats()["prefix_cache_hit_tokens"] > 0
    packed = sum(name.endswith("[packed]") for name, _ in calls)
    assert llm.engine.worker.runner.max_packed_kv == llm.config.scheduler.max_model_len
    if gather_min_pairs == 10**9:
        assert packed == 0
    elif gather_min_pairs == 1:  # every step with cached keys (the others, prompts alone, filtered out above)
        assert packed == len(calls)
    else:
        assert 0 < packed < len(calls)


def test_fa4_config_says_why_it_cannot_run(monkeypatch, tiny_bf16):
    fake_flash_attn.hide_fa4(monkeypatch)
    with pytest.raises(ValueError, match="pip install flash-attn-4"):
        EngineConfig.create(str(tiny_bf16), device="cpu", prefill_attention_backend="fa4")
    fake_flash_attn.install_fa4(monkeypatch)
    with pytest.raises(ValueError, match="Hopper"):
        EngineConfig.create(str(tiny_bf16), device="cpu", dtype="bfloat16", prefill_attention_backend="fa4")


def test_config_checks_the_choice(tiny_bf16):
    with pytest.raises(ValueError, match="prefill_attention_backend must be one of"):
        EngineConfig.create(str(tiny_bf16), device="cpu", prefill_attention_backend="cudnn")
    assert EngineConfig.create(str(tiny_bf16), device="cpu").prefill_attention_backend == "auto"


def test_auto_is_sdpa_on_cuda_and_triton_elsewhere(monkeypatch, tiny_bf16):
    # with flash-attn-4 on a Hopper GPU auto is fa4 (tests/kernels/test_fa4_prefill.py)
    fake_flash_attn.hide_fa4(monkeypatch)
    assert resolve_prefill_attention_backend("auto", "cuda") == "sdpa"
    assert resolve_prefill_attention_backend("auto", torch.device("cuda", 1)) == "sdpa"
    assert resolve_prefill_attention_backend("auto", "cpu") == "triton"
    assert resolve_prefill_attention_backend("sdpa", "cpu") == "sdpa"
    assert resolve_prefill_attention_backend("triton", "cuda") == "triton"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_prefill_attention_backend("cudnn", "cuda")
    llm = LLM(str(tiny_bf16), device="cpu")  # the default on CPU: the reference path
    attns = [m for m in llm.engine.worker.model.modules() if isinstance(m, Attention)]
    assert attns and all(a.prefill_attention_backend == "triton" for a in attns)


@pytest.mark.parametrize("prefix", [0, 300])
def test_workspace_bytes_covers_what_a_prefill_allocates(monkeypatch, prefix):
    """The reserve the engine takes before sizing the KV cache is at least what one call's gather, outputs and
    merge allocate (counted by spying on every tensor-producing step of the path)."""
    hq, hk, d, n, bs = 8, 2, 16, 200, 16
    ctx = prefix + n
    pages = -(-ctx // bs)
    k_cache = torch.randn(pages, bs, hk, d)
    v_cache = torch.randn(pages, bs, hk, d)
    q = torch.randn(n, hq, d)
    gathered: list[int] = []
    real_gather = sdpa_prefill.gather_kv

    def spy(*args, **kw):
        x = real_gather(*args, **kw)
        gathered.append(x.numel() * x.element_size())
        return x

    monkeypatch.setattr(sdpa_prefill, "gather_kv", spy)
    sdpa_prefill.paged_attention_prefill_sdpa(
        q, k_cache, v_cache, torch.arange(pages).view(1, -1), torch.tensor([ctx]), torch.tensor([0, n]), d**-0.5,
        rest=lambda *a, **k: None, min_prefill_tokens=1)
    need = sum(gathered) + 3 * q.numel() * 4  # K and V, the output and (with a prefix) the two partial outputs
    have = sdpa_prefill.workspace_bytes(n, ctx, hq, hk, d, torch.float32)
    assert sum(gathered) == 2 * ctx * hk * d * 4
    assert need <= have
    # the longest context dominates: a 200K-token context with GLM-4.7's 8 KV heads needs ~0.8 GB of gather
    big = sdpa_prefill.workspace_bytes(8192, 202752, 96, 8, 128, torch.bfloat16)
    small = sdpa_prefill.workspace_bytes(8192, 8192, 96, 8, 128, torch.bfloat16)
    assert big - small == 2 * (202752 - 8192) * 8 * 128 * 2
