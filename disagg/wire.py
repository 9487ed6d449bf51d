"""Unpickling bytes that come from the network: the bootstrap socket's messages (disagg/bootstrap.py) and the
transfer agents' metadata (disagg/local_backend.py, disagg/nixl_backend.py). Plain pickle builds whatever object a
frame names and runs its code, so anyone who reaches a bootstrap port could run code in the engine; here a frame
may name only the types it is expected to hold (containers, numbers, strings and bytes need no name)."""
from __future__ import annotations

import io
import pickle
from typing import Any


class _Restricted(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a type this message may hold")
        return super().find_class(module, name)


def loads(data: bytes, types: tuple[type, ...] = ()) -> Any:
    """pickle.loads for network bytes: only `types` (and plain data) may be built."""
    return _Restricted(data, frozenset((t.__module__, t.__qualname__) for t in types)).load()


__all__ = ["loads"]
