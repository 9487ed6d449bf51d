"""The whole tiny FP8 (compressed-tensors channel) model with FP8 weights kept, run through the Triton kernels
(under the interpreter on CPU, natively on GPU) against the same model on the torch reference ops.

Every op except attention must be bit-exact. Attention differs at bf16 rounding level (it rounds the softmax
probabilities to bf16 before P@V, like any flash kernel); the tiny model's very sharp logits amplify that, so
its error is judged against a noise floor measured here: the reference with bf16-sized noise on its
attention output."""
from __future__ import annotations

import pytest
import torch

import kernels.dispatch as D
from model.config import load_model_config
from model.context import ForwardContext
from model.glm4_moe import Glm4MoeForCausalLM
from model.loader import SafetensorsSource, load_weights
from model.quant_plan import QuantPlan
from model.tiny import write_tiny_checkpoint

T = 24


@pytest.fixture(scope="module", params=[False, True], ids=["unfused", "fused"])
def fp8_model(tmp_path_factory, request):
    """fused: shared expert as expert E and the fused qkv + QK-norm/RoPE/KV-store path."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "c", fmt="fp8-channel")
    cfg = load_model_config(path)
    src = SafetensorsSource(path)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantized = QuantPlan.build(cfg, dev, torch.bfloat16, set(src.names())).quantized_modules
    fused = request.param
    plan = QuantPlan(cfg, "fp8_channel", quantized, fused, fused)  # keep FP8 weights even on CPU
    model = Glm4MoeForCausalLM(cfg, plan, dtype=torch.bfloat16, device=dev)
    load_weights(model, cfg, src, model.tp, fused, torch.bfloat16, dev, progress=False)
    assert model.layers[0].self_attn.qkv_proj.quant == "fp8_channel"
    return model, cfg, dev


def _logprobs(model, cfg, dev, decode: int = 0) -> torch.Tensor:
    """Log-probs of a T-token prompt; with decode = n, of n more single-token decode steps after it (the
    decode-size kernels: swap-AB GEMMs, fused norm + router, split decode attention)."""
    hk, d = cfg.num_key_value_heads, cfg.head_dim
    kv = {i: (torch.zeros(8, 16, hk, d, dtype=torch.bfloat16, device=dev),
              torch.zeros(8, 16, hk, d, dtype=torch.bfloat16, device=dev)) for i in range(cfg.num_hidden_layers)}

    def step(start: int, n: int) -> torch.Tensor:
        ctx = ForwardContext(
            positions=torch.arange(start, start + n, device=dev), slot_mapping=torch.arange(start, start + n, device=dev),
            block_tables=torch.arange(8, device=dev, dtype=torch.int32)[None],
            seq_lens=torch.tensor([start + n], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            max_query_len=n, max_seq_len=start + n, kv_caches=kv,
        )
        ids = torch.arange(20 + start, 20 + start + n, device=dev)
        with torch.no_grad():
            return torch.log_softmax(model.compute_logits(model(ids, ctx)), -1)

    out = step(0, T)
    if not decode:
        return out
    return torch.cat([step(T + i, 1) for i in range(decode)])


def test_all_ops_but_attention_bit_exact(fp8_model):
    model, cfg, dev = fp8_model
    with D.kernel_backend("ref"):
        ref = _logprobs(model, cfg, dev)
    with D.kernel_backend("triton", D.TRITON_OPS - {"paged_attention"}):
        assert (_logprobs(model, cfg, dev) - ref).abs().max().item() == 0.0


def test_decode_steps_all_ops_but_attention_bit_exact(fp8_model):
    model, cfg, dev = fp8_model
    with D.kernel_backend("ref"):
        ref = _logprobs(model, cfg, dev, decode=3)
    with D.kernel_backend("triton", D.TRITON_OPS - {"paged_attention"}):
        assert (_logprobs(model, cfg, dev, decode=3) - ref).abs().max().item() == 0.0


def test_attention_within_bf16_noise_floor(fp8_model, monkeypatch):
    model, cfg, dev = fp8_model
    with D.kernel_backend("ref"):
        ref = _logprobs(model, cfg, dev)
    with D.kernel_backend("triton"):
        err = (_logprobs(model, cfg, dev) - ref).abs().mean().item()
    gen = torch.Generator(device="cpu").manual_seed(0)
    exact = D.paged_attention_ref

    def bf16_noise(*args, **kwargs):
        out = exact(*args, **kwargs)
        noise = torch.randn(out.shape, generator=gen).to(out.device)
        return (out.float() * (1 + 2**-9 * noise)).to(out.dtype)

    monkeypatch.setattr(D, "paged_attention_ref", bf16_noise)
    with D.kernel_backend("ref"):
        floor = (_logprobs(model, cfg, dev) - ref).abs().mean().item()
    assert floor > 0
    assert err <= 1.5 * floor + 0.02, (err, floor)
