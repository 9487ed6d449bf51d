"""Test-only engine core for the disaggregation header tests (tests/server/test_server_disagg.py): no model.
It reports the disaggregation role given in `extra["mode"]` and answers every request at once with one token
whose text names the DisaggParams that reached `add_request`, so a test sees what went through the front end,
the engine client's "add" message and the engine process."""

from __future__ import annotations

from typing import Any

from engine.outputs import RequestDelta

TOKEN_ID = 100


class FakeDisaggCore:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._pending: list[RequestDelta] = []

    def info(self) -> dict[str, Any]:
        role = None
        if self.mode != "null":
            role = {"mode": self.mode, "bootstrap_addr": "tcp://127.0.0.1:8998" if self.mode == "prefill" else None}
        return {"max_model_len": 4096, "max_num_seqs": 8, "vocab_size": 151552, "eos_token_ids": [],
                "disaggregation": role, "stats": {}}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any, prompt: str | None = None,
                    tenant: str = "", disagg: Any = None) -> None:
        text = "disagg=none" if disagg is None else f"disagg={type(disagg).__name__}:{disagg.room}:{disagg.bootstrap_addr}"
        for index in range(params.n):
            self._pending.append(RequestDelta(request_id, index, [TOKEN_ID], text, finished=True,
                                              finish_reason="length", num_prompt_tokens=len(prompt_token_ids)))

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending)

    def step(self) -> list[RequestDelta]:
        out, self._pending = self._pending, []
        return out

    def abort_request(self, request_id: str) -> None:
        self._pending = [d for d in self._pending if d.request_id != request_id]

    def stats(self) -> dict[str, Any]:
        return {"num_running": 0, "num_waiting": len(self._pending)}

    def shutdown(self, stop_torchrun_ranks: bool = False) -> None:
        pass


def build(engine_kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> FakeDisaggCore:
    """Engine-process factory (EngineProcessSpec.core_factory)."""
    return FakeDisaggCore((extra or {}).get("mode", "null"))
