"""HF transformers' Glm4MoeForCausalLM loaded with the dequantized weights of a checkpoint folder (test oracle)."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeForCausalLM as HFGlm4Moe

from kernels.quant import FP8_DTYPE, dequant_fp8_per_block, dequant_fp8_per_channel
from model.config import load_model_config
from model.loader import SafetensorsSource, scale_name_of
from model.weight_map import is_mtp_name


def dequantized_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every main-model tensor of the checkpoint as fp32 (FP8 weights times their scales)."""
    cfg = load_model_config(path)
    src = SafetensorsSource(path)
    names = set(src.names())
    out = {}
    for name in src.names():
        if name.endswith((".weight_scale", ".weight_scale_inv")) or is_mtp_name(cfg, name):
            continue
        w = src.read(name, None, None, torch.device("cpu"))
        if w.dtype == FP8_DTYPE:
            scale_name = scale_name_of(names, name)
            s = src.read(scale_name, None, None, torch.device("cpu"))
            block = scale_name.endswith("_inv")
            w = (dequant_fp8_per_block if block else dequant_fp8_per_channel)(w, s, torch.float32)
        out[name] = w.float()
    return out


def hf_model(path: str | Path) -> HFGlm4Moe:
    hf_cfg = AutoConfig.from_pretrained(path)
    if hasattr(hf_cfg, "quantization_config"):
        del hf_cfg.quantization_config
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = HFGlm4Moe(hf_cfg).float().eval()
    tensors = dequantized_tensors(path)
    state = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m:
            experts.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = t
        else:
            state[name] = t
    n_experts = hf_cfg.num_local_experts if hasattr(hf_cfg, "num_local_experts") else hf_cfg.n_routed_experts
    for layer in sorted({k[0] for k in experts}):
        p = f"model.layers.{layer}.mlp.experts"
        state[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[(layer, e)]["gate"], experts[(layer, e)]["up"]]) for e in range(n_experts)]
        )
        state[f"{p}.down_proj"] = torch.stack([experts[(layer, e)]["down"] for e in range(n_experts)])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise AssertionError(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


@torch.no_grad()
def hf_logprobs(model: HFGlm4Moe, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position, fp32 [T, V]."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def hf_greedy(model: HFGlm4Moe, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    # An explicit mask: otherwise generate() masks every prompt token equal to pad_token_id.
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids):].tolist()
