"""A step() call longer than SLOW_STEP_S is logged with what it computed and counted in stats() (the server logs
then show stalls such as a new kernel variant compiling inside serving)."""
from __future__ import annotations

import logging

import engine.engine_core as engine_core
from engine import LLM, SamplingParams


def test_slow_steps_are_logged_and_counted(tiny_bf16, monkeypatch, caplog):
    llm = LLM(str(tiny_bf16), device="cpu", kv_block_size=16, num_kv_blocks=64, max_model_len=256)
    llm.generate([{"prompt_token_ids": list(range(5, 25))}], SamplingParams(temperature=0, max_tokens=4),
                 use_tqdm=False)
    assert llm.stats()["num_slow_steps"] == 0  # tiny steps: nowhere near a second
    monkeypatch.setattr(engine_core, "SLOW_STEP_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="engine.engine_core"):
        llm.generate([{"prompt_token_ids": list(range(40, 60))}], SamplingParams(temperature=0, max_tokens=4),
                     use_tqdm=False)
    assert llm.stats()["num_slow_steps"] >= 4
    assert any("slow step" in r.getMessage() and "20 tokens of 1 requests" in r.getMessage() for r in caplog.records)


def test_a_slow_step_names_the_cuda_allocator_events_since_the_last_one(tiny_bf16, monkeypatch, caplog):
    """On CUDA the slow-step line adds the caching allocator's cudaMalloc / cudaFree / retry counts since the
    previous slow step (an eager step of a new shape near a full GPU); none moved, nothing is added. The counters
    are faked here: this machine has no CUDA allocator."""
    counts = iter(range(100))

    def fake_events(device):
        n = next(counts)
        return {"num_device_alloc": 10 * n, "num_device_free": 10 * n, "num_alloc_retries": n // 3,
                "num_ooms": 0}

    monkeypatch.setattr(engine_core, "allocator_events", fake_events)
    llm = LLM(str(tiny_bf16), device="cpu", kv_block_size=16, num_kv_blocks=64, max_model_len=256)
    monkeypatch.setattr(engine_core, "SLOW_STEP_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="engine.engine_core"):
        llm.generate([{"prompt_token_ids": list(range(40, 60))}], SamplingParams(temperature=0, max_tokens=4),
                     use_tqdm=False)
    lines = [r.getMessage() for r in caplog.records if "slow step" in r.getMessage()]
    assert len(lines) >= 4
    # the first slow step: counters 0 at start-up -> 1; 10 more of each, retries 0 -> 0 (not named)
    assert lines[0].endswith("(CUDA allocator since the last slow step: 10 num_device_alloc, 10 num_device_free)")
    assert "1 num_alloc_retries" in lines[2] and "num_alloc_retries" not in lines[1]
    assert all("num_ooms" not in ln for ln in lines)
    monkeypatch.setattr(engine_core, "allocator_events", lambda device: {})
    with caplog.at_level(logging.WARNING, logger="engine.engine_core"):
        caplog.clear()
        llm.generate([{"prompt_token_ids": list(range(60, 70))}], SamplingParams(temperature=0, max_tokens=2),
                     use_tqdm=False)
    assert all(r.getMessage().endswith("requests") for r in caplog.records if "slow step" in r.getMessage())
