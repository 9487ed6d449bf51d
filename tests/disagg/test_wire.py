"""disagg/wire.py: network bytes unpickle into our message types and plain data only; a frame naming anything
else (here: builtins.exec, which plain pickle would call) is refused before any of it runs."""
from __future__ import annotations

import pickle
import sys

import pytest

from disagg import wire
from disagg.protocol import INSTANCE_MESSAGES, Abort, Done, Hello, Reserve
from engine.outputs import Logprob


class _RunsCode:
    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return exec, (f"import sys; sys.modules[{self.flag!r}] = sys",)


def test_messages_round_trip():
    msgs = [Hello("decode-0", (b"\x00md",), "local"), Reserve(7, (1, 2, 3), 1, 40, -5, 1.5e9), Abort(7, "gone"),
            Done(7, 42, {42: Logprob(-0.5, 1, "x"), 3: Logprob(-2.0, 2)}, 4, (5, 6))]
    for m in msgs:
        assert wire.loads(pickle.dumps(m), INSTANCE_MESSAGES) == m
    md = {"backend": "local", "name": "p", "port": 5, "layout": [(0, 16, 4096)], "nixl": b"\x01"}
    assert wire.loads(pickle.dumps(md)) == md  # plain data needs no allowed type


def test_a_frame_that_would_run_code_is_refused():
    payload = pickle.dumps(_RunsCode("glint_wire_test_plain"))
    pickle.loads(payload)  # the payload works: plain pickle runs it
    assert "glint_wire_test_plain" in sys.modules
    del sys.modules["glint_wire_test_plain"]
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec"):
        wire.loads(pickle.dumps(_RunsCode("glint_wire_test_wire")), INSTANCE_MESSAGES)
    assert "glint_wire_test_wire" not in sys.modules
    with pytest.raises(pickle.UnpicklingError, match="Logprob"):  # allowed on the socket, not in metadata
        wire.loads(pickle.dumps({"x": Logprob(0.0, 1)}))
