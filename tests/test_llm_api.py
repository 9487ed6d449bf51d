"""The offline LLM API: inputs, sampling behaviour, stops, n, logprobs, abort, validation, page accounting."""
from __future__ import annotations

import pytest
import torch

from engine_checks import assert_pages_clean
from engine import LLM, SamplingParams
from engine.model_runner import prepare_step
from engine.logprobs import MIN_PROMPT_SLICE_ROWS, compute_prompt_logprobs, prompt_slice_rows
from engine.request import Request
from engine.scheduler import ScheduledRequest


@pytest.fixture(scope="module")
def llm(tiny_bf16):
    return LLM(str(tiny_bf16), device="cpu")


@pytest.fixture(autouse=True)
def _pages_clean_after(llm):
    yield
    assert_pages_clean(llm.engine)


def test_input_forms_and_order(llm):
    ids = llm.tokenizer.encode("hello world", add_special_tokens=False)
    outs = llm.generate(["hello world", {"prompt_token_ids": ids}, "a third prompt"],
                        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello world", None, "a third prompt"]
    assert outs[0].prompt_token_ids == ids and outs[1].prompt_token_ids == ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length" for o in outs)
    text = outs[0].outputs[0].text
    assert text == llm.tokenizer.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)


def test_default_max_tokens_fills_the_context(tiny_bf16):
    short = LLM(str(tiny_bf16), device="cpu", max_model_len=48)
    out = short.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 48 - 3 and out[0].outputs[0].finish_reason == "length"
    assert_pages_clean(short.engine)


def test_same_seed_same_output_and_batch_independent(llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    a = llm.generate("the seed", sp, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate(["other prompt", "the seed", "x y z"], sp, use_tqdm=False)[1].outputs[0].token_ids
    c = llm.generate("the seed", SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0].token_ids
    assert a == b and a != c


def test_stop_string_split_across_tokens(llm):
    base = llm.generate("stop strings", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    text, toks = base[0].outputs[0].text, base[0].outputs[0].token_ids
    # pick a stop string that straddles a token boundary somewhere in the middle
    pieces = [llm.tokenizer.decode(toks[:i], skip_special_tokens=True) for i in range(len(toks) + 1)]
    k = next(i for i in range(4, len(toks)) if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]) : len(pieces[k]) + 1]
    first = text.find(stop)
    out = llm.generate("stop strings", SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    inc = llm.generate("stop strings", SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True,
                                                       include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert inc.text == text[: first + len(stop)]


def test_stop_token_ids_and_eos(llm):
    base = llm.generate("stop ids", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    toks = base[0].outputs[0].token_ids
    out = llm.generate("stop ids", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[toks[3]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[: toks.index(toks[3]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == toks[3]
    # the model's own eos ids stop generation (forced with logit_bias), reason "stop", stop_reason None
    eos = llm.engine.model_config.eos_token_ids[1]
    out = llm.generate("eos", SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0}), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None
    # with skip_special_tokens=False the stop token's own text is still not part of the output
    raw = llm.generate("eos", SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0},
                                             skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    assert raw.token_ids == [eos] and raw.text == ""
    # min_tokens holds eos back
    out = llm.generate("eos", SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias={eos: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and eos not in out.token_ids[:4] and out.token_ids[4] == eos


def test_n_greater_than_one(llm):
    out = llm.generate("fan out", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = llm.generate("fan out", SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logprobs_and_prompt_logprobs_shapes(llm):
    ids = llm.tokenizer.encode("log probs please", add_special_tokens=False)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                       prompt_logprobs=2, ignore_eos=True), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 6
    for tok, d in zip(c.token_ids, c.logprobs):
        assert tok in d and 3 <= len(d) <= 4 and d[tok].rank == 1  # greedy token is the top one
        ranks = sorted(lp.rank for lp in d.values())
        assert ranks[:3] == [1, 2, 3]
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(c.token_ids, c.logprobs)))
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        d = out.prompt_logprobs[pos]
        assert ids[pos] in d and 2 <= len(d) <= 3


def test_one_token_prompt_has_prompt_logprobs_of_its_length(llm):
    # one entry per prompt token, [0] None: a one-token prompt (no row predicts a prompt token) gets [None], n = 2 too
    out = llm.generate({"prompt_token_ids": [42]}, SamplingParams(max_tokens=2, n=2, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


def test_chunked_prompt_logprobs_equal_unchunked(tiny_bf16, llm):
    ids = list(range(100, 170))
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0].prompt_logprobs
    small = LLM(str(tiny_bf16), device="cpu", max_num_batched_tokens=16)
    b = small.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0].prompt_logprobs
    assert len(a) == len(b) == len(ids)
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        assert all(abs(x[k].logprob - y[k].logprob) < 1e-4 for k in x)


def test_prompt_logprobs_scored_in_slices_inside_one_chunk(tiny_bf16):
    """The forward scores prompt rows a slice at a time (max(max_num_seqs, 256) rows: the slice the memory profile
    scores), so a prompt longer than a slice still prefills in one chunk; the scores equal the reference over all
    rows' logits. The slicing is exercised at 4 rows a slice here (the tiny model's prompts are short)."""
    small = LLM(str(tiny_bf16), device="cpu", max_num_seqs=4)
    ids = list(range(300, 370))
    runner = small.engine.worker.runner
    assert runner.prompt_slice_rows == prompt_slice_rows(4) == MIN_PROMPT_SLICE_ROWS  # max_num_seqs 4: the floor
    runner.prompt_slice_rows = 4
    prompt_rows, logit_shapes = [], []
    run, compute_logits = runner.run, runner.model.compute_logits

    def counted_run(inp, prev=None):
        prompt_rows.append(len(inp.prompt.rows) if inp.prompt is not None else 0)
        return run(inp, prev)

    def counted_logits(hidden):
        logit_shapes.append(hidden.shape[0])
        return compute_logits(hidden)

    runner.run, runner.model.compute_logits = counted_run, counted_logits
    try:
        out = small.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=5),
                             use_tqdm=False)[0]
    finally:
        runner.run, runner.model.compute_logits = run, compute_logits
    assert prompt_rows[0] == len(ids) - 1  # the whole prompt in the first step
    assert max(logit_shapes) <= 4 and sum(logit_shapes) >= len(ids) - 1

    eng = small.engine  # reference: one forward over the prompt with every row's logits, scored at once
    req = Request("ref", 0, ids, SamplingParams(max_tokens=1), 1)
    req.block_ids = eng.pool.allocate(-(-len(ids) // eng.block_size))
    inputs, _ = prepare_step([ScheduledRequest(req, 0, len(ids))], eng.block_size)
    inputs.logits_rows = list(range(len(ids)))
    logits = runner.run(inputs).logits
    eng.pool.free(req.block_ids)
    ref = compute_prompt_logprobs(logits[:-1], ids[1:], 5, chunk_rows=len(ids))
    got = out.prompt_logprobs
    assert got[0] is None and len(got) == len(ids)
    for pos in range(1, len(ids)):
        g, r = got[pos], ref[pos - 1]
        assert g[ids[pos]].rank == r[ids[pos]].rank
        assert g[ids[pos]].logprob == pytest.approx(r[ids[pos]].logprob, abs=1e-5)
        assert sorted(v.logprob for v in g.values()) == pytest.approx(sorted(v.logprob for v in r.values()), abs=1e-5)
    assert_pages_clean(eng)


def test_abort_frees_pages(llm):
    eng = llm.engine
    eng.add_request("r1", list(range(10, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("r2", list(range(10, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.stats()["used_kv_blocks"] > 0
    eng.abort_request("r1")
    deltas = eng.step()
    aborted = [d for d in deltas if d.request_id == "r1"]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    eng.abort_request("r2")
    eng.abort_request("never-existed")
    eng.step()


def test_abort_while_waiting(llm):
    eng = llm.engine
    eng.add_request("w", [1, 2, 3], SamplingParams(max_tokens=5))
    eng.abort_request("w")
    deltas = eng.step()
    assert [d.finish_reason for d in deltas if d.request_id == "w"] == ["abort"]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"max_tokens": 0}, "max_tokens")],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_invalid_prompts(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="too long"):
        llm.generate({"prompt_token_ids": [5] * llm.engine.max_model_len}, use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=llm.engine.max_model_len), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**7]}, use_tqdm=False)


def test_chat_applies_template(llm):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    text = llm.tokenizer.decode(out.prompt_token_ids)
    assert text.startswith("[gMASK]<sop>") and "<|system|>" in text and text.rstrip().endswith("<think>")
    off = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                   chat_template_kwargs={"enable_thinking": False}, use_tqdm=False)[0]
    assert llm.tokenizer.decode(off.prompt_token_ids).rstrip().endswith("</think>")


def test_stats_keys(llm):
    stats = llm.stats()
    for key in ("num_running", "num_waiting", "num_preemptions", "prefix_cache_hit_tokens", "free_kv_blocks",
                "cached_kv_blocks", "total_kv_blocks"):
        assert key in stats


def test_temperature_sampling_changes_with_seed_not_greedy(llm):
    g1 = llm.generate("greedy", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, seed=1), use_tqdm=False)
    g2 = llm.generate("greedy", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, seed=2), use_tqdm=False)
    assert g1[0].outputs[0].token_ids == g2[0].outputs[0].token_ids
    assert torch.tensor(g1[0].outputs[0].token_ids).numel() == 6


def test_detokenize_false_gives_ids_only(llm):
    sp = dict(temperature=0, max_tokens=5, ignore_eos=True)
    a = llm.generate("ids only", SamplingParams(**sp), use_tqdm=False)[0].outputs[0]
    b = llm.generate("ids only", SamplingParams(detokenize=False, **sp), use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.text and b.text == ""
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_llm_takes_exactly_the_engine_options(tiny_bf16):
    from engine.config import engine_options

    names = [opt.name for opt in engine_options()]
    assert len(names) == len(set(names)) and {"tensor_parallel_size", "kv_block_size", "speculative_config",
                                              "disaggregation_mode", "attention_backend"} <= set(names)
    assert all(name in LLM.__init__.__doc__ for name in names)  # help(LLM) lists them
    with pytest.raises(TypeError, match="tp_size"):
        LLM(str(tiny_bf16), device="cpu", tp_size=1)
    with pytest.raises(ValueError, match="kv_block_size must be a power of two"):
        LLM(str(tiny_bf16), device="cpu", kv_block_size=3)


def test_prompt_slice_rows_have_a_floor():
    """A slice reads the whole LM head, so it has at least MIN_PROMPT_SLICE_ROWS rows; max_num_seqs above it."""
    assert prompt_slice_rows(1) == prompt_slice_rows(MIN_PROMPT_SLICE_ROWS) == MIN_PROMPT_SLICE_ROWS
    assert prompt_slice_rows(1024) == 1024
