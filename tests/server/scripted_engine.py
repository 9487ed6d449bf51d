"""Test-only engine wrapper: scripted output text, so HTTP tests can replay realistic GLM-4.7 outputs (reasoning,
tool calls) through the whole stack although the tiny model writes random gibberish.

Not part of the server: tests start `tests/server/scripted_server.py`, which runs the real server with
`build_scripted_core` as the engine-process factory, reading the JSON file named by GLINT_TEST_SCRIPTS
{"name": ["chunk", ...]} (it logs a warning); a chunk may also be {"text": ..., "sleep": seconds}, which
holds that step back (a slow prefill). A request whose prompt text contains `<<script:NAME>>` (the last one counts: a tool result can switch a
multi-turn client to another script) still
runs on the real engine (scheduling, KV pages, one real token per step), but each delta's text is replaced by
the next chunk of the script, and the request finishes with finish_reason "stop" after the last chunk (as if
the model had written EOS). Requests without the marker are untouched. Never set the variable in production.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any

from server.engine_process import build_engine_core

logger = logging.getLogger("glint.engine")

ENV_VAR = "GLINT_TEST_SCRIPTS"
_MARKER = re.compile(r"<<script:([A-Za-z0-9_.\-]+)>>")


class ScriptedEngineCore:
    def __init__(self, core: Any, scripts_path: str) -> None:
        with open(scripts_path) as f:
            self.scripts: dict[str, list[str]] = json.load(f)
        self.core = core
        self._active: dict[str, dict[int, list[str]]] = {}
        logger.warning(
            "TEST HOOK ACTIVE: scripted outputs from %s (%d scripts); not for production",
            scripts_path,
            len(self.scripts),
        )

    def __getattr__(self, name: str) -> Any:  # tokenizer, model_config, max_model_len, stats, ...
        return getattr(self.core, name)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: Any, prompt: str | None = None,
        tenant: str = "", disagg: Any = None,
    ):
        found = _MARKER.findall(prompt or "")  # the last marker: a later turn (a tool result) may name another
        m = found[-1] if found else None
        if m is None or m not in self.scripts:
            return self.core.add_request(request_id, prompt_token_ids, params, prompt=prompt, tenant=tenant,
                                         disagg=disagg)
        chunks = list(self.scripts[m])
        room = self.core.max_model_len - len(prompt_token_ids)
        n_tokens = max(1, min(len(chunks), room, params.max_tokens or room))
        scripted = dataclasses.replace(
            params, max_tokens=n_tokens, min_tokens=0, ignore_eos=True, stop=None, stop_token_ids=None
        )
        self.core.add_request(request_id, prompt_token_ids, scripted, prompt=prompt, tenant=tenant, disagg=disagg)
        self._active[request_id] = {i: list(chunks) for i in range(params.n)}

    def abort_request(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        self.core.abort_request(request_id)

    def step(self) -> list[Any]:
        deltas = self.core.step()
        for d in deltas:
            script = self._active.get(d.request_id)
            if script is None or d.finish_reason == "abort":
                continue
            chunks = script.get(d.index, [])
            chunk = chunks.pop(0) if chunks else ""
            if isinstance(chunk, dict):  # {"text": ..., "sleep": seconds}: a slow step (e.g. a long prefill)
                time.sleep(float(chunk.get("sleep", 0)))
                chunk = chunk.get("text", "")
            d.new_text = chunk
            d.new_logprobs = None
            if d.finished:
                # one real token per chunk: the budget ends with the script (an EOS-like stop) or before it
                d.finish_reason, d.stop_reason = ("length" if chunks else "stop"), None
                script.pop(d.index, None)
                if not script:
                    self._active.pop(d.request_id, None)
        return deltas


def build_scripted_core(engine_kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> ScriptedEngineCore:
    """Engine-process factory (EngineProcessSpec.core_factory) of tests/server/scripted_server.py."""
    return ScriptedEngineCore(build_engine_core(engine_kwargs, extra), os.environ[ENV_VAR])
