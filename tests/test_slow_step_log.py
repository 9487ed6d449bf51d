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
