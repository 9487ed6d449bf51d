"""Greedy tokens equal HF transformers' under chunked prefill, prefix caching, preemption and big batches."""
from __future__ import annotations

import random

import pytest

from engine_checks import assert_pages_clean
from engine import LLM, SamplingParams
from hf_reference import hf_greedy, hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(tiny_bf16):
    return hf_model(tiny_bf16)


@pytest.fixture(scope="module")
def prompts(tiny_bf16):
    rng = random.Random(0)
    return [[rng.randrange(0, 1470) for _ in range(rng.randint(3, 90))] for _ in range(32)]


@pytest.fixture(scope="module")
def expected(hf, prompts):
    return [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


def _run(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_32_mixed_prompts_one_batch(tiny_bf16, prompts, expected):
    llm = LLM(str(tiny_bf16), device="cpu", max_num_seqs=64, max_num_batched_tokens=4096)
    assert _run(llm, prompts) == expected
    assert_pages_clean(llm.engine)


@pytest.mark.parametrize("budget", [16, 32])
def test_chunked_prefill(tiny_bf16, prompts, expected, budget):
    llm = LLM(str(tiny_bf16), device="cpu", max_num_batched_tokens=budget)
    sel = [i for i, p in enumerate(prompts) if len(p) > budget][:6] + [0, 1]
    assert _run(llm, [prompts[i] for i in sel]) == [expected[i] for i in sel]
    assert_pages_clean(llm.engine)


def test_prefix_caching_hits(tiny_bf16, hf):
    llm = LLM(str(tiny_bf16), device="cpu", kv_block_size=16, enable_prefix_caching=True)
    rng = random.Random(1)
    shared = [rng.randrange(0, 1470) for _ in range(50)]
    prompts = [shared + [rng.randrange(0, 1470) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    first = _run(llm, prompts[:1])
    rest = _run(llm, prompts[1:])
    again = _run(llm, prompts[:1])  # a full-prompt hit recomputes only the last token
    stats = llm.stats()
    assert stats["prefix_cache_hit_tokens"] >= 3 * 48
    assert first + rest == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    assert again == first
    assert_pages_clean(llm.engine)


@pytest.mark.parametrize("overlap", [False, True])
def test_one_token_request_feeds_prefix_cache(tiny_bf16, overlap):
    """A request that finishes on its first sampled token (max_tokens=1) still publishes its prompt pages."""
    llm = LLM(str(tiny_bf16), device="cpu", kv_block_size=16, enable_prefix_caching=True,
              overlap_scheduling=overlap)
    ids = list(range(40, 240))
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.stats()["cached_kv_blocks"] == len(ids) // 16
    before = llm.stats()["prefix_cache_hit_tokens"]
    llm.generate({"prompt_token_ids": ids + [7, 8, 9]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.stats()["prefix_cache_hit_tokens"] - before == (len(ids) // 16) * 16
    assert_pages_clean(llm.engine)


def test_preemption(tiny_bf16, prompts, expected):
    # 12 pages of 16 tokens: a few long requests cannot all fit at once.
    sel = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))[:6]
    llm = LLM(str(tiny_bf16), device="cpu", kv_block_size=16, num_kv_blocks=12, max_model_len=160)
    assert _run(llm, [prompts[i] for i in sel]) == [expected[i] for i in sel]
    assert llm.stats()["num_preemptions"] > 0
    assert_pages_clean(llm.engine)


def test_no_prefix_caching_same_tokens(tiny_bf16, prompts, expected):
    llm = LLM(str(tiny_bf16), device="cpu", enable_prefix_caching=False)
    assert _run(llm, prompts[:4] * 2) == expected[:4] * 2
    assert llm.stats()["prefix_cache_hit_tokens"] == 0
    assert_pages_clean(llm.engine)


def test_fusion_flags_same_tokens(tiny_bf16, prompts, expected):
    """--enable-shared-experts-fusion and --enable-fused-qk-norm-rope change kernels, not results."""
    llm = LLM(str(tiny_bf16), device="cpu", enable_shared_experts_fusion=True, enable_fused_qk_norm_rope=True)
    assert llm.engine.worker.model.layers[1].mlp.fused_shared
    assert llm.engine.worker.model.layers[0].self_attn.fused_qk_norm_rope
    assert _run(llm, prompts[:6]) == expected[:6]
    assert_pages_clean(llm.engine)
