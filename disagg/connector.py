"""Builds the KV connector of a disaggregated instance from the engine config (the server calls this and hands
the result to EngineCore)."""
from __future__ import annotations

from engine.config import EngineConfig
from engine.kv_connector import KVConnector


def build_kv_connector(config: EngineConfig) -> KVConnector | None:
    if not config.disaggregation.enabled:
        return None
    raise NotImplementedError("prefill/decode roles are being built (issue 17)")
