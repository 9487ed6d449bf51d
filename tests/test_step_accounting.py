"""Step accounting (engine/step_accounting.py): what a run's steps computed and read, summed for the floor of a
serving run (bench/step_floor.py). Counts checked by hand on a chunked run of two prompts."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def stats(tiny_bf16):
    llm = LLM(str(tiny_bf16), device="cpu", max_model_len=512, max_num_batched_tokens=64)
    try:
        llm.generate([{"prompt_token_ids": list(range(10, 110))}, {"prompt_token_ids": list(range(20, 50))}],
                     SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
        yield llm.stats(), llm.engine.config.model
    finally:
        llm.shutdown()


def test_prefill_steps_count_prompt_tokens_and_attention_pairs(stats):
    s, _ = stats
    # 64-token steps: A[0:64]; A[64:100] + B[0:28]; B[28:30] beside A's first decode
    assert s["steps_prefill_steps"] == 3
    assert s["steps_prefill_tokens"] == 130
    pairs = (64 * 0 + 64 ** 2 / 2) + (36 * 64 + 36 ** 2 / 2) + (28 ** 2 / 2) + (2 * 28 + 2 ** 2 / 2)
    assert s["steps_prefill_attention_pairs"] == pairs
    assert s["steps_prefill_decode_seqs"] == 1 and s["steps_prefill_decode_context_tokens"] == 101
    assert s["steps_prefill_seconds"] > 0


def test_decode_steps_count_requests_and_the_context_they_read(stats):
    s, _ = stats
    # 40 tokens, 2 first tokens from prefill, 1 decode inside a prefill step: 37 decode rows in decode steps
    assert s["steps_decode_seqs"] == s["steps_decode_rows"] == 37
    # A's decode rows sit at positions 100..118 (each reads position + 1 tokens), the first of them in a prefill
    # step; B's at 30..48
    context = sum(range(102, 120)) + sum(range(31, 50))
    assert s["steps_decode_context_tokens"] == context
    assert s["steps_decode_steps"] == 19 and s["steps_decode_seconds"] > 0


def test_the_model_footprint(stats):
    s, cfg = stats
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 on CPU
    assert s["model_kv_bytes_per_token"] == kv
    assert s["model_routed_experts"] == cfg.n_routed_experts and s["model_expert_slots"] == cfg.n_routed_experts
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert s["model_expert_slot_bytes"] == moe_layers * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert s["model_other_weight_bytes"] > cfg.vocab_size * cfg.hidden_size * 4  # the LM head at least
