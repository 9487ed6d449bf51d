"""The engine on a CUDA GPU (run on the lent GPU machine: `pytest -m gpu`)."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine import LLM, SamplingParams  # noqa: E402

def _llm(path, **kw) -> LLM:
    """Tests keep several engines alive in one process: give each a fixed, small KV pool."""
    kw.setdefault("num_kv_blocks", 1024)
    return LLM(str(path), **kw)


PROMPTS = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (3, 17, 64, 150)]


def _greedy(llm, n=24):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _prompt_lps(llm, ids):
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return torch.tensor([d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])])


@pytest.fixture(scope="module")
def cpu_ref(tiny_dirs):
    return LLM(str(tiny_dirs["fp8-channel"]), device="cpu", dtype="float32")


def test_graphs_equal_eager(tiny_dirs):
    graphs = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16)
    assert graphs.engine.worker.runner.graphs is not None
    eager = _llm(tiny_dirs["fp8-channel"], device="cuda", enforce_eager=True)
    assert _greedy(graphs) == _greedy(eager)


def test_gpu_matches_cpu_reference(tiny_dirs, cpu_ref):
    gpu = _llm(tiny_dirs["fp8-channel"], device="cuda")
    ids = list(range(20, 200))
    d = (_prompt_lps(gpu, ids) - _prompt_lps(cpu_ref, ids)).abs()
    # bf16 activations + FP8 weights/activations vs fp32 dequantized: log-probs agree to a few 1e-2
    assert d.mean().item() < 0.05 and d.max().item() < 0.5, (d.mean().item(), d.max().item())
    same = sum(a[:4] == b[:4] for a, b in zip(_greedy(gpu), _greedy(cpu_ref)))
    assert same >= 3


def test_fp8_kv_cache(tiny_dirs):
    bf16_kv = _llm(tiny_dirs["bf16"], device="cuda")
    fp8_kv = _llm(tiny_dirs["bf16"], device="cuda", kv_cache_dtype="fp8_e4m3")
    k_cache = fp8_kv.engine.worker.runner.kv_caches[0][0]
    assert k_cache.dtype == torch.float8_e4m3fn
    ids = list(range(30, 230))
    d = (_prompt_lps(bf16_kv, ids) - _prompt_lps(fp8_kv, ids)).abs()
    assert d.mean().item() < 0.1, d.mean().item()


def test_prefix_cache_chunked_and_preempted_on_gpu(tiny_dirs):
    ref = _greedy(_llm(tiny_dirs["bf16"], device="cuda", enforce_eager=True))
    chunked = _llm(tiny_dirs["bf16"], device="cuda", max_num_batched_tokens=32, enforce_eager=True)
    assert _greedy(chunked) == ref
    small = _llm(tiny_dirs["bf16"], device="cuda", num_kv_blocks=16, max_model_len=200, enforce_eager=True)
    assert _greedy(small) == ref and small.stats()["num_preemptions"] > 0


def test_real_shape_layers_match_cpu(tmp_path):
    """1 dense + 1 MoE layer at GLM-4.7's real widths, dummy FP8 weights: GPU (bf16/FP8 kernels) vs CPU fp32."""
    from bench.real_shape import real_shape_model_dir

    path = real_shape_model_dir(num_layers=2, dense_layers=1, out_root=tmp_path)
    ids = list(range(100, 140))
    gpu = _llm(path, device="cuda", load_format="dummy", max_model_len=1024, enforce_eager=True)
    g = _prompt_lps(gpu, ids)
    del gpu
    torch.cuda.empty_cache()
    cpu = LLM(str(path), device="cpu", dtype="float32", load_format="dummy", max_model_len=1024, num_kv_blocks=128)
    c = _prompt_lps(cpu, ids)
    d = (g - c).abs()
    print(json.dumps({"mean_abs_dlogprob": d.mean().item(), "max_abs_dlogprob": d.max().item()}))
    assert d.mean().item() < 0.1 and d.max().item() < 1.0
