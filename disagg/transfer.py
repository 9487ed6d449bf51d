"""KV page transfer for prefill/decode disaggregation: the interface (disagg.transfer_base) and the factory
behind `--disaggregation-transfer-backend {nixl,local}`.

    regions = KVPageRegions.from_kv_caches(kv_caches)          # once per TP rank, after the pool exists
    agent = create_transfer_agent("nixl", f"{role}-{instance}-tp{rank}", regions)
    peer = agent.add_peer(peer_metadata)                      # metadata() bytes from the peer's same TP rank
    h = agent.write(peer, src_pages, dst_pages, notification=room_id_bytes, timeout_s=30)
    h.poll()  # -> TransferState: PENDING | DONE | FAILED(kind, reason); never blocks
    agent.take_notifications()                                # on the target: writes that have fully landed

NIXL is the production engine; "local" is the in-tree socket fallback for machines without it.
"""
from __future__ import annotations

from disagg.kv_layout import KVPageRegions
from disagg.local_backend import LocalTransferAgent
from disagg.nixl_backend import NIXL_AVAILABLE, NixlTransferAgent
from disagg.transfer_base import (
    DONE,
    PENDING,
    FailureKind,
    LayoutMismatch,
    Notification,
    Status,
    TransferAgent,
    TransferError,
    TransferHandle,
    TransferState,
)

BACKENDS = ("nixl", "local")


def available_backends() -> list[str]:
    return [b for b in BACKENDS if b != "nixl" or NIXL_AVAILABLE]


def create_transfer_agent(backend: str, name: str, regions: KVPageRegions, **options) -> TransferAgent:
    """backend: "nixl" or "local". options go to the backend (nixl: progress_delay_us, backend_params;
    local: host). Agent names must be unique among the agents that talk to each other."""
    if backend == "nixl":
        if not NIXL_AVAILABLE:
            raise TransferError("--disaggregation-transfer-backend nixl: NIXL is not installed "
                                "(pip install nixl-cu13==1.5.1), use 'local' as the fallback")
        return NixlTransferAgent(name, regions, **options)
    if backend == "local":
        return LocalTransferAgent(name, regions, **options)
    raise ValueError(f"unknown transfer backend {backend!r} (choose from {', '.join(BACKENDS)})")


__all__ = [
    "BACKENDS", "DONE", "PENDING", "FailureKind", "KVPageRegions", "LayoutMismatch", "Notification", "Status",
    "TransferAgent", "TransferError", "TransferHandle", "TransferState", "available_backends",
    "create_transfer_agent",
]
