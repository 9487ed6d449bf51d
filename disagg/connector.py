"""Builds the KV connector of a disaggregated instance from the engine config (the server calls this and hands
the result to EngineCore; torchrun ranks > 0 build their transfer worker with `kv_worker_factory`)."""
from __future__ import annotations

from disagg.decode import DecodeConnector
from disagg.prefill import PrefillConnector
from disagg.transfer_worker import build_transfer_worker
from engine.config import EngineConfig
from engine.kv_connector import KVConnector
from engine.model_worker import KVWorkerFactory


def build_kv_connector(config: EngineConfig) -> KVConnector | None:
    mode = config.disaggregation.mode
    if mode == "prefill":
        return PrefillConnector(config.disaggregation)
    if mode == "decode":
        return DecodeConnector(config.disaggregation)
    return None


def kv_worker_factory(config: EngineConfig) -> KVWorkerFactory | None:
    return build_transfer_worker if config.disaggregation.enabled else None
