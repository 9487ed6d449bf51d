"""A prefill EngineCore and a decode EngineCore in one process, handing requests over through the real connector
(bootstrap ZMQ sockets + the transfer backend): the same greedy tokens as a colocated engine, and no page leaked
on either side when requests finish, fail, time out or are aborted."""
from __future__ import annotations

import dataclasses
import os
import pickle
import random
import sys
import threading
import time

import pytest
import torch
import zmq

import disagg.decode
from disagg.connector import build_kv_connector
from disagg.local_backend import LocalTransferAgent
from disagg.protocol import PostSends, QueueSends, Reserve
from disagg.transfer import NIXL_AVAILABLE
from disagg.transfer_base import PENDING
from disagg.transfer_worker import TransferWorker
from engine import LLM, EngineConfig, SamplingParams
from engine.engine_core import EngineCore
from engine.kv_connector import DisaggParams
from engine_checks import assert_pages_clean, reference_drafts
from model.builder import build_model
from model.config import load_model_config

BACKENDS = ["local"] + (["nixl"] if NIXL_AVAILABLE else [])
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def ucx_loopback():
    saved = os.environ.get("UCX_NET_DEVICES")
    os.environ["UCX_NET_DEVICES"] = "lo"
    yield
    if saved is None:
        os.environ.pop("UCX_NET_DEVICES", None)
    else:
        os.environ["UCX_NET_DEVICES"] = saved


# a small KV pool per engine: on CPU the default is sized for the model's whole context (GBs per engine)
SMALL_POOL = {"max_model_len": 2048, "num_kv_blocks": 256}


def make_engine(model, mode: str, backend: str, **kw) -> EngineCore:
    kw = {**SMALL_POOL, **kw}
    config = EngineConfig.create(
        str(model), device="cpu", disaggregation_mode=mode, disaggregation_transfer_backend=backend,
        disaggregation_bootstrap_port=0, **kw,
    )
    return EngineCore(config, kv_connector=build_kv_connector(config))


class Pair:
    def __init__(self, model, backend: str, prefill_kw=None, decode_kw=None, **kw) -> None:
        self.prefill = make_engine(model, "prefill", backend, **{**kw, **(prefill_kw or {})})
        self.decode = make_engine(model, "decode", backend, **{**kw, **(decode_kw or {})})
        self.addr = self.prefill.info()["disaggregation"]["bootstrap_addr"]
        self.rooms = random.Random(0)

    def add(self, rid: str, prompt: list[int], params: SamplingParams, to_prefill: bool = True) -> int:
        room = self.rooms.getrandbits(63)
        if to_prefill:
            self.prefill.add_request(rid, prompt, params, disagg=DisaggParams(room))
        self.decode.add_request(rid, prompt, params, disagg=DisaggParams(room, self.addr))
        return room

    def run(self, timeout_s: float = 120.0, on_step=None) -> dict[tuple[str, int], dict]:
        out: dict[tuple[str, int], dict] = {}
        deadline = time.time() + timeout_s
        while self.prefill.has_unfinished_requests() or self.decode.has_unfinished_requests():
            assert time.time() < deadline, "the pair did not finish"
            self.prefill.step()
            for d in self.decode.step():
                acc = out.setdefault((d.request_id, d.index), {"tokens": [], "finish": None, "error": None})
                acc["tokens"] += d.new_token_ids
                if d.finished:
                    acc["finish"], acc["error"] = d.finish_reason, d.error
            if on_step is not None:
                on_step(self)
        return out

    def close(self) -> None:
        self.prefill.shutdown()
        self.decode.shutdown()

    def assert_clean(self) -> None:
        for e in (self.prefill, self.decode):
            assert_pages_clean(e)
            assert not e.connector.held_pages()


class PollDrivenHandle:
    """A write that starts on its `polls`-th poll: the transfer moves only while its initiator polls it."""

    def __init__(self, start, polls: int = 1) -> None:
        self._start, self._real, self._left = start, None, polls

    def poll(self):
        if self._real is None:
            self._left -= 1
            if self._left > 0:
                return PENDING
            self._real = self._start()
        return self._real.poll()

    def release(self) -> None:
        if self._real is not None:
            self._real.release()


def colocated(model, prompts, params, **kw) -> list[list[list[int]]]:
    llm = LLM(str(model), device="cpu", **{**SMALL_POOL, **kw})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    return [[rng.randrange(0, 1400) for _ in range(n)] for n in (5, 16, 17, 40, 90, 150)]


# the production backend with async transfer, the fallback with sync (the other two pairings add nothing new)
@pytest.mark.parametrize("backend,async_transfer", [(BACKENDS[-1], True), ("local", False)])
def test_greedy_tokens_equal_colocated(tiny_bf16, prompts, backend, async_transfer, monkeypatch):
    expected = colocated(tiny_bf16, prompts, GREEDY)
    # slow writes down, so that the prefill side polls while some are still queued in the transfer thread
    post = TransferWorker._post
    monkeypatch.setattr(TransferWorker, "_post", lambda self, send, ready: (time.sleep(0.02), post(self, send, ready))[1])
    # and move data only while the prefill side polls, as NIXL does over CUDA IPC (on the H200 a sync-transfer
    # write posted after the prefill side's last poll sat for the full 60 s deadline)
    register = TransferWorker.register

    def register_poll_driven(self, kv_caches, rank):
        register(self, kv_caches, rank)
        write = self.agent.write
        self.agent.write = lambda *a, **k: PollDrivenHandle(lambda: write(*a, **k))
    monkeypatch.setattr(TransferWorker, "register", register_poll_driven)
    # overlap on: the sync write of step N is posted by the next step() call, after that call polled
    pair = Pair(tiny_bf16, backend, disaggregation_async_transfer=async_transfer,
                disaggregation_async_last_chunk_sync=False, disaggregation_timeout=20,
                overlap_scheduling=True)
    try:
        for i, p in enumerate(prompts):
            pair.add(f"r{i}", p, GREEDY)
        out = pair.run()
        got = [[out[(f"r{i}", 0)]["tokens"]] for i in range(len(prompts))]
        assert got == expected
        assert all(v["finish"] == "length" for v in out.values())
        pair.assert_clean()
        ps, ds = pair.prefill.stats(), pair.decode.stats()
        assert ps["disagg_handovers_total"] == ds["disagg_received_total"] == len(prompts)
        assert ps["disagg_pages_sent_total"] == sum(-(-len(p) // 16) for p in prompts)
        assert ps["disagg_prefill_seconds_total"] > 0 and ds["disagg_wait_seconds_total"] > 0
        assert 0 <= ds["disagg_landing_seconds_total"] < ds["disagg_wait_seconds_total"]
        # where the writes spent their time: each sat >= 20 ms before its post (the slowed-down _post above)
        writes = ps["disagg_writes_done_total"]
        assert writes >= len(prompts)
        assert ps["disagg_write_post_delay_seconds_total"] >= 0.02 * writes
        assert ps["disagg_write_flight_seconds_total"] > 0
        assert (ps["disagg_write_gpu_wait_seconds_total"] > 0) == async_transfer
    finally:
        pair.close()


def test_overlap_scheduling_on_both_sides(tiny_bf16, prompts):
    expected = colocated(tiny_bf16, prompts, GREEDY)
    pair = Pair(tiny_bf16, "local", overlap_scheduling=True, prefill_kw={"max_num_batched_tokens": 32})
    try:
        for i, p in enumerate(prompts):
            pair.add(f"r{i}", p, GREEDY)
        out = pair.run()
        assert [[out[(f"r{i}", 0)]["tokens"]] for i in range(len(prompts))] == expected
        pair.assert_clean()
    finally:
        pair.close()


def test_overlap_with_suffix_speculation_posts_every_sync_write(tiny_bf16, prompts):
    """Suffix speculation on both sides with overlap and sync transfer: a drafter that asks for the step in flight
    to be finished before drafting (every step, without a budget) must not make the prefill side skip posting
    that step's writes (chunked prompts' pages never reached the decode side, which gave up on them)."""
    expected = colocated(tiny_bf16, prompts, GREEDY)
    pair = Pair(tiny_bf16, "local", overlap_scheduling=True, speculative_config={"method": "suffix"},
                disaggregation_timeout=20, prefill_kw={"max_num_batched_tokens": 32})
    try:
        for i, p in enumerate(prompts):
            pair.add(f"r{i}", p, GREEDY)
        out = pair.run()
        assert [[out[(f"r{i}", 0)]["tokens"]] for i in range(len(prompts))] == expected
        assert pair.prefill.stats()["num_overlapped_steps"] > 0
        pair.assert_clean()
    finally:
        pair.close()


def test_chunked_prefill_prefix_hits_and_n_greater_than_one(tiny_bf16, prompts):
    """Long prompts in 16-token chunks on the prefill side; a repeated prompt hits the prefill side's prefix
    cache; n = 3 choices: one handed over, two decoded from the decode side's own prefix cache; MTP speculation
    on both sides (the NextN layer's KV is a layer of the pool, so it moves with the pages)."""
    long = prompts[-1] + prompts[-2]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=3)
    expected = colocated(tiny_bf16, [long, long], params)
    mtp = {"method": "mtp", "num_speculative_tokens": 3}
    pair = Pair(tiny_bf16, "local", speculative_config=mtp, prefill_kw={"max_num_batched_tokens": 16})
    try:
        pair.add("a", long, params)
        out_a = pair.run()
        pair.add("b", long, params)
        out_b = pair.run()
        for rid, out, exp in (("a", out_a, expected[0]), ("b", out_b, expected[1])):
            assert [out[(rid, i)]["tokens"] for i in range(3)] == exp
        assert pair.prefill.pool.hit_tokens >= (len(long) - 1) // 16 * 16  # "b": all full pages but the last
        assert pair.decode.pool.hit_tokens >= 2 * 2 * ((len(long) - 1) // 16 * 16)  # choices 1, 2 of a and b
        assert pair.decode.stats()["spec_num_verifies"] > 0
        pair.assert_clean()
    finally:
        pair.close()


@pytest.mark.parametrize("async_transfer", [True, False])
def test_writes_move_while_the_prefill_engine_does_not_step(tiny_bf16, prompts, async_transfer, monkeypatch):
    """Writes that move only while polled (several polls, as NIXL's progress) reach the decode side although
    the prefill engine stops stepping once every Done went out: its transfer thread polls them (a busy prefill
    instance steps once per long chunk)."""
    register = TransferWorker.register

    def register_poll_driven(self, kv_caches, rank):
        register(self, kv_caches, rank)
        write = self.agent.write
        self.agent.write = lambda *a, **k: PollDrivenHandle(lambda: write(*a, **k), polls=5)
    monkeypatch.setattr(TransferWorker, "register", register_poll_driven)
    pair = Pair(tiny_bf16, "local", disaggregation_async_transfer=async_transfer,
                disaggregation_async_last_chunk_sync=False, disaggregation_timeout=30,
                prefill_kw={"max_num_batched_tokens": 32})  # 30 s: 8 s failed on a loaded 2-core machine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        for i, p in enumerate(prompts):
            pair.add(f"r{i}", p, params)
        deadline, ran, out = time.monotonic() + 90, set(), {}

        def step_decode() -> None:
            for d in pair.decode.step():
                assert d.error is None, d.error
                out.setdefault(d.request_id, []).extend(d.new_token_ids)
        while len(ran) < len(prompts):  # until every prompt ran (each ends at its first token there)
            assert time.monotonic() < deadline
            ran |= {d.request_id for d in pair.prefill.step() if d.finished}
            step_decode()
        pair.prefill.step()  # its poll sends the last Dones; from here on only the decode engine steps
        while pair.decode.has_unfinished_requests():
            assert time.monotonic() < deadline, "the decode side never got every page"
            step_decode()
        assert [out[f"r{i}"] for i in range(len(prompts))] == [e[0] for e in colocated(tiny_bf16, prompts, params)]
        pair.run()  # the prefill side takes the Acks and lets its pages go
        pair.assert_clean()
    finally:
        pair.close()


@pytest.mark.parametrize("backend,async_transfer", [(BACKENDS[-1], True), ("local", False)])
def test_nextn_kv_moves_after_the_mtp_extend_wrote_it(tiny_bf16, prompts, backend, async_transfer, monkeypatch):
    """The NextN layer writes its KV for a prompt chunk after the chunk's target forward (the MTP extend): the
    pages must leave the prefill side after that, or the decode side drafts from stale NextN KV. Every draft
    the decode side makes equals a full recompute of the NextN chain from the whole sequence, including its
    first step's, which the prefill side drafted from the prompt's last hidden state and handed over."""
    mtp = {"method": "mtp", "num_speculative_tokens": 3, "draft_budget": False}
    pair = Pair(tiny_bf16, backend, speculative_config=mtp, disaggregation_async_transfer=async_transfer,
                prefill_kw={"max_num_batched_tokens": 32})
    cfg = load_model_config(tiny_bf16)
    ref_model = build_model(cfg, torch.device("cpu"), torch.float32, with_mtp=True, progress=False)
    dec = pair.decode
    seen: list[tuple[list[int], list[int]]] = []
    real = dec.drafter.propose

    def propose(slots):
        out = real(slots)
        by_key = {r.seq_key: r for r in dec.scheduler.running}
        seen.extend((by_key[s.seq_id].prompt_token_ids + by_key[s.seq_id].output_token_ids, list(d))
                    for s, d in zip(slots, out) if d)
        return out
    monkeypatch.setattr(dec.drafter, "propose", propose)
    try:
        for i, p in enumerate(prompts[2:]):  # 17..150 tokens: 1 to 5 chunks
            pair.add(f"r{i}", p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        pair.run()
        assert len(seen) >= 8
        first_step = {len(tokens) for tokens, _ in seen} & {len(p) + 1 for p in prompts[2:]}
        assert first_step == {len(p) + 1 for p in prompts[2:]}  # every request drafted its first decode step
        for tokens, draft in seen:
            assert draft == reference_drafts(ref_model, cfg, tokens, len(draft)), len(tokens)
        pair.assert_clean()
    finally:
        pair.close()


def test_second_turn_sends_only_what_the_decode_side_lacks(tiny_bf16, prompts):
    """An agentic second turn (the first turn's prompt + answer + more): the decode side's prefix cache holds the
    first turn's full pages, so the prefill side sends only the rest; tokens still equal the colocated ones."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    turn1 = prompts[-1]
    answer = colocated(tiny_bf16, [turn1], params)[0][0]
    turn2 = turn1 + answer + prompts[2]
    expected = colocated(tiny_bf16, [turn1, turn2], params)
    pair = Pair(tiny_bf16, "local")
    try:
        pair.add("t1", turn1, params)
        out1 = pair.run()
        sent1 = pair.prefill.stats()["disagg_pages_sent_total"]
        pair.add("t2", turn2, params)
        out2 = pair.run()
        assert [[out1[("t1", 0)]["tokens"]], [out2[("t2", 0)]["tokens"]]] == expected
        reused = (len(turn1) + len(answer) - 1) // 16  # full pages of turn 1 the decode side published
        sent2 = pair.prefill.stats()["disagg_pages_sent_total"] - sent1
        assert sent2 == -(-len(turn2) // 16) - reused
        pair.assert_clean()
    finally:
        pair.close()


def test_sampled_seeded_and_stop_on_first_token(tiny_bf16, prompts):
    """Seeded sampling gives the colocated tokens (the first token is sampled on the prefill side); a request
    whose first token is a stop token ends on the decode side at once."""
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    expected = colocated(tiny_bf16, prompts[:3], seeded)
    first = colocated(tiny_bf16, [prompts[3]], GREEDY)[0][0][0]
    stop_first = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[first])
    pair = Pair(tiny_bf16, "local")
    try:
        for i, p in enumerate(prompts[:3]):
            pair.add(f"s{i}", p, seeded)
        pair.add("stop", prompts[3], stop_first)
        out = pair.run()
        assert [[out[(f"s{i}", 0)]["tokens"]] for i in range(3)] == expected
        assert out[("stop", 0)]["finish"] == "stop" and out[("stop", 0)]["tokens"] == [first]
        pair.assert_clean()
    finally:
        pair.close()


def test_decode_gives_up_when_prefill_never_gets_the_request(tiny_bf16, prompts):
    """The router's prefill request is lost: the decode side fails the request at its deadline, frees the
    reservation, and the prefill side drops the early Reserve."""
    pair = Pair(tiny_bf16, "local", disaggregation_timeout=1.0)
    try:
        pair.add("lost", prompts[2], GREEDY, to_prefill=False)
        t0 = time.time()
        out = pair.run(timeout_s=20)
        assert out[("lost", 0)]["finish"] == "error" and "prefill" in out[("lost", 0)]["error"]
        assert time.time() - t0 < 10
        pair.assert_clean()
    finally:
        pair.close()


def test_abort_on_either_side_mid_handover_frees_both(tiny_bf16, prompts):
    """Client disconnects: abort on the decode side while the prompt is being prefilled, and on the prefill side
    before the Done; the other side ends the request too (error) and every page comes back on both sides."""
    pair = Pair(tiny_bf16, "local", prefill_kw={"max_num_batched_tokens": 16})
    try:
        pair.add("d", prompts[-1], GREEDY)
        pair.add("p", prompts[-2], GREEDY)
        steps = {"n": 0}

        def abort_early(p: Pair) -> None:
            steps["n"] += 1
            if steps["n"] == 3:
                p.decode.abort_request("d")
                p.prefill.abort_request("p")

        out = pair.run(timeout_s=60, on_step=abort_early)
        assert out[("d", 0)]["finish"] == "abort"
        assert out[("p", 0)]["finish"] == "error" and "prefill" in out[("p", 0)]["error"]
        for _ in range(50):  # the AbortAck releases the decode side's quarantined pages
            pair.prefill.step()
            pair.decode.step()
        pair.assert_clean()
    finally:
        pair.close()


def test_random_disconnects_leak_nothing(tiny_bf16):
    """60 requests, a third aborted at a random step on a random side: 0 pages leaked on both sides."""
    rng = random.Random(7)
    pair = Pair(tiny_bf16, "local", prefill_kw={"max_num_batched_tokens": 64}, disaggregation_timeout=20.0)
    try:
        victims: dict[str, tuple[int, str]] = {}
        for i in range(60):
            prompt = [rng.randrange(0, 1400) for _ in range(rng.randint(3, 70))]
            pair.add(f"q{i}", prompt, SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=True))
            if rng.random() < 0.33:
                victims[f"q{i}"] = (rng.randint(1, 12), rng.choice(["prefill", "decode"]))
        steps = {"n": 0}

        def disconnect(p: Pair) -> None:
            steps["n"] += 1
            for rid, (at, side) in victims.items():
                if at == steps["n"]:
                    (p.prefill if side == "prefill" else p.decode).abort_request(rid)

        out = pair.run(timeout_s=120, on_step=disconnect)
        assert len(out) == 60
        for rid in victims:
            assert out[(rid, 0)]["finish"] in ("abort", "error", "length")
        for _ in range(50):
            pair.prefill.step()
            pair.decode.step()
        pair.assert_clean()
    finally:
        pair.close()


def test_different_tp_sizes_are_refused_clearly(tiny_bf16, prompts, monkeypatch):
    """A decode instance whose Hello carries two ranks' agents (TP=2) against a TP=1 prefill instance: the
    prefill side refuses it by name and the request ends with that reason, nothing leaked."""
    pair = Pair(tiny_bf16, "local")
    try:
        monkeypatch.setattr(pair.decode.connector, "_metadata", pair.decode.connector._metadata * 2)
        pair.add("tp", prompts[1], GREEDY)
        out = pair.run(timeout_s=30)
        assert out[("tp", 0)]["finish"] == "error"
        assert "tensor-parallel size 2 on the decode side, 1 here" in out[("tp", 0)]["error"]
        pair.assert_clean()
    finally:
        pair.close()


def test_async_last_chunk_sync_posts_only_the_last_write_after_its_step(tiny_bf16, prompts, monkeypatch):
    """Async transfer by default (--disaggregation-async-last-chunk-sync): a chunked prompt's earlier writes ride
    on their steps (a CUDA event, then the transfer thread), its last write is posted after its step like sync
    transfer's, that step does not overlap the next, and the tokens are the colocated ones."""
    expected = colocated(tiny_bf16, prompts, GREEDY)
    calls: list[tuple[str, tuple[bool, ...]]] = []  # (message, each send's `last`)
    handle = TransferWorker.handle

    def spy(self, message):
        if isinstance(message, (PostSends, QueueSends)):
            calls.append((type(message).__name__, tuple(s.last for s in message.sends)))
        return handle(self, message)
    monkeypatch.setattr(TransferWorker, "handle", spy)
    riding = []
    after_forward = TransferWorker.after_forward
    monkeypatch.setattr(TransferWorker, "after_forward",
                        lambda self, sends: (riding.extend(s.last for s in sends), after_forward(self, sends))[1])
    pair = Pair(tiny_bf16, "local", disaggregation_async_transfer=True, overlap_scheduling=True,
                prefill_kw={"max_num_batched_tokens": 32})
    try:
        assert pair.prefill.info()["disaggregation"]["async_last_chunk_sync"]
        for i, p in enumerate(prompts):
            pair.add(f"r{i}", p, GREEDY)
        out = pair.run()
        assert [[out[(f"r{i}", 0)]["tokens"]] for i in range(len(prompts))] == expected
        pair.assert_clean()
        posted = [lasts for name, lasts in calls if name == "PostSends"]
        assert sum(len(x) for x in posted) == len(prompts) and all(all(x) for x in posted)  # one last write each
        assert not any(name == "QueueSends" for name, _ in calls)  # no MTP: the others ride on their steps
        chunked = sum(-(-len(p) // 32) - 1 for p in prompts)  # writes before each prompt's last chunk
        assert len(riding) >= chunked > 0 and not any(riding)
    finally:
        pair.close()


def test_async_last_chunk_sync_needs_async_transfer(tiny_bf16):
    with pytest.raises(ValueError, match="needs disaggregation_async_transfer"):
        EngineConfig.create(str(tiny_bf16), device="cpu", disaggregation_mode="prefill",
                            disaggregation_async_last_chunk_sync=True)


@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_aborted_write_never_lands_in_a_released_page(tiny_bf16, prompts, side, monkeypatch):
    """A write of the room is still landing (the decode side's receiver is slow) when either side aborts the
    request: the decode side keeps the room's pages until the prefill side confirms no write is in flight, so no
    byte lands in a page it has released (and may have handed to another request)."""
    started, gate, landed, violations = threading.Event(), threading.Event(), threading.Event(), []
    scatter = LocalTransferAgent._scatter

    def slow_scatter(self, conn, region, dst, staging, write):
        if not self.name.startswith("decode"):
            return scatter(self, conn, region, dst, staging, write)
        started.set()
        gate.wait(10)
        if write:
            violations.extend(int(p) for p in dst if pair.decode.pool.pages[int(p)].ref_count == 0)
        staging = scatter(self, conn, region, dst, staging, write)
        if region is self.regions.regions[-1]:
            landed.set()  # the first write is in
        return staging
    monkeypatch.setattr(LocalTransferAgent, "_scatter", slow_scatter)
    pair = Pair(tiny_bf16, "local", disaggregation_async_transfer=False, prefill_kw={"max_num_batched_tokens": 16})
    try:
        pair.add("r", prompts[-1], GREEDY)
        deadline = time.time() + 30
        while not started.is_set():  # the first chunk's write reached the decode side's receiver
            assert time.time() < deadline
            pair.prefill.step()
            pair.decode.step()
        (pair.decode if side == "decode" else pair.prefill).abort_request("r")
        until = time.time() + 2
        while time.time() < until and pair.decode.has_unfinished_requests():  # the write is stuck meanwhile
            pair.prefill.step()
            pair.decode.step()
        gate.set()
        deadline = time.time() + 30
        while not landed.is_set() or pair.prefill.has_unfinished_requests() or pair.decode.has_unfinished_requests():
            assert time.time() < deadline
            pair.prefill.step()
            pair.decode.step()
        assert violations == []
        pair.assert_clean()
    finally:
        gate.set()
        pair.close()


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_refused_room_leaves_no_trace_of_the_request(tiny_bf16, prompts, side):
    """A room already in use on the instance is refused with a clear error, and the refused request leaves
    nothing behind: no output for it (its other choices included), and its id can be used again."""
    pair = Pair(tiny_bf16, "local")
    engine = pair.prefill if side == "prefill" else pair.decode
    try:
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, n=2)
        room = pair.add("a", prompts[1], params)
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("b", prompts[2], params, disagg=DisaggParams(room, pair.addr))
        assert not [d for d in engine.step() if d.request_id == "b"]
        pair.add("b", prompts[2], params)
        out = pair.run()
        assert {k: v["finish"] for k, v in out.items()} == {(r, i): "length" for r in "ab" for i in range(2)}
        pair.assert_clean()
    finally:
        pair.close()


_RUNS_CODE_FLAG = "glint_bootstrap_ran_a_frame"


class _RunsCode:
    def __reduce__(self):
        return exec, (f"import sys; sys.modules[{_RUNS_CODE_FLAG!r}] = sys",)


def test_garbage_on_the_bootstrap_socket_is_dropped(tiny_bf16, prompts):
    """Bytes that are not a protocol message (a port scan, a wrong peer, a frame that would run code) reach the
    prefill instance's bootstrap socket: they are dropped unrun, the engine goes on and hands requests over."""
    pair = Pair(tiny_bf16, "local")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(pair.addr)
        sock.send(b"GET / HTTP/1.1\r\n\r\n")
        sock.send_multipart([b"two", b"frames"])
        sock.send(pickle.dumps(("not", "a", "message")))
        sock.send(pickle.dumps(_RunsCode()))  # plain pickle would run its code in the engine
        time.sleep(0.2)
        pair.prefill.step()
        assert _RUNS_CODE_FLAG not in sys.modules
        pair.add("r", prompts[2], GREEDY)
        out = pair.run()
        assert out[("r", 0)]["finish"] == "length" and len(out[("r", 0)]["tokens"]) == GREEDY.max_tokens
        pair.assert_clean()
    finally:
        sock.close(0)
        pair.close()


def test_failing_to_start_decoding_ends_every_choice(tiny_bf16, prompts, monkeypatch):
    """n = 2 on the decode side: choice 0's KV arrives but starting it fails (here: its output processing
    raises); choice 1, which waits for choice 0, ends with the error too instead of waiting forever."""
    pair = Pair(tiny_bf16, "local")
    append = pair.decode.outputs.append

    def broken_first_token(req, tokens, logprobs):
        if req.num_output_tokens == 0 and req.index == 0:
            raise RuntimeError("broken detokenizer")
        return append(req, tokens, logprobs)
    monkeypatch.setattr(pair.decode.outputs, "append", broken_first_token)
    try:
        pair.add("r", prompts[2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, n=2))
        out = pair.run(timeout_s=60)
        assert out[("r", 0)]["finish"] == "error" and "broken detokenizer" in out[("r", 0)]["error"]
        assert out.get(("r", 1), {}).get("finish") == "error"
        pair.assert_clean()
    finally:
        pair.close()


@pytest.mark.parametrize("async_transfer", [True, False])
def test_reserve_naming_pages_outside_the_peer_pool_fails_the_request(tiny_bf16, prompts, async_transfer,
                                                                      monkeypatch):
    """A (broken) decode instance's Reserve names pages its pool does not have: the write is refused, the
    request ends with that reason on both sides, and the prefill engine goes on serving."""
    pair = Pair(tiny_bf16, "local", disaggregation_async_transfer=async_transfer, disaggregation_timeout=30)
    send = pair.decode.connector.clients.send

    def send_bad_pages(addr, msg):
        if isinstance(msg, Reserve) and msg.room == bad:
            msg = dataclasses.replace(msg, pages=tuple(p + 100_000 for p in msg.pages))
        send(addr, msg)
    monkeypatch.setattr(pair.decode.connector.clients, "send", send_bad_pages)
    try:
        bad = pair.add("bad", prompts[2], GREEDY)
        pair.add("good", prompts[3], GREEDY)
        out = pair.run(timeout_s=20)
        assert out[("bad", 0)]["finish"] == "error" and "out of range" in out[("bad", 0)]["error"]
        assert out[("good", 0)]["finish"] == "length" and len(out[("good", 0)]["tokens"]) == GREEDY.max_tokens
        pair.assert_clean()
    finally:
        pair.close()


def test_prefill_abort_before_the_reserve_frees_the_decode_pages_at_once(tiny_bf16, prompts):
    """The client leaves while the request waits for its Reserve on the prefill side: the Reserve is answered
    with the Abort and the decode side gets its pages back at once (no write was ever posted), not at the end of
    a quarantine of disaggregation_timeout."""
    pair = Pair(tiny_bf16, "local", disaggregation_timeout=20)
    try:
        room = pair.rooms.getrandbits(63)
        pair.prefill.add_request("r", prompts[3], GREEDY, disagg=DisaggParams(room))
        pair.prefill.abort_request("r")
        pair.decode.add_request("r", prompts[3], GREEDY, disagg=DisaggParams(room, pair.addr))
        t0 = time.time()
        out = pair.run(timeout_s=30)
        assert out[("r", 0)]["finish"] == "error"
        assert time.time() - t0 < 10
        pair.assert_clean()
    finally:
        pair.close()


def run_greedy_and_check(pair: Pair, prompts: list[list[int]], expected: list[list[list[int]]]) -> None:
    """The prompts through the pair, greedy: every one ends without an error, with the expected tokens."""
    for i, p in enumerate(prompts):
        pair.add(f"r{i}", p, GREEDY)
    out = pair.run(timeout_s=60)
    assert [[out[(f"r{i}", 0)]["tokens"]] for i in range(len(prompts))] == expected
    assert all(v["error"] is None for v in out.values())


class _SkewedClock:
    """The `time` module as another host sees it: its wall clock and its monotonic clock both `offset_s` off."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s

    def monotonic(self) -> float:
        return time.monotonic() + self.offset_s

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.mark.parametrize("offset_s", [-3600.0, 3600.0])
def test_hosts_with_different_clocks_hand_over(tiny_bf16, prompts, offset_s, monkeypatch):
    """The decode host's clocks differ from the prefill host's (no synchronised wall clock, and monotonic clocks
    start at each host's boot): the Reserve says how long the decode side still waits, not when, so neither
    side's deadline is read on the other's clock. (With a wall-clock deadline in the Reserve, a decode host an hour
    behind had every handover fail at once.)"""
    monkeypatch.setattr(disagg.decode, "time", _SkewedClock(offset_s))
    expected = colocated(tiny_bf16, prompts[:3], GREEDY)
    pair = Pair(tiny_bf16, "local", disaggregation_timeout=20)
    try:
        run_greedy_and_check(pair, prompts[:3], expected)
        pair.assert_clean()
    finally:
        pair.close()


def test_mtp_prefill_with_every_request_retired_and_overlap_hands_over(tiny_bf16, prompts, monkeypatch):
    """MTP on an overlapping prefill instance whose requests start retired (the budget says the chain cannot pay):
    their steps keep no hidden states, so they may overlap, and a request its first token ended is finished by the
    next step() call; it must still be handed over (not left waiting for a non-overlapped step that never comes)."""
    mtp = {"method": "mtp", "num_speculative_tokens": 2, "draft_budget": False}
    expected = colocated(tiny_bf16, prompts[:3], GREEDY)
    pair = Pair(tiny_bf16, "local", speculative_config=mtp, overlap_scheduling=True, disaggregation_timeout=20)
    drafter = pair.prefill.drafter
    add = drafter.add

    def add_retired(seq_id, prompt, tenant=""):
        add(seq_id, prompt, tenant)
        drafter.retire(seq_id)
    monkeypatch.setattr(drafter, "add", add_retired)
    try:
        run_greedy_and_check(pair, prompts[:3], expected)
        assert pair.prefill.num_overlapped_steps > 0 and drafter.num_retired == 3
        pair.assert_clean()
    finally:
        pair.close()


def test_mtp_first_draft_failure_on_the_prefill_side_fails_that_request_alone(tiny_bf16, prompts, monkeypatch):
    """Disaggregated prefill with MTP drafts the decode side's first step when a request's first token ends it
    there; a fault in that drafting failed the whole engine step (the loop crashed). Now that request fails (on
    both sides: its room is aborted), the others hand over as usual."""
    mtp = {"method": "mtp", "num_speculative_tokens": 2, "draft_budget": False}
    expected = colocated(tiny_bf16, prompts[:3], GREEDY)
    pair = Pair(tiny_bf16, "local", speculative_config=mtp, disaggregation_timeout=20)
    propose = pair.prefill.drafter.propose
    faults = [1]

    def flaky(slots):
        if faults and len(slots) == 1:  # the first hand-over's drafting (the prefill side drafts nothing else alone)
            faults.pop()
            raise RuntimeError("injected drafting fault")
        return propose(slots)
    monkeypatch.setattr(pair.prefill.drafter, "propose", flaky)
    try:
        for i, p in enumerate(prompts[:3]):
            pair.add(f"r{i}", p, GREEDY)
        out = pair.run(timeout_s=60)
        failed = [i for i in range(3) if out[(f"r{i}", 0)]["finish"] == "error"]
        assert len(failed) == 1 and "the prefill instance gave up" in out[(f"r{failed[0]}", 0)]["error"]
        assert pair.prefill.num_failed_requests == 1
        assert all(out[(f"r{i}", 0)]["tokens"] == expected[i][0] for i in range(3) if i not in failed)
        pair.run()
        pair.assert_clean()
    finally:
        pair.close()
