"""Programmatic dependent launch (kernels/triton_common.py): when it is on, and that a chain of PDL kernels
(each reading the one before) replayed in a CUDA graph gives bit for bit what the same chain gives without it."""
import pytest
import torch

import kernels.triton_common as common
from kernels.quant import quant_fp8_weight_per_channel


def test_pdl_off_on_cpu_and_by_env(monkeypatch):
    monkeypatch.delenv("GLINT_PDL", raising=False)
    assert common.pdl_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(common, "_pdl_capable", lambda device: True)
    assert common.pdl_launch(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("GLINT_PDL", "0")
    assert common.pdl_launch(torch.device("cuda")) == {"PDL": False}
    monkeypatch.setattr(common, "_pdl_capable", lambda device: False)
    monkeypatch.setenv("GLINT_PDL", "1")
    assert common.pdl_launch(torch.device("cuda")) == {"PDL": False}


def _chain(x, norm_w, weights, steps):
    """steps rounds of norm (+ residual) -> quant -> split-K swap GEMM (shared self-resetting tickets) ->
    swap GEMM quantizing its own input, all Triton: every kernel reads what the one before it wrote."""
    from kernels.triton_fp8_gemm_swap import fp8_gemm_swap
    from kernels.triton_norm import add_rms_norm
    from kernels.triton_quant import quant_fp8_per_token

    (w1, s1), (w2, s2) = weights
    h = x
    for _ in range(steps):
        y, x = add_rms_norm(h, x, norm_w, 1e-6)
        q, qs = quant_fp8_per_token(y)
        a = fp8_gemm_swap(q, qs, w1, s1, None, torch.bfloat16,
                          config=dict(BLOCK_W=64, BLOCK_K=256, SPLIT_K=4, num_warps=4, num_stages=4))
        h = fp8_gemm_swap(a, None, w2, s2, None, torch.bfloat16)
    return h


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper GPU")
def test_pdl_graph_chain_matches_plain_launches(monkeypatch):
    assert common.pdl_launch(torch.device("cuda"))["PDL"], "PDL should be on for Hopper with this Triton"
    torch.manual_seed(0)
    dev = torch.device("cuda")
    hidden, inter = 5120, 3072
    weights = [quant_fp8_weight_per_channel(torch.randn(inter, hidden, device=dev) * 0.02),
               quant_fp8_weight_per_channel(torch.randn(hidden, inter, device=dev) * 0.02)]
    norm_w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(torch.bfloat16)
    x0 = torch.randn(2, hidden, device=dev, dtype=torch.bfloat16)

    monkeypatch.setenv("GLINT_PDL", "0")
    plain = _chain(x0.clone(), norm_w, weights, 8)
    monkeypatch.setenv("GLINT_PDL", "1")
    eager_pdl = _chain(x0.clone(), norm_w, weights, 8)
    static_x = x0.clone()
    _chain(static_x, norm_w, weights, 8)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(static_x, norm_w, weights, 8)
    for _ in range(20):  # a race would show as a replay that differs
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain)
    assert torch.equal(eager_pdl, plain)
