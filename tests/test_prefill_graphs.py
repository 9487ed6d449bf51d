"""Piecewise prefill graphs (engine/prefill_graphs.py) on the CPU: what a replay computes -- the forward over rows
padded to a token bucket in static buffers, each attention core on the step's own context and rows -- must give
the plain engine's tokens and logprobs through chunked, cached, mixed and preempted steps. The capture itself
needs CUDA (tests/gpu/test_engine_gpu.py)."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

import fake_flash_attn
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.prefill_graphs import PrefillGraphs, token_buckets
from engine_checks import assert_pages_clean
from kernels import fa4_prefill


class Uncaptured(PrefillGraphs):
    """The runner's prefill_graphs with run() = run_uncaptured(); counts the steps it took, by route."""

    steps = 0
    seen_routes: tuple[bool, ...] = ()

    def can_run(self, input_ids: torch.Tensor, ctx) -> bool:
        return ctx.max_query_len > 1 and self.bucket_for(input_ids.numel()) is not None

    def run(self, input_ids, ctx):
        self.steps += 1
        self.seen_routes += (self.model.attention_route(ctx),)
        return self.run_uncaptured(input_ids, ctx)


def test_token_buckets():
    assert token_buckets(4096) == [64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert token_buckets(1000) == [64, 128, 256, 384, 512, 768, 1000]
    assert token_buckets(48) == [48]
    for n in (64, 100, 300, 8192):
        b = token_buckets(n)
        assert b == sorted(set(b)) and b[-1] == n and all(0 < x <= n for x in b)
        # padding a step to its bucket costs at most half again of its rows (above the smallest bucket)
        assert all(y <= 2 * x for x, y in zip(b, b[1:]))


def _pair(path, **kw):
    kw = dict(device="cpu", kv_block_size=16, num_kv_blocks=40, max_model_len=256, max_num_batched_tokens=96, **kw)
    plain, pieces = LLM(str(path), **kw), LLM(str(path), **kw)
    runner = pieces.engine.worker.runner
    runner.prefill_graphs = Uncaptured(runner.model, runner.kv_caches, runner.device, 96, 16)
    return plain, pieces, runner.prefill_graphs


def test_padded_pieces_match_plain_engine(tiny_dirs):
    plain, pieces, stand_in = _pair(tiny_dirs["fp8-channel"])
    rng = random.Random(5)
    shared = [rng.randrange(0, 1470) for _ in range(40)]
    prompts = [{"prompt_token_ids": shared + [rng.randrange(0, 1470) for _ in range(rng.randint(1, 150))]}
               for _ in range(10)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    a = plain.generate(prompts, params, use_tqdm=False)
    b = pieces.generate(prompts, params, use_tqdm=False)
    assert stand_in.steps > 10  # every prefill chunk and mixed step (96-token budget: buckets 64 and 96)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = [d[t].logprob for t, d in zip(x.prompt_token_ids[1:], x.prompt_logprobs[1:])]
        ly = [d[t].logprob for t, d in zip(y.prompt_token_ids[1:], y.prompt_logprobs[1:])]
        assert torch.allclose(torch.tensor(lx), torch.tensor(ly), atol=1e-4)
    assert pieces.stats()["num_preemptions"] > 0  # 40 pages of 16 tokens for 10 requests of up to 202
    assert_pages_clean(pieces.engine)


def test_padding_rows_write_no_kv(tiny_dirs):
    """A 20-token step padded to the 64 bucket writes the same KV cache as the plain forward: padding rows carry
    slot -1, and the attention cores see only the step's rows."""
    plain, pieces, stand_in = _pair(tiny_dirs["bf16"])
    ids = list(range(3, 23))
    for llm in (plain, pieces):
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert stand_in.steps == 1
    for layer, (k, v) in plain.engine.worker.runner.kv_caches.items():
        k2, v2 = pieces.engine.worker.runner.kv_caches[layer]
        assert torch.allclose(k, k2, atol=1e-6) and torch.allclose(v, v2, atol=1e-6)
        assert k.abs().sum() > 0  # the step wrote something to compare


def test_option(tiny_dirs):
    path = str(tiny_dirs["bf16"])
    cfg = EngineConfig.create(path, device="cpu", piecewise_cuda_graph_max_tokens=4096)
    assert cfg.prefill_graph_tokens == 0  # CPU: no graphs
    on = EngineConfig.create(path, device="cpu")  # on by default (CUDA), capped at the step budget
    assert on.piecewise_cuda_graph_max_tokens == 4096
    for budget, tokens in ((2048, 2048), (16384, 4096)):
        cuda = replace(on, device="cuda", scheduler=replace(on.scheduler, max_num_batched_tokens=budget))
        assert cuda.prefill_graph_tokens == tokens
        assert replace(cuda, enforce_eager=True).prefill_graph_tokens == 0
    with pytest.raises(ValueError, match="piecewise_cuda_graph_max_tokens"):
        EngineConfig.create(path, device="cpu", piecewise_cuda_graph_max_tokens=-1)


@pytest.mark.parametrize("method", ["mtp", "suffix"])
def test_speculation_and_overlap_through_pieces(tiny_dirs, method):
    """Speculative steps next to prefill chunks, with overlap scheduling: the pieces' hidden states are a view of a
    static buffer that the next step rewrites (as a replay's are); the MTP drafter reads them before that."""
    spec = {"method": method, "num_speculative_tokens": 3, "draft_budget": False}
    plain, pieces, stand_in = _pair(tiny_dirs["fp8-channel"], speculative_config=spec, overlap_scheduling=True)
    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(0, 1470) for _ in range(rng.randint(5, 100))] * 2}
               for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    a = plain.generate(prompts, params, use_tqdm=False)
    b = pieces.generate(prompts, params, use_tqdm=False)
    assert stand_in.steps > 3
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    assert pieces.stats()["spec_draft_tokens"] > 0
    assert_pages_clean(pieces.engine)


@pytest.mark.parametrize("fused", [False, True])
def test_fa4_routes_through_pieces(monkeypatch, tiny_dirs, fused):
    """With the FA4 prefill backend (a fake flash-attn-4 on CPU: the real signature, reference math): first chunks
    alone over their own K/V (the prompt-alone route, FA4 called between the pieces on q, k and v copied into the
    static buffers) and later chunks over cached keys (the paged route) give the plain FA4 engine's tokens."""
    fake_flash_attn.install_fa4(monkeypatch)
    monkeypatch.setattr(fa4_prefill, "device_supported", lambda device: True)
    monkeypatch.setattr(fa4_prefill, "FROM_TOKENS", 8)
    kw = dict(dtype="bfloat16", prefill_attention_backend="fa4", enable_fused_qk_norm_rope=fused)
    plain, pieces, stand_in = _pair(tiny_dirs["bf16"], **kw)
    rng = random.Random(11)
    prompts = [{"prompt_token_ids": [rng.randrange(0, 1470) for _ in range(rng.randint(20, 200))]} for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    a = plain.generate(prompts, params, use_tqdm=False)
    b = pieces.generate(prompts, params, use_tqdm=False)
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    assert set(stand_in.seen_routes) == {False, True}
    assert_pages_clean(pieces.engine)
