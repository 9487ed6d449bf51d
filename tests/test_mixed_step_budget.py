"""The prefill cap for steps that also decode (--max-prefill-tokens-while-decoding): a long prompt is cut into
small chunks while other requests decode, gets the whole step budget when nothing decodes, and the tokens are
the same as without the cap."""
from __future__ import annotations

import random

from engine import LLM, SamplingParams
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.request import Request
from engine.scheduler import Scheduler
from engine_checks import assert_pages_clean
from test_block_pool import _done, _req


def _scheduler(cap: int | None) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=1024,
                             max_prefill_tokens_while_decoding=cap)
    return Scheduler(config, BlockPool(256, 4))


def _decode_one_token(s: Scheduler, x) -> None:
    _done(s, x)
    if x.samples:
        x.request.output_token_ids.append(7)


def test_prefill_chunks_shrink_only_while_something_decodes():
    s = _scheduler(cap=8)
    a = _req("a", list(range(5)), max_tokens=100)
    s.add(a)
    out = s.schedule()
    assert [(x.request.request_id, x.num_tokens) for x in out.scheduled] == [("a", 5)]  # nothing decodes yet
    _decode_one_token(s, out.scheduled[0])
    b = _req("b", list(range(100, 200)), max_tokens=100)
    s.add(b)
    sizes = []
    while b.num_computed_tokens < b.num_prompt_tokens:
        out = s.schedule()
        got = {x.request.request_id: x.num_tokens for x in out.scheduled}
        assert got["a"] == 1  # the decode runs every step
        sizes.append(got.get("b", 0))
        for x in out.scheduled:
            _decode_one_token(s, x)
    assert sizes == [8] * 12 + [4]  # 100 prompt tokens in chunks of at most 8
    s.finish(a, "stop")
    c = _req("c", list(range(300, 400)))
    s.add(c)
    out = s.schedule()  # b decodes now: c is capped too
    assert {x.request.request_id: x.num_tokens for x in out.scheduled} == {"b": 1, "c": 8}
    s.finish(b, "stop")
    for x in out.scheduled:
        _decode_one_token(s, x)
    out = s.schedule()  # nothing decodes: c takes the whole budget
    assert {x.request.request_id: x.num_tokens for x in out.scheduled} == {"c": 64}


def test_uncapped_scheduler_gives_prefill_the_whole_budget():
    s = _scheduler(cap=None)
    a = _req("a", list(range(5)), max_tokens=100)
    s.add(a)
    _decode_one_token(s, s.schedule().scheduled[0])
    s.add(_req("b", list(range(100, 200)), max_tokens=100))
    out = s.schedule()
    assert {x.request.request_id: x.num_tokens for x in out.scheduled} == {"a": 1, "b": 63}


def test_capped_engine_gives_the_same_greedy_tokens(tiny_bf16):
    rng = random.Random(5)
    prompts = [[rng.randrange(0, 1400) for _ in range(n)] for n in (3, 7, 120, 200, 64)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = LLM(str(tiny_bf16), device="cpu", max_num_batched_tokens=256)
    capped = LLM(str(tiny_bf16), device="cpu", max_num_batched_tokens=256, max_prefill_tokens_while_decoding=16)
    run = lambda llm: [o.outputs[0].token_ids for o in llm.generate(  # noqa: E731
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    assert run(capped) == run(plain)
    assert_pages_clean(capped.engine)


def test_prompt_logprobs_chunks_take_the_whole_budget():
    """Prompt-logprob rows are scored inside the forward a slice at a time (engine/logprobs.py), so a
    prompt-logprobs request's chunk is an ordinary chunk: it takes the step's budget, more rows than max_num_seqs."""
    s = _scheduler(cap=None)  # 64 tokens a step, max_num_seqs 8
    a = Request("a", 0, list(range(30)), SamplingParams(max_tokens=4, prompt_logprobs=1), 4)
    c = Request("c", 0, list(range(200, 260)), SamplingParams(max_tokens=4, prompt_logprobs=1), 4)
    for r in (a, c):
        s.add(r)
    out = s.schedule()
    assert [(x.request.request_id, x.num_tokens) for x in out.scheduled] == [("a", 30), ("c", 34)]
