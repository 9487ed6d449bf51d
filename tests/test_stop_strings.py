import itertools
import random

import pytest

from engine.stop_strings import StopStringMatcher, check_stop_strings


def stream(chunks, stops, include=False):
    m = StopStringMatcher(stops, include)
    out, matched, emitted = [], None, []
    for c in chunks:
        e, matched = m.feed(c)
        emitted.append(e)
        out.append(e)
        if matched is not None:
            break
    if matched is None:
        out.append(m.flush())
    return "".join(out), matched, emitted


def reference(text, stops, include=False):
    """First match = earliest end (ties: longest)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < (best[0] + len(best[1]), -len(best[1]))):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[: i + len(s)] if include else text[:i], s


def splits(text, max_parts=3):
    """Every way to cut text into up to max_parts chunks."""
    n = len(text)
    for k in range(max_parts):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            yield [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("include", [False, True])
def test_split_at_every_boundary(include):
    text = "Hello world, STOP here STOP again"
    for chunks in splits(text):
        assert stream(chunks, ["STOP"], include)[:2] == reference(text, ["STOP"], include)
    out, matched, _ = stream(list(text), ["STOP"], include)
    assert matched == "STOP" and out == ("Hello world, STOP" if include else "Hello world, ")


def test_never_emits_partial_stop_string():
    text = "abc <|end|> tail"
    for chunks in splits(text):
        _, _, emitted = stream(chunks, ["<|end|>"])
        assert "<" not in "".join(emitted)  # the stop string and any prefix of it are held back


def test_holdback_released_when_prefix_breaks():
    m = StopStringMatcher(["</answer>"])
    assert m.feed("x </ans") == ("x ", None)
    assert m.pending == "</ans"
    assert m.feed("wer!") == ("</answer!", None)
    m2 = StopStringMatcher(["</answer>"])
    m2.feed("x </ans")
    assert m2.feed("w!") == ("</answ!", None)
    assert m2.flush() == ""


def test_flush_releases_tail_at_end():
    m = StopStringMatcher(["END"])
    assert m.feed("the E") == ("the ", None)
    assert m.flush() == "E"


def test_overlapping_candidates():
    # "ab" ends before "abc" would; a stop in the middle of another's prefix
    assert reference("xxabc", ["abc", "b"]) == ("xxa", "b")
    for chunks in splits("xxabcd"):
        assert stream(chunks, ["abc", "b"])[:2] == ("xxa", "b")
        assert stream(chunks, ["bcd", "abcd"])[:2] == ("xx", "abcd")  # same end: longer wins
        assert stream(chunks, ["cd", "xab"])[:2] == ("x", "xab")
    # self-overlapping stop string: "aab" in "aaab"
    for chunks in splits("aaaab"):
        assert stream(chunks, ["aab"])[:2] == ("aa", "aab")


def test_random_chunkings_match_reference():
    rng = random.Random(0)
    alphabet = "ab c"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        include = rng.random() < 0.5
        cuts = (
            sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
            if len(text) > 1
            else []
        )
        bounds = (0, *cuts, len(text))
        chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
        assert stream(chunks, stops, include)[:2] == reference(text, stops, include), (text, stops, chunks)


def test_no_stops_passthrough_and_unicode():
    assert check_stop_strings("", "héllo", ()).emit == "héllo"
    out, matched, _ = stream(["你好", "世", "界！"], ["世界"])
    assert (out, matched) == ("你好", "世界")


def test_feed_after_match_is_noop():
    m = StopStringMatcher(["x"], include_stop_str_in_output=True)
    assert m.feed("ax b") == ("ax", "x")
    assert m.feed("more") == ("", "x")
