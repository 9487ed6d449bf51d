"""A prompt alone over an FP8 KV cache with the FA4 prefill backend (a fake flash-attn-4 on CPU: the real
signature and argument checks, reference math). Since session 28 the prologue kernel writes the values the cache
holds, widened (`qk_norm_rope(..., kv_out=)`), and FA4 attends those through its batch entry point instead of
gathering the FP8 pages it just wrote: the output must be exactly the gathered route's, the cache the same, and
both must agree with the reference path over the FP8 pages (which catches a scale applied wrongly on both)."""
from __future__ import annotations

import pytest
import torch

import fake_flash_attn
import kernels
from kernels import fa4_prefill
from model.attention import Attention
from model.config import load_model_config
from model.context import ForwardContext
from model.parallel import TPGroup
from model.tiny import write_tiny_checkpoint

FP8 = torch.float8_e4m3fn
N, PAGE = 40, 16
K_SCALE, V_SCALE = 0.05, 0.02


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_model_config(write_tiny_checkpoint(tmp_path_factory.mktemp("fa4fp8") / "c"))


def _attention(cfg, backend: str) -> Attention:
    torch.manual_seed(0)
    attn = Attention(cfg, 0, TPGroup(), "none", "none", torch.bfloat16, "cpu", prefill_attention_backend=backend)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return attn


def _prompt(cfg, attn: Attention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt of N tokens alone over fresh FP8 pages: (attention output, k pages, v pages)."""
    hk, d = cfg.num_key_value_heads, cfg.head_dim
    pages = -(-N // PAGE)
    kc = torch.zeros(pages, PAGE, hk, d, dtype=FP8)
    vc = torch.zeros(pages, PAGE, hk, d, dtype=FP8)
    ctx = ForwardContext(
        positions=torch.arange(N), slot_mapping=torch.arange(N),
        block_tables=torch.arange(pages, dtype=torch.int32)[None], seq_lens=torch.tensor([N], dtype=torch.int32),
        query_start_loc=torch.tensor([0, N], dtype=torch.int32), max_query_len=N, max_seq_len=N,
        kv_caches={0: (kc, vc)}, k_scale=K_SCALE, v_scale=V_SCALE, max_packed_kv=4 * N,
    )
    cos_sin = kernels.rope_cos_sin_cache(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, "cpu")
    x = torch.randn(N, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        return attn(x, ctx, cos_sin), kc, vc


def test_fp8_prompt_alone_attends_the_cache_values_without_a_gather(monkeypatch, cfg):
    calls = fake_flash_attn.install_fa4(monkeypatch)
    monkeypatch.setattr(fa4_prefill, "device_supported", lambda device: True)
    monkeypatch.setattr(fa4_prefill, "FROM_TOKENS", 8)
    monkeypatch.setattr(fa4_prefill, "GATHER_MIN_PAIRS", 1)
    attn = _attention(cfg, "fa4")
    fresh, kc, vc = _prompt(cfg, attn)
    assert calls == [("fa4.flash_attn_func", (1, N, cfg.num_attention_heads, cfg.head_dim))]

    monkeypatch.setattr(fa4_prefill, "FRESH_PROMPTS", False)  # the route before: gather the FP8 pages
    calls.clear()
    gathered, kc2, vc2 = _prompt(cfg, attn)
    assert calls == [("fa4.flash_attn_varlen_func[packed]", (N, cfg.num_attention_heads, cfg.head_dim))]
    assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))
    assert torch.equal(fresh, gathered)

    ref, kc3, _ = _prompt(cfg, _attention(cfg, "triton"))  # the reference kernels over the FP8 pages
    assert torch.equal(kc.view(torch.uint8), kc3.view(torch.uint8))
    torch.testing.assert_close(fresh.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert fresh.abs().max() > 10 * 2e-2  # an output the tolerance cannot swallow
