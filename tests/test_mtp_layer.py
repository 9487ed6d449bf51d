"""The NextN/MTP layer against an independent implementation of its formula: plain torch for the
enorm/hnorm/eh_proj/shared_head parts and HF transformers' decoder layer (with the MTP layer's weights) for
the MoE decoder layer inside it."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeForCausalLM as HFGlm4Moe

from kernels.quant import FP8_DTYPE, dequant_fp8_per_block, dequant_fp8_per_channel
from model.builder import build_model
from model.config import load_model_config
from model.context import ForwardContext
from model.loader import SafetensorsSource, scale_name_of


def _mtp_tensors(path, layer: int) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(path)
    names = set(src.names())
    out = {}
    for name in src.names():
        if not name.startswith(f"model.layers.{layer}.") or name.endswith(("_scale", "_scale_inv")):
            continue
        w = src.read(name, None, None, torch.device("cpu"))
        if w.dtype == FP8_DTYPE:
            sname = scale_name_of(names, name)
            s = src.read(sname, None, None, torch.device("cpu"))
            w = (dequant_fp8_per_block if sname.endswith("_inv") else dequant_fp8_per_channel)(w, s, torch.float32)
        out[name[len(f"model.layers.{layer}.") :]] = w.float()
    return out


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("fmt", ["bf16", "fp8-channel"])
def test_mtp_matches_independent_formula(tiny_dirs, fmt):
    path = tiny_dirs[fmt]
    cfg = load_model_config(path)
    n = cfg.num_hidden_layers
    model = build_model(cfg, torch.device("cpu"), torch.float32, with_mtp=True, progress=False)
    t = 7
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1400, (t,), generator=gen)
    prev_hidden = torch.randn(t, cfg.hidden_size, generator=gen)
    bs, nb = 16, 1
    shape = (nb, bs, cfg.num_key_value_heads, cfg.head_dim)
    ctx = ForwardContext(
        positions=torch.arange(t), slot_mapping=torch.arange(t), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32), query_start_loc=torch.tensor([0, t], dtype=torch.int32),
        max_query_len=t, max_seq_len=t, kv_caches={n: (torch.zeros(shape), torch.zeros(shape))},
    )
    with torch.no_grad():
        ours = model.mtp_forward(ids, prev_hidden, ctx)

    # Independent: HF decoder layer holding the MTP layer's weights, formula in plain torch.
    w = _mtp_tensors(path, n)
    hf_cfg = AutoConfig.from_pretrained(path)
    if hasattr(hf_cfg, "quantization_config"):
        del hf_cfg.quantization_config
    hf_cfg.num_hidden_layers = n + 1
    hf_cfg._attn_implementation = "eager"
    hf = HFGlm4Moe(hf_cfg).float().eval()
    layer = hf.model.layers[n]
    state, experts = {}, {}
    for name, tensor in w.items():
        m = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m:
            experts.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        elif not name.startswith(("enorm", "hnorm", "eh_proj", "shared_head")):
            state[name] = tensor
    e = len(experts)
    state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([experts[i]["gate"], experts[i]["up"]]) for i in range(e)])
    state["mlp.experts.down_proj"] = torch.stack([experts[i]["down"] for i in range(e)])
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    eps = cfg.rms_norm_eps
    emb = SafetensorsSource(path).read("model.embed_tokens.weight", None, None, torch.device("cpu")).float()[ids]
    u = torch.cat([_rms(emb, w["enorm.weight"], eps), _rms(prev_hidden, w["hnorm.weight"], eps)], -1) @ w["eh_proj.weight"].t()
    pos = torch.arange(t)[None]
    cos, sin = hf.model.rotary_emb(u[None], pos)
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out = layer(u[None], attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    out = out[0] if isinstance(out, tuple) else out
    ref = _rms(out[0], w["shared_head.norm.weight"], eps)
    assert (ours - ref).abs().max().item() < 1e-4

    # Swapping the concat order (a silent acceptance killer) must be detectable.
    u_swapped = torch.cat([_rms(prev_hidden, w["hnorm.weight"], eps), _rms(emb, w["enorm.weight"], eps)], -1)
    assert not torch.allclose(u_swapped @ w["eh_proj.weight"].t(), u, atol=1e-3)
