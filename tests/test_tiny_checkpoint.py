"""model/tiny.py, the tiny GLM-4.7-format checkpoint writer: layout, determinism, tokenizer, template."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import model.tiny as tiny
from kernels.quant import dequant_fp8_per_block, dequant_fp8_per_channel
from model.config import load_model_config

FORMATS = tiny.FORMATS


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: tiny.write_tiny_checkpoint(root / fmt, fmt=fmt, seed=0) for fmt in FORMATS}


@pytest.fixture(scope="module")
def hf_tok(ckpts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpts["bf16"]))


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def route(scores: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """Group-limited top-k expert choice (HF Glm4MoeTopkRouter); returns sorted indices [T, k]."""
    t, e = scores.shape
    group_scores = scores.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros(t, n_group, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    masked = scores.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    return masked.topk(k, dim=-1).indices.sort(-1).values


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_gives_identical_bytes(ckpts, tmp_path, fmt):
    again = tiny.write_tiny_checkpoint(tmp_path / "again", fmt=fmt, seed=0)
    names = sorted(p.name for p in ckpts[fmt].iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (ckpts[fmt] / name).read_bytes() == (again / name).read_bytes(), name


def test_different_seed_gives_different_weights(ckpts, tmp_path):
    a = read_all(ckpts["bf16"])
    b = read_all(tiny.write_tiny_checkpoint(tmp_path / "s1", fmt="bf16", seed=1))
    assert a.keys() == b.keys()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.0.up_proj.weight",
                 "lm_head.weight"):  # fmt: skip
        assert not torch.equal(a[name], b[name]), name


def test_fp8_formats_hold_the_bf16_weights(ckpts):
    ref = read_all(ckpts["bf16"])
    for fmt, suffix, deq in (("fp8-channel", "_scale", dequant_fp8_per_channel),
                             ("fp8-block", "_scale_inv", dequant_fp8_per_block)):  # fmt: skip
        q = read_all(ckpts[fmt])
        name = "model.layers.2.mlp.experts.5.gate_proj.weight"
        w = deq(q[name], q[name + suffix], torch.float32)
        rel = (w - ref[name].float()).norm() / ref[name].float().norm()
        assert rel < 0.05, (fmt, rel)
        assert torch.equal(q["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_model_config(ckpts, fmt):
    c = load_model_config(ckpts[fmt])
    ids = tiny.special_token_ids()
    assert c.model_type == "glm4_moe"
    assert c.quant.method == {"bf16": "none", "fp8-channel": "fp8_channel", "fp8-block": "fp8_block"}[fmt]
    assert c.eos_token_ids == (ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"])
    assert c.pad_token_id == ids["<|endoftext|>"]
    assert c.num_nextn_predict_layers == 1
    assert (c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (64, 3, 1)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim) == (4, 2, 32, 16)
    assert c.head_dim != c.hidden_size // c.num_attention_heads
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-5
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (8, 2, 2, 1)
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob and c.use_qk_norm and c.attention_bias
    assert c.vocab_size % 64 == 0 and c.vocab_size >= 1500
    assert not c.tie_word_embeddings
    if fmt != "bf16":
        assert "lm_head" in c.quant.ignore and "model.layers.3.eh_proj" in c.quant.ignore
        assert "model.layers.1.mlp.gate" in c.quant.ignore


def test_quantization_config_shapes(ckpts):
    ct = json.loads((ckpts["fp8-channel"] / "config.json").read_text())["quantization_config"]
    assert ct["quant_method"] == "compressed-tensors"
    g = ct["config_groups"]["group_0"]
    assert g["weights"] == {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False}  # fmt: skip
    assert g["input_activations"]["strategy"] == "token" and g["input_activations"]["dynamic"] is True
    blk = json.loads((ckpts["fp8-block"] / "config.json").read_text())["quantization_config"]
    assert blk["quant_method"] == "fp8" and blk["weight_block_size"] == [128, 128]
    assert blk["activation_scheme"] == "dynamic" and blk["fmt"] == "e4m3"
    assert "lm_head" in blk["modules_to_not_convert"]
    assert "quantization_config" not in json.loads((ckpts["bf16"] / "config.json").read_text())


@pytest.mark.parametrize("fmt", FORMATS)
def test_transformers_auto_config(ckpts, fmt):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(ckpts[fmt]))
    assert c.model_type == "glm4_moe" and c.architectures == ["Glm4MoeForCausalLM"]
    assert c.head_dim == 32 and c.num_nextn_predict_layers == 1
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rope_parameters["partial_rotary_factor"] == 0.5
    assert list(c.eos_token_id) == list(load_model_config(ckpts[fmt]).eos_token_ids)


def test_generation_config(ckpts):
    gen = json.loads((ckpts["bf16"] / "generation_config.json").read_text())
    ids = tiny.special_token_ids()
    assert gen["eos_token_id"] == [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    assert gen["pad_token_id"] == ids["<|endoftext|>"]


def test_config_overrides_and_cli(tmp_path):
    out = tmp_path / "kv1"
    assert tiny.main(["--out", str(out), "--format", "fp8-channel", "--num-kv-heads", "1", "--seed", "3",
                      "--set", "num_hidden_layers=2"]) == 0  # fmt: skip
    c = load_model_config(out)
    assert c.num_key_value_heads == 1 and c.num_hidden_layers == 2
    t = read_all(out)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert "model.layers.2.eh_proj.weight" in t and "model.layers.3.eh_proj.weight" not in t
    with pytest.raises(ValueError):
        tiny.write_tiny_checkpoint(tmp_path / "bad", vocab_size=100)
    with pytest.raises(ValueError):
        tiny.write_tiny_checkpoint(tmp_path / "bad", num_hiden_layers=2)  # typo: rejected, not ignored
    with pytest.raises(ValueError):
        tiny.write_tiny_checkpoint(tmp_path / "bad", num_key_value_heads=3)  # does not divide 4 heads


# ------------------------------------------------------------------------------------------ tensors


def test_index_weight_map_matches_shards(ckpts):
    for fmt, folder in ckpts.items():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(folder.glob("*.safetensors"))
        assert len(shards) >= 2
        n = len(shards)
        assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        actual, total = {}, 0
        for s in shards:
            with safe_open(str(s), "pt") as fh:
                for k in fh.keys():
                    assert k not in actual, f"{k} in two shards"
                    actual[k] = s.name
                    t = fh.get_tensor(k)
                    total += t.numel() * t.element_size()
        assert index["weight_map"] == actual, fmt
        assert index["metadata"]["total_size"] == total
        # some layer straddles a shard boundary, in particular the MTP layer and the first MoE layer
        for layer in (1, 3):
            files = {f for k, f in actual.items() if k.startswith(f"model.layers.{layer}.")}
            assert len(files) == 2, (fmt, layer, files)


def expected_names(n_layers=3, n_dense=1, n_experts=8, mtp=1) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for l in range(n_layers + mtp):
        p = f"model.layers.{l}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for x in ("q", "k", "v"):
            names |= {f"{p}self_attn.{x}_proj.weight", f"{p}self_attn.{x}_proj.bias"}
        names |= {p + "self_attn.o_proj.weight", p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        mlps = []
        if l < n_dense:
            mlps.append(p + "mlp.")
        else:
            names |= {p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"}
            mlps += [f"{p}mlp.experts.{e}." for e in range(n_experts)] + [p + "mlp.shared_experts."]
        for m in mlps:
            names |= {m + "gate_proj.weight", m + "up_proj.weight", m + "down_proj.weight"}
        if l >= n_layers:
            names |= {p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight"}
            names |= {p + "shared_head.norm.weight"}
    return names


def is_quantized(name: str) -> bool:
    return name.endswith("_proj.weight") and ".eh_proj." not in name


def test_bf16_tensor_names_shapes_dtypes(ckpts):
    t = read_all(ckpts["bf16"])
    assert set(t) == expected_names()
    assert not any(".shared_head.head." in k or k.startswith("model.layers.3.embed_tokens") for k in t)
    for k, v in t.items():
        want = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
        assert v.dtype == want, k
    V = load_model_config(ckpts["bf16"]).vocab_size
    assert t["model.embed_tokens.weight"].shape == (V, 64) and t["lm_head.weight"].shape == (V, 64)
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (64, 64)
    assert t["model.layers.0.self_attn.o_proj.weight"].shape == (64, 128)
    assert t["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert t["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)
    assert t["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    assert t["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (32, 64)
    assert t["model.layers.1.mlp.gate.weight"].shape == (8, 64)
    assert t["model.layers.3.eh_proj.weight"].shape == (64, 128)
    # padding rows of the head never win: their logit is exactly 0
    real = len(json.loads((ckpts["bf16"] / "tokenizer.json").read_text())["model"]["vocab"]) + len(
        tiny.SPECIAL_TOKENS
    )
    assert (t["lm_head.weight"][real:] == 0).all() and (t["lm_head.weight"][:real].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("fmt,suffix", [("fp8-channel", "_scale"), ("fp8-block", "_scale_inv")])
def test_fp8_tensors(ckpts, fmt, suffix):
    t = read_all(ckpts[fmt])
    base = expected_names()
    scales = {k for k in t if k.endswith(suffix)}
    assert set(t) == base | scales
    assert scales == {k + suffix for k in base if is_quantized(k)}
    assert len(scales) == 4 * 4 + 3 + 3 * 3 * (8 + 1)  # attention x4 layers, dense MLP, 3 MoE layers
    for k in base:
        if is_quantized(k):
            assert t[k].dtype == torch.float8_e4m3fn, k
            s = t[k + suffix]
            assert s.dtype == torch.float32
            n, kk = t[k].shape
            assert s.shape == ((n, 1) if fmt == "fp8-channel" else (-(-n // 128), -(-kk // 128))), k
            assert (s > 0).all()
        elif k.endswith("e_score_correction_bias"):
            assert t[k].dtype == torch.float32
        else:
            assert t[k].dtype == torch.bfloat16, k


def test_fp8_block_scale_shapes_with_wider_dims(tmp_path):
    out = tiny.write_tiny_checkpoint(tmp_path / "wide", fmt="fp8-block", hidden_size=160,
                                     intermediate_size=300)  # fmt: skip
    t = read_all(out)
    assert t["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)
    assert t["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)
    assert t["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (1, 2)
    assert t["model.layers.0.self_attn.o_proj.weight_scale_inv"].shape == (2, 1)


def test_weight_scales_are_non_degenerate(ckpts):
    t = {k: v.float() for k, v in read_all(ckpts["bf16"]).items()}
    assert 0.9 < t["model.embed_tokens.weight"].std() < 1.1
    assert 0.05 < t["model.layers.0.self_attn.q_proj.bias"].std() < 0.2
    w = t["model.layers.0.mlp.down_proj.weight"]
    assert abs(w.std().item() * 128**0.5 - 1) < 0.1
    norm = t["model.layers.2.input_layernorm.weight"]
    assert 0.7 < norm.min() and norm.max() < 1.3 and norm.std() > 0.03
    # logits of a normalized hidden state have a std of a few units
    h = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    logits = h @ t["lm_head.weight"].T
    assert 2.0 < logits[:, :1500].std() < 8.0


def test_routing_bias_changes_expert_choice(ckpts):
    t = read_all(ckpts["bf16"])
    c = load_model_config(ckpts["bf16"])
    x = torch.randn(2048, c.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer in (1, 2, 3):
        gate = t[f"model.layers.{layer}.mlp.gate.weight"].float()
        bias = t[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.abs().min() > 0
        scores = torch.sigmoid(x @ gate.T)
        plain = route(scores, c.n_group, c.topk_group, c.num_experts_per_tok)
        biased = route(scores + bias, c.n_group, c.topk_group, c.num_experts_per_tok)
        changed = (plain != biased).any(-1).float().mean().item()
        assert changed > 0.25, (layer, changed)
        # ...but routing still depends on the token: every expert is chosen for some tokens
        assert torch.bincount(biased.flatten(), minlength=c.n_routed_experts).min() > 0, layer
        # and the top-1 choice is not a near-tie between experts for most tokens
        top2 = (scores + bias).topk(2, -1).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-3).float().mean() > 0.95


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_roundtrip_and_special_tokens(hf_tok):
    tok = hf_tok
    assert len(tok) == 1500
    for text in ("héllo 世界 🙂", "The scheduler runs one loop.\n\n  indented\ttab", "ΣΔ → ≈ ≤ \u0000 \x7f"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    ids = tiny.special_token_ids()
    assert list(ids) == list(tiny.SPECIAL_TOKENS)
    assert sorted(ids.values()) == list(range(1475, 1500))
    for name, i in ids.items():
        assert tok.encode(name, add_special_tokens=False) == [i], name
        assert tok.convert_tokens_to_ids(name) == i
        assert tok.encode(f"x{name}y", add_special_tokens=False).count(i) == 1
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ids["<|endoftext|>"]
    assert tok.pad_token_id == ids["<|endoftext|>"]
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)
    # skip_special_tokens drops the specials
    s = tok.decode(tok.encode("<|user|>hi<|assistant|>", add_special_tokens=False), skip_special_tokens=True)
    assert s == "hi"


def test_committed_tokenizer_matches_retraining():
    trained = json.loads(tiny.train_tokenizer().to_str())
    committed = json.loads(tiny.TOKENIZER_PATH.read_text())
    for key in ("model", "added_tokens", "pre_tokenizer", "decoder"):
        assert trained[key] == committed[key], key


def test_corpus_is_small_real_text():
    data = tiny.CORPUS_PATH.read_bytes()
    assert 100_000 < len(data) < 300_000
    assert "GLM-4.7" in data.decode("utf-8")


# ------------------------------------------------------------------------------------------ chat template


def test_chat_template_files_agree(ckpts):
    text = tiny.CHAT_TEMPLATE_PATH.read_text()
    folder = ckpts["bf16"]
    assert (folder / "chat_template.jinja").read_text() == text
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == text


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_template_basic_turns(hf_tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! ", "reasoning_content": "old thought"},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
    ]
    assert render(hf_tok, msgs, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|></think>Hello!"
        "<|user|>What is 2+2?<|assistant|><think>"
    )
    assert render(hf_tok, msgs, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|user|>What is 2+2?<|assistant|></think>"
    )
    # clear_thinking=false keeps past reasoning
    assert "<|assistant|><think>old thought</think>Hello!<|user|>" in render(
        hf_tok, msgs, add_generation_prompt=True, clear_thinking=False
    )
    assert render(hf_tok, msgs[:2]) == "[gMASK]<sop><|system|>Be brief.<|user|>Hi"


def test_template_reasoning_after_last_user(hf_tok):
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "\nthinking hard\n"},
    ]
    assert render(hf_tok, msgs) == "[gMASK]<sop><|user|>Q<|assistant|><think>thinking hard</think>A"
    # reasoning embedded in content is split off the same way
    msgs2 = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>t</think>A"}]
    assert render(hf_tok, msgs2) == "[gMASK]<sop><|user|>Q<|assistant|><think>t</think>A"
    # empty reasoning -> bare </think>
    msgs3 = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": ""}]
    assert render(hf_tok, msgs3) == "[gMASK]<sop><|user|>Q<|assistant|></think>A"


def tool_conversation(arguments):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "need tool",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": arguments}},
                {"type": "function", "function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": [{"type": "text", "text": "12:00"}]},
        {"role": "assistant", "content": "Sunny at noon."},
    ]


def test_template_tool_calls_and_responses(hf_tok):
    args = {"city": "Paris", "days": 3, "units": ["C", "F"]}
    expected = (
        "[gMASK]<sop><|user|>Weather in Paris?<|assistant|><think>need tool</think>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value>"
        '<arg_key>units</arg_key><arg_value>["C", "F"]</arg_value></tool_call>'
        "<tool_call>now</tool_call>"
        "<|observation|><tool_response>sunny</tool_response><tool_response>12:00</tool_response>"
        "<|assistant|><think>"
    )
    out = render(hf_tok, tool_conversation(args)[:4], add_generation_prompt=True)
    assert out == expected
    full = render(hf_tok, tool_conversation(args))
    assert full.endswith("<tool_response>12:00</tool_response><|assistant|></think>Sunny at noon.")


def test_template_tool_call_arguments_as_json_string(hf_tok):
    args = {"path": 'a "b" {c}, d', "n": 3, "x": 1.5, "ok": True, "none": None, "list": [1, "x,y"],
            "obj": {"k": "v}"}, "text": "🙂 é\n\\ \t/ 世界"}  # fmt: skip
    ref = render(hf_tok, tool_conversation(args))
    assert "<arg_value>🙂 é\n\\ \t/ 世界</arg_value>" in ref and '<arg_value>{"k": "v}"}</arg_value>' in ref
    assert render(hf_tok, tool_conversation(json.dumps(args))) == ref
    assert render(hf_tok, tool_conversation(json.dumps(args, ensure_ascii=False))) == ref
    assert "<tool_call>get_weather</tool_call>" in render(hf_tok, tool_conversation("{}"))


def test_template_tools_block(hf_tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    out = render(hf_tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], tools=tools,
                 add_generation_prompt=True)  # fmt: skip
    assert out == (
        "[gMASK]<sop><|system|>\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tools[0], ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, output the function name and arguments within the following "
        "XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}"
        "</arg_value>...</tool_call><|system|>S<|user|>hi<|assistant|><think>"
    )


def test_template_tokenizes_specials_as_single_ids(hf_tok):
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)  # fmt: skip
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    sp = tiny.special_token_ids()
    assert ids[:3] == [sp["[gMASK]"], sp["<sop>"], sp["<|user|>"]]
    assert ids[-2:] == [sp["<|assistant|>"], sp["<think>"]]


# ------------------------------------------------------------------------------------------ cache dir + HF


def test_tiny_model_dir_is_written_once_and_race_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("GLINT_CACHE_DIR", str(tmp_path / "cache"))
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: tiny.tiny_model_dir("fp8-channel", seed=0), range(2)))
    assert paths[0] == paths[1]
    folder = paths[0]
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("tiny-fp8-channel-seed0")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temp folders left behind
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert tiny.tiny_model_dir("fp8-channel", seed=0) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert load_model_config(folder).quant.method == "fp8_channel"


def test_transformers_loads_bf16_checkpoint(ckpts, hf_tok):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(ckpts["bf16"]), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])  # the MTP layer only
    ids = torch.tensor([hf_tok.encode("The scheduler takes new requests and", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert 2.0 < logits.std(-1).mean() < 8.0
    assert (logits.argmax(-1) < 1500).all()
