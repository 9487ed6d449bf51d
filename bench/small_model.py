"""GLM4-MoE (glm4_moe) in plain torch, for training: the forward math of HF transformers'
Glm4MoeForCausalLM (QK-norm, partial RoPE on the first half of each head, first_k_dense_replace dense layers,
then MoE layers with a shared expert and sigmoid group-limited routing with the correction bias) plus the
NextN/MTP layer of model/nextn.py, stored as layer num_hidden_layers. Parameter names are the checkpoint's,
except that the routed experts are stacked per layer ([E, ...] tensors; checkpoint_tensors and
load_checkpoint_tensors convert).

The routed experts run as one wide MLP over all experts with the routing weights (zero for unchosen experts)
multiplied into the activation: the same values and gradients as a sparse dispatch, as two plain matmuls."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, load_model_config
from model.loader import SafetensorsSource


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dt)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rotary_dim] (fp32), the halves duplicated as HF's rotate_half layout wants them."""
    rd = cfg.rotary_dim
    exponents = torch.arange(0, rd, 2, dtype=torch.float32, device=positions.device) / rd
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([(xr.float() * cos + rot.float() * sin).to(x.dtype), xp], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.nq, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.nq * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.nkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.nkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nq * d, h, bias=False)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nq, self.d)
        k = self.k_proj(x).view(b, t, self.nkv, self.d)
        v = self.v_proj(x).view(b, t, self.nkv, self.d)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2).to(v.dtype) for z in (q, k, v))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        rep = self.nq // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.nq * self.d))


class MLP(nn.Module):
    def __init__(self, h: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; the correction bias (a buffer, moved by the trainer towards balanced load) only picks
    the experts: best topk_group groups by the sum of their top-2 biased scores, then top-k inside them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (dense routing weights [N, E] fp32, zero for unchosen experts; chosen ids [N, k])."""
        c = self.cfg
        e, g = c.n_routed_experts, c.n_group
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        group_scores = choice.view(-1, g, e // g).topk(min(2, e // g), dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(c.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)
        choice = choice.masked_fill(score_mask == 0, float("-inf"))
        idx = choice.topk(c.num_experts_per_tok, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * c.routed_scaling_factor
        return torch.zeros_like(scores).scatter(1, idx, w), idx


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        e, i, h = self.gate_proj.shape
        a = F.silu(x @ self.gate_proj.reshape(e * i, h).t()) * (x @ self.up_proj.reshape(e * i, h).t())
        a = (a.view(-1, e, i) * weights.unsqueeze(-1).to(a.dtype)).view(-1, e * i)
        return a @ self.down_proj.permute(0, 2, 1).reshape(e * i, h)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor, loads: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`loads` gets this forward's token count per expert appended (for the correction-bias update)."""
        flat = x.reshape(-1, x.shape[-1])
        weights, idx = self.gate(flat)
        if loads is not None:
            ones = torch.ones(idx.numel(), device=idx.device)
            zeros = torch.zeros(weights.shape[-1], device=idx.device)
            loads.append(zeros.scatter_add(0, idx.flatten(), ones))
        out = self.experts(flat, weights) + self.shared_experts(flat)
        return out.view(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, loads: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y = self.post_attention_layernorm(x)
        return x + (self.mlp(y, loads) if isinstance(self.mlp, MoE) else self.mlp(y))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MtpLayer(DecoderLayer):
    """The NextN layer: a MoE decoder layer with enorm, hnorm, eh_proj in front and shared_head.norm after."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers: list[nn.Module] = [DecoderLayer(cfg, i) for i in range(n)]
        layers += [MtpLayer(cfg, n + i) for i in range(cfg.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SmallGlm(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.num_nextn_predict_layers != 1:
            raise ValueError("the trainer builds exactly one MTP layer (num_nextn_predict_layers 1)")
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def mtp_layer(self) -> MtpLayer:
        return self.model.layers[self.cfg.num_hidden_layers]  # type: ignore[return-value]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hidden(self, ids: torch.Tensor, loads: list[torch.Tensor] | None = None) -> torch.Tensor:
        """ids [B, T] (positions 0..T-1) -> final-normed hidden states [B, T, H]."""
        cos, sin = rope_cos_sin(self.cfg, torch.arange(ids.shape[1], device=ids.device))
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers[: self.cfg.num_hidden_layers]:
            x = layer(x, cos, sin, loads)
        return self.model.norm(x)

    def mtp_hidden(
        self, next_ids: torch.Tensor, prev_hidden: torch.Tensor, loads: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The NextN layer at positions 0..T-1: slot p holds token p+1 (next_ids[:, p]) and the target's
        final-normed hidden h_p (prev_hidden[:, p]); its output (after shared_head.norm) predicts token
        p+2."""
        m = self.mtp_layer
        cos, sin = rope_cos_sin(self.cfg, torch.arange(next_ids.shape[1], device=next_ids.device))
        e = self.model.embed_tokens(next_ids)
        u = m.eh_proj(torch.cat([m.enorm(e), m.hnorm(prev_hidden)], dim=-1))
        return m.shared_head.norm(m(u, cos, sin, loads))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, T+1] -> (main logits [B, T, V] for tokens 1..T, MTP logits [B, T-1, V] for tokens 2..T,
        tokens per expert [MoE layers, E] of this forward)."""
        x, y = ids[:, :-1], ids[:, 1:]
        loads: list[torch.Tensor] = []
        h = self.hidden(x, loads)
        g = self.mtp_hidden(y[:, :-1], h[:, :-1], loads)
        return self.lm_head(h), self.lm_head(g), torch.stack(loads)


def losses(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(main CE over tokens 1..T, MTP CE over tokens 2..T, expert loads) of a batch ids [B, T+1]; `model`
    is a SmallGlm or its compiled wrapper."""
    logits, mtp_logits, loads = model(ids)
    v = logits.shape[-1]
    main = F.cross_entropy(logits.float().reshape(-1, v), ids[:, 1:].reshape(-1))
    mtp = F.cross_entropy(mtp_logits.float().reshape(-1, v), ids[:, 2:].reshape(-1))
    return main, mtp, loads


@torch.no_grad()
def init_weights(model: SmallGlm, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) matrices (output projections scaled by 1/sqrt(2 * layers)), zero biases, unit norms."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out_scale = 1.0 / math.sqrt(2 * (model.cfg.num_hidden_layers + 1))
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            s = std * (out_scale if re.search(r"(o_proj|down_proj)", name) else 1.0)
            p.copy_(torch.randn(p.shape, generator=g) * s)


_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)")


def checkpoint_tensors(model: SmallGlm) -> dict[str, torch.Tensor]:
    """fp32 CPU tensors under the GLM-4.7 checkpoint names (experts unstacked)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        m = _EXPERTS.fullmatch(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    return out


@torch.no_grad()
def load_checkpoint_tensors(model: SmallGlm, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of checkpoint_tensors; every parameter and buffer must be given, no extra tensor."""
    state = {}
    for name, ref in model.state_dict().items():
        m = _EXPERTS.fullmatch(name)
        if m:
            parts = [tensors[f"{m.group(1)}.{e}.{m.group(2)}.weight"] for e in range(ref.shape[0])]
            state[name] = torch.stack(parts)
        else:
            state[name] = tensors[name]
    expected = set(checkpoint_tensors(model))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise KeyError(f"tensors the model does not have: {extra[:5]}")
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})


def load_folder(path: str | Path) -> SmallGlm:
    """A SmallGlm (fp32, CPU, eval mode) with the weights of a bf16 GLM-4.7 folder the trainer wrote."""
    cfg = load_model_config(path)
    if cfg.quant.is_fp8:
        raise ValueError(f"{path}: load_folder reads bf16 folders, this one is {cfg.quant.method}")
    source = SafetensorsSource(path)
    model = SmallGlm(cfg)
    cpu = torch.device("cpu")
    load_checkpoint_tensors(model, {n: source.read(n, None, None, cpu).float() for n in source.names()})
    return model.eval()
