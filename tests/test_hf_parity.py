"""Our CPU float32 path against HF transformers' Glm4MoeForCausalLM on the same dequantized weights."""
from __future__ import annotations

import pytest
import torch

from engine_checks import assert_pages_clean
from engine import LLM, SamplingParams
from hf_reference import hf_greedy, hf_logprobs, hf_model

PROMPTS = [
    "The scheduler serves running requests first and fills the rest",
    "KV pages are hashed, chained over the parent page, so a prefix",
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris",
]


@pytest.fixture(scope="module", params=["bf16", "fp8-channel", "fp8-block"])
def pair(request, tiny_dirs):
    path = tiny_dirs[request.param]
    return hf_model(path), LLM(str(path), device="cpu", dtype="float32")


def test_prompt_logprobs_match_hf(pair):
    hf, llm = pair
    for text in PROMPTS:
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        ref = hf_logprobs(hf, ids)
        # Full distributions from our model at every position.
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=20), use_tqdm=False)[0]
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for pos in range(1, len(ids)):
            d = out.prompt_logprobs[pos]
            for tok, lp in d.items():
                assert abs(lp.logprob - ref[pos - 1, tok].item()) <= 1e-3, (text, pos, tok)
            # ranks agree with HF's ordering
            assert d[ids[pos]].rank == int((ref[pos - 1] > ref[pos - 1, ids[pos]]).sum()) + 1
    assert_pages_clean(llm.engine)


def test_full_logits_match_hf(pair):
    hf, llm = pair
    ids = llm.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    ref = hf_logprobs(hf, ids)
    eng = llm.engine
    from engine.model_runner import prepare_step
    from engine.request import Request
    from engine.scheduler import ScheduledRequest

    req = Request("full", 0, ids, SamplingParams(max_tokens=1), 1)
    req.block_ids = eng.pool.allocate(-(-len(ids) // eng.block_size))
    inputs, _ = prepare_step([ScheduledRequest(req, 0, len(ids))], eng.block_size)
    inputs.logits_rows = list(range(len(ids)))
    ours = torch.log_softmax(eng.worker.runner.run(inputs).logits, dim=-1)
    eng.pool.free(req.block_ids)
    assert (ours - ref).abs().max().item() <= 1e-3


def test_greedy_32_tokens_match_hf(pair):
    hf, llm = pair
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ids = [llm.tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    for i, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, i, 32)
        assert out.outputs[0].finish_reason == "length"
    assert_pages_clean(llm.engine)


def test_routing_is_nontrivial(pair):
    """The correction bias must change which experts are chosen on real hidden states of the prompt."""
    _, llm = pair
    model = llm.engine.worker.model
    moe_layers = [layer for layer in model.layers if layer.is_moe]
    captured = []
    hook = moe_layers[0].mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    ids = llm.tokenizer.encode(PROMPTS[0] + PROMPTS[1], add_special_tokens=False)
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
    hook.remove()
    x = captured[0]
    gate = moe_layers[0].mlp.gate
    scores = torch.sigmoid(x.float() @ gate.weight.t())
    k = model.cfg.num_experts_per_tok
    with_bias = (scores + gate.e_score_correction_bias).topk(k).indices.sort().values
    without = scores.topk(k).indices.sort().values
    changed = (with_bias != without).any(dim=-1).float().mean().item()
    assert changed > 0.1, f"bias changed the expert choice for only {changed:.0%} of tokens"
