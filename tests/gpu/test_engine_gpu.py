"""The engine on a CUDA GPU (run on the lent GPU machine: `pytest -m gpu`)."""
from __future__ import annotations

import json
import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine import LLM, SamplingParams  # noqa: E402
from engine_checks import assert_pages_clean  # noqa: E402
from kernels import fa4_prefill  # noqa: E402
from spec import DraftSlot, MtpCalls, MtpDrafter  # noqa: E402

def _llm(path, **kw) -> LLM:
    """Tests keep several engines alive in one process: give each a fixed, small KV pool."""
    kw.setdefault("num_kv_blocks", 1024)
    kw.setdefault("max_model_len", 4096)  # the tiny model has GLM-4.7's 202,752 positions
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


def reference_kernels():
    """Run the torch reference ops on the GPU: same bf16/FP8 numerics as the Triton kernels, no Triton."""
    from kernels.dispatch import kernel_backend

    return kernel_backend("ref")


def test_graphs_equal_eager(tiny_dirs):
    graphs = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16)
    assert graphs.engine.worker.runner.graphs is not None
    eager = _llm(tiny_dirs["fp8-channel"], device="cuda", enforce_eager=True)
    assert _greedy(graphs) == _greedy(eager)


def test_pdl_graphs_equal_plain_launches(tiny_dirs, monkeypatch):
    """Programmatic dependent launch (on by default on Hopper) against the same engine with it off
    (GLINT_PDL=0 at capture): the same greedy tokens through CUDA graphs, with both decode fusions."""
    from kernels.triton_common import pdl_launch

    assert pdl_launch(torch.device("cuda"))["PDL"] or torch.cuda.get_device_capability() < (9, 0)
    kw = dict(device="cuda", max_num_seqs=16, enable_shared_experts_fusion=True,
              enable_fused_qk_norm_rope=True)
    with_pdl = _greedy(_llm(tiny_dirs["fp8-channel"], **kw))
    monkeypatch.setenv("GLINT_PDL", "0")
    assert _greedy(_llm(tiny_dirs["fp8-channel"], **kw)) == with_pdl


def test_triton_path_matches_reference_path(tiny_dirs, cpu_ref, monkeypatch):
    """The GPU path (Triton, bf16 activations, FP8 weights and per-token FP8 activations) against the torch
    reference ops doing the same math on the GPU. The tiny model's sharp logits amplify bf16 rounding (measured
    on CPU: bf16-sized noise on attention alone moves log-probs by ~0.2), so the gap is judged against that noise
    floor, measured here; tests/kernels/test_kernels_in_model.py shows every other op bit-exact."""
    import kernels.dispatch as D

    gpu = _llm(tiny_dirs["fp8-channel"], device="cuda", enforce_eager=True)
    ids = list(range(20, 200))
    triton_lp = _prompt_lps(gpu, ids)
    with reference_kernels():
        ref_lp = _prompt_lps(gpu, ids)
        gen = torch.Generator(device="cpu").manual_seed(0)
        exact = D.paged_attention_ref

        def bf16_noise(*args, **kwargs):
            out = exact(*args, **kwargs)
            return (out.float() * (1 + 2**-9 * torch.randn(out.shape, generator=gen).to(out.device))).to(out.dtype)

        monkeypatch.setattr(D, "paged_attention_ref", bf16_noise)
        noisy_lp = _prompt_lps(gpu, ids)
    d = (triton_lp - ref_lp).abs()
    floor = (noisy_lp - ref_lp).abs().mean().item()
    cpu_d = (triton_lp - _prompt_lps(cpu_ref, ids)).abs()
    print(json.dumps({"triton_vs_ref_mean": d.mean().item(), "triton_vs_ref_max": d.max().item(),
                      "bf16_noise_floor_mean": floor, "gpu_vs_cpu_fp32_mean": cpu_d.mean().item()}))
    assert d.mean().item() <= 1.5 * floor + 0.02, (d.mean().item(), floor)
    assert cpu_d.mean().item() < 0.5


def test_fp8_kv_cache(tiny_dirs):
    fp8_kv = _llm(tiny_dirs["bf16"], device="cuda", kv_cache_dtype="fp8_e4m3", enforce_eager=True)
    bf16_kv = _llm(tiny_dirs["bf16"], device="cuda", enforce_eager=True)
    assert fp8_kv.engine.worker.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    ids = list(range(30, 230))
    lp = _prompt_lps(fp8_kv, ids)
    with reference_kernels():
        ref = _prompt_lps(fp8_kv, ids)
    d = (lp - ref).abs()
    vs_bf16 = (lp - _prompt_lps(bf16_kv, ids)).abs()
    print(json.dumps({"fp8kv_triton_vs_ref_mean": d.mean().item(), "fp8kv_vs_bf16kv_mean": vs_bf16.mean().item()}))
    assert d.mean().item() < 0.1, d.mean().item()
    assert vs_bf16.mean().item() < 0.5
    assert _greedy(fp8_kv)  # decode with FP8 KV runs


def test_prefix_cache_chunked_and_preempted_on_gpu(tiny_dirs):
    """In bf16 a different chunking changes GEMM shapes and so rounding (kernels are not batch-invariant), so
    teacher-forced log-probs must agree within bf16 tolerance; exact greedy equality is checked on CPU float32
    (tests/test_engine_equivalence.py). Prefix hits and preemption must not change the numbers at all beyond
    that either."""
    ids = list(range(40, 240))
    plain = _llm(tiny_dirs["bf16"], device="cuda", enforce_eager=True)
    ref = _prompt_lps(plain, ids)
    chunked = _llm(tiny_dirs["bf16"], device="cuda", max_num_batched_tokens=32, enforce_eager=True)
    d = (_prompt_lps(chunked, ids) - ref).abs()
    print(json.dumps({"chunked_vs_plain_mean": d.mean().item(), "chunked_vs_plain_max": d.max().item()}))
    assert d.mean().item() < 0.05 and d.max().item() < 0.5
    small = _llm(tiny_dirs["bf16"], device="cuda", num_kv_blocks=16, max_model_len=200, enforce_eager=True)
    outs = _greedy(small)
    assert small.stats()["num_preemptions"] > 0 and all(len(o) == 24 for o in outs)
    assert small.stats()["used_kv_blocks"] == 0
    # a prefix hit recomputes nothing it does not have to, and the continuation stays close
    plain.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
    before = plain.stats()["prefix_cache_hit_tokens"]
    hit = _prompt_lps_last(plain, ids + [7, 8, 9])
    assert plain.stats()["prefix_cache_hit_tokens"] > before
    assert hit is not None


def test_fa4_prefill_routes_match_triton(tiny_dirs):
    """Every FA4 route an engine takes for a long prompt (kernels/fa4_prefill.py) against the Triton prefill kernel:
    a prompt alone over its own fresh K/V; chunks of 2,048 after earlier ones (the second attends cached keys:
    gathered); FP8 pages (gathered, widened) against Triton on FP8. Both are scored by teacher-forced log-probs
    against the fp32 CPU engine: over 5,000 positions this random tiny model turns bf16 rounding differences into
    log-prob differences of up to ~9 nats at a few positions (FA4 vs Triton, and Triton bf16 vs FP8 KV, alike:
    H100, session 26), so a fixed tolerance on FA4 vs Triton cannot tell a rounding order from a bug; FA4 must be
    as close to fp32 as Triton is (a wrong mask, scale or key range moves the mean by far more)."""
    reason = fa4_prefill.unsupported_reason("cuda", torch.bfloat16, 32)
    if reason:
        pytest.skip(reason)
    ids = random.Random(0).choices(range(10, 900), k=5000)
    exact = _prompt_lps(LLM(str(tiny_dirs["bf16"]), device="cpu", dtype="float32", max_model_len=8192,
                            num_kv_blocks=600), ids)
    kw = dict(device="cuda", enforce_eager=True, max_model_len=8192)
    for extra in ({}, {"max_num_batched_tokens": 2048}, {"kv_cache_dtype": "fp8_e4m3"}):
        ref_kv = {"kv_cache_dtype": extra["kv_cache_dtype"]} if "kv_cache_dtype" in extra else {}
        ref = _prompt_lps(_llm(tiny_dirs["bf16"], prefill_attention_backend="triton", **kw, **ref_kv), ids)
        got = _prompt_lps(_llm(tiny_dirs["bf16"], prefill_attention_backend="fa4", **kw, **extra), ids)
        e_ref, e_got = (ref - exact).abs().mean().item(), (got - exact).abs().mean().item()
        print(json.dumps({"fa4_vs_triton": extra, "triton_vs_fp32": e_ref, "fa4_vs_fp32": e_got,
                          "fa4_vs_triton_mean": (got - ref).abs().mean().item()}))
        assert e_got < 1.5 * e_ref + 0.02, (extra, e_got, e_ref)


def _prompt_lps_last(llm, ids):
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4, logprobs=0),
                       use_tqdm=False)[0]
    return out.outputs[0].logprobs


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


def _agree_up_to_near_ties(got: list[int], ref, margin: float = 0.1) -> None:
    """Greedy sequences from different kernel shapes (verify rows vs decode rows round differently in bf16/FP8)
    may part only where the reference's top-2 log-probs were within `margin`: up to there they are equal."""
    ref_ids = ref.token_ids
    i = next((k for k, (a, b) in enumerate(zip(got, ref_ids)) if a != b), None)
    if i is None:
        assert len(got) == len(ref_ids)
        return
    top = sorted((lp.logprob for lp in ref.logprobs[i].values()), reverse=True)
    assert len(top) >= 2 and top[0] - top[1] < margin, (i, top[:2], got[i], ref_ids[i])


@pytest.mark.parametrize("method", ["suffix", "mtp"])
def test_speculation_graphs_equal_eager_and_plain(tiny_dirs, method):
    # verify steps replay (batch, 1 + K) graphs with padded chains; eager runs them unpadded. On the GPU the
    # kernels round verify rows and decode rows differently, so the check is the teacher-forced one: equal
    # tokens until a position where plain decoding itself had a near-tie. The draft budget is off: on CUDA it
    # learns wall-clock step times and (rightly) retires MTP on this random model, which would leave nothing to
    # compare.
    spec = {"method": method, "num_speculative_tokens": 4, "draft_budget": False}
    prompts = [{"prompt_token_ids": [21, 22, 23, 24, 25] * 8}, {"prompt_token_ids": list(range(300, 340))}]
    sp = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    plain = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16, enforce_eager=True)
    graphs = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16, speculative_config=spec)
    eager = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16, speculative_config=spec,
                 enforce_eager=True)
    ref = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=120, ignore_eos=True, logprobs=2),
                         use_tqdm=False)
    for llm in (graphs, eager):
        outs = llm.generate(prompts, sp, use_tqdm=False)
        for o, r in zip(outs, ref):
            _agree_up_to_near_ties(o.outputs[0].token_ids, r.outputs[0])
        stats = llm.stats()
        assert stats["used_kv_blocks"] == 0
        assert stats["spec_accepted_tokens"] > 0 if method == "suffix" else stats["spec_draft_tokens"] > 0


def test_mtp_draft_graphs_replay_what_the_eager_chain_drafts(tiny_dirs):
    """The captured MTP draft graphs (extend + chain in one replay) are used on decode/verify steps and
    draft what the eager NextN chain drafts from the same states: compared per step on one engine by running
    the step's views through both paths (restoring the NextN KV in between)."""
    spec = {"method": "mtp", "num_speculative_tokens": 3, "draft_budget": False}
    llm = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16, speculative_config=spec)
    eng = llm.engine
    w = eng.worker
    assert w.runner.mtp_graphs is not None and w.runner.mtp_graphs.graphs
    cache = w.runner.kv_caches[llm.config.model.num_hidden_layers]
    eager = MtpDrafter(llm.config.speculative, llm.config.cache.block_size, MtpCalls(w.execute_mtp))
    real_after_step, compared, pairs = eng.drafter.after_step, [], []

    def after_step(views, num_decoding=None):
        saved = [t.clone() for t in cache]
        eager.after_step(views, num_decoding)
        want = eager.propose([DraftSlot(v.seq_id, 3) for v in views if v.max_drafts])
        for t, s in zip(cache, saved):
            t.copy_(s)
        real_after_step(views, num_decoding)
        got = [eng.drafter._drafts.get(v.seq_id, []) for v in views if v.max_drafts]
        compared.append(len(got))
        pairs.extend(zip(got, want))
    eng.drafter.after_step = after_step
    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(1000) for _ in range(rng.randint(20, 200))]} for _ in range(6)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    assert sum(compared) >= 100
    # a request's last steps draft fewer (its max_tokens cuts the chain): both paths cut alike
    assert all(len(g) == len(w) for g, w in pairs) and any(len(g) == 3 for g, _ in pairs)
    # bf16 on the GPU: a batch of 6 padded to 8 rounds differently from the eager chain's batches, and this
    # random tiny model has many near-ties (a first run: 248 of 276 whole chains equal). So the check is per
    # chain position, among the chains that agree up to it: a wrong extend row, position, slot or hidden
    # state feeding a chain step makes that position disagree nearly always, not a few percent of the time.
    for j in range(3):
        same_before = [(g, w) for g, w in pairs if len(g) > j and g[:j] == w[:j]]
        agree = sum(g[j] == w[j] for g, w in same_before)
        assert agree >= 0.9 * len(same_before), (j, agree, len(same_before))
    assert llm.stats()["used_kv_blocks"] == 0


def test_draft_budget_uses_the_step_costs_timed_at_capture(tiny_dirs):
    """With graphs the budget's step cost is the capture-time replay times (rows = batch x rows per request),
    the MTP chain is priced as a whole (draft graph minus the extend-alone graph of the same shape), and
    measure_step_cost=False keeps the configured costs."""
    spec = {"method": "mtp", "num_speculative_tokens": 3}
    llm = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16, speculative_config=spec)
    runner, budget = llm.engine.worker.runner, llm.engine.drafter.budget
    assert len(runner.graphs.replay_ms) == len(runner.graphs.graphs) and runner.mtp_graphs.replay_ms
    assert all(0 < ms < 100 for ms in runner.graphs.replay_ms.values())
    rows = sorted({b * q for b, q in runner.graphs.replay_ms})
    assert budget.cost.rows == [float(r) for r in rows] and budget.chain_step_ms == 0.0
    drafts = runner.mtp_graphs.replay_ms
    assert {k[:2] for k in drafts if k[2]} == {k[:2] for k in drafts if not k[2]}
    assert budget.chain_fixed is not None and budget.chain_fixed.rows == sorted({float(b) for b, _, _ in drafts})
    # the chain (2 more NextN steps and 3 LM heads) costs something, less than the extend and verify together
    assert 0 < budget.chain_fixed(1) < budget.cost(4) + drafts[(1, 4, False)]
    assert all(a <= b for a, b in zip(budget.cost.ms, budget.cost.ms[1:]))
    fixed = _llm(tiny_dirs["fp8-channel"], device="cuda", max_num_seqs=16,
                 speculative_config={**spec, "measure_step_cost": False})
    assert fixed.engine.worker.runner.graphs.replay_ms == {}
    assert fixed.engine.drafter.budget.cost.ms == [float(t) for t in fixed.config.speculative.step_cost_ms]


def _count_replays(llm) -> list[int]:
    """Wraps the engine's piecewise prefill graphs' run(); the returned list's length counts the replays."""
    pieces = llm.engine.worker.runner.prefill_graphs
    assert pieces is not None and pieces.forwards
    calls: list[int] = []
    run = pieces.run

    def counted(input_ids, ctx):
        calls.append(input_ids.numel())
        return run(input_ids, ctx)

    pieces.run = counted
    return calls


def test_piecewise_prefill_graphs_equal_eager(tiny_dirs):
    """Prefill chunks and mixed steps replayed from piecewise graphs (padded to token buckets, attention cores eager
    between the pieces) against the same engine without them: teacher-forced prompt log-probs agree to bf16 noise,
    greedy tokens until a near-tie of the plain run; the pages come back."""
    kw = dict(device="cuda", max_num_seqs=16, max_num_batched_tokens=256, num_kv_blocks=256)
    plain = _llm(tiny_dirs["fp8-channel"], piecewise_cuda_graph_max_tokens=0, **kw)
    pieces = _llm(tiny_dirs["fp8-channel"], piecewise_cuda_graph_max_tokens=256, **kw)
    calls = _count_replays(pieces)
    rng = random.Random(1)
    shared = [rng.randrange(10, 900) for _ in range(70)]
    prompts = [{"prompt_token_ids": shared + [rng.randrange(10, 900) for _ in range(rng.randint(1, 400))]}
               for _ in range(8)]
    lp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2, prompt_logprobs=0)
    ref = plain.generate(prompts, lp, use_tqdm=False)
    got = pieces.generate(prompts, lp, use_tqdm=False)
    assert len(calls) > 8 and any(n not in pieces.engine.worker.runner.prefill_graphs.buckets for n in calls)
    for g, r in zip(got, ref):
        _agree_up_to_near_ties(g.outputs[0].token_ids, r.outputs[0])
        a = torch.tensor([d[t].logprob for t, d in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:])])
        b = torch.tensor([d[t].logprob for t, d in zip(g.prompt_token_ids[1:], g.prompt_logprobs[1:])])
        assert (a - b).abs().mean() < 0.02, (a - b).abs().max()
    assert pieces.stats()["used_kv_blocks"] == 0


@pytest.mark.parametrize("extra", [{}, {"kv_cache_dtype": "fp8_e4m3"}])
def test_piecewise_prefill_graphs_fa4_routes(tiny_dirs, extra):
    """FA4's routes replayed between pieces: a prompt alone over its own K/V (its first 2,048-token chunk, the
    prompt-alone route's graphs), later chunks over cached keys (the paged route's), against the eager engine."""
    reason = fa4_prefill.unsupported_reason("cuda", torch.bfloat16, 32)
    if reason:
        pytest.skip(reason)
    ids = random.Random(2).choices(range(10, 900), k=5000)
    kw = dict(device="cuda", max_model_len=8192, max_num_batched_tokens=2048, prefill_attention_backend="fa4",
              **extra)
    ref = _prompt_lps(_llm(tiny_dirs["bf16"], piecewise_cuda_graph_max_tokens=0, **kw), ids)
    pieces = _llm(tiny_dirs["bf16"], piecewise_cuda_graph_max_tokens=2048, **kw)
    calls = _count_replays(pieces)
    got = _prompt_lps(pieces, ids)
    assert calls == [2048, 2048, 904]
    assert {route for _, route in pieces.engine.worker.runner.prefill_graphs.forwards} == {False, True}
    print(json.dumps({"piecewise_fa4": extra, "mean": (got - ref).abs().mean().item(),
                      "max": (got - ref).abs().max().item()}))
    assert (got - ref).abs().mean() < 0.02


def test_long_prompt_logprobs_at_real_vocab_stay_in_the_profile(tmp_path):
    """An 8K-token prompt with prompt_logprobs at GLM-4.7's vocabulary: the forward scores its rows a slice at a time
    (each row is 151,552 fp32 logits; 8K rows at once would be 5 GB outside the memory profile). The request's
    transient memory stays near a plain 8K prefill's, and its first positions match a short prompt's."""
    from bench.real_shape import real_shape_model_dir

    path = real_shape_model_dir(num_layers=2, dense_layers=1, out_root=tmp_path)
    llm = _llm(path, device="cuda", load_format="dummy", max_model_len=8448, enforce_eager=True, max_num_seqs=256)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 150_000, (8192,), generator=gen).tolist()

    def transient(params: SamplingParams):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out

    plain, _ = transient(SamplingParams(max_tokens=1))
    with_lps, out = transient(SamplingParams(max_tokens=1, prompt_logprobs=5))
    print(json.dumps({"plain_transient_gib": plain / 2**30, "prompt_logprobs_transient_gib": with_lps / 2**30}))
    assert with_lps - plain < 2**30  # 256 rows x 151,552 x 4 B x a few copies, not 8192 rows (5 GB)
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    assert all(ids[i] in lps[i] and len(lps[i]) >= 5 for i in range(1, len(ids)))
    got = torch.tensor([lps[i][ids[i]].logprob for i in range(1, 512)])
    assert torch.isfinite(got).all()
    short = _prompt_lps(llm, ids[:512])  # the same positions computed without the 7.7K tokens after them
    # one 8K chunk against a 512-token prompt: different attention and GEMM shapes, so bf16 noise (0.067 mean on
    # an H100), not equality; a row scored against its neighbour's target (a slice off by one) is the control
    d, shifted = (got - short).abs(), (got[1:] - short[:-1]).abs()
    print(json.dumps({"mean_abs_dlogprob": d.mean().item(), "max_abs_dlogprob": d.max().item(),
                      "shifted_mean": shifted.mean().item()}))
    assert d.mean().item() < 0.15 and d.max().item() < 1.5
    assert d.mean().item() < 0.5 * shifted.mean().item()
    assert_pages_clean(llm.engine)
