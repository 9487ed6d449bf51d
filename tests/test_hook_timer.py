"""bench.hook_timer: a drafter's hooks keep their behaviour and their host time is summed per hook."""
from __future__ import annotations

import time

from bench.hook_timer import HookTimer


class FakeDrafter:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def propose(self, slots: list[int]) -> list[list[int]]:
        time.sleep(0.002)
        return [[s] for s in slots]

    def accepted(self, seq_id: int, tokens: list[int]) -> None:
        self.seen.append(seq_id)


def test_wrapped_hooks_return_what_they_did_and_add_up_their_time():
    d = FakeDrafter()
    timer = HookTimer.attach(d)
    assert d.propose([1, 2]) == [[1], [2]]
    d.accepted(7, [3])
    d.accepted(8, [4])
    assert d.seen == [7, 8]
    assert timer.calls == {"propose": 1, "accepted": 2}
    assert timer.seconds["propose"] >= 0.002 > timer.seconds["accepted"]
    assert timer.total_seconds() == sum(timer.seconds.values())


def test_a_hook_that_raises_is_still_counted():
    d = FakeDrafter()
    timer = HookTimer.attach(d)
    try:
        d.accepted(None, [])  # fine: no type check
        d.propose(None)  # iterating None raises
    except TypeError:
        pass
    assert timer.calls["propose"] == 1
