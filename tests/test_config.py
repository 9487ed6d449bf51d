"""Reading glm4_moe config.json in its transformers-4 and -5 spellings, and clear errors."""
from __future__ import annotations

import json

import pytest

from model.config import ConfigError, config_from_dict, load_model_config

BASE = dict(
    model_type="glm4_moe", vocab_size=151552, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
    num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128, max_position_embeddings=202752,
    rms_norm_eps=1e-5, attention_bias=True, use_qk_norm=True, first_k_dense_replace=3, n_routed_experts=160,
    n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=2.5, num_nextn_predict_layers=1, tie_word_embeddings=False,
    eos_token_id=[151329, 151336, 151338], pad_token_id=151329,
)


def _write(tmp_path, cfg, gen=None):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return load_model_config(tmp_path)


def test_transformers4_spelling(tmp_path):
    c = _write(tmp_path, dict(BASE, rope_theta=1e6, partial_rotary_factor=0.5))
    assert (c.rope_theta, c.rotary_dim, c.n_routed_experts, c.num_nextn_predict_layers) == (1e6, 64, 160, 1)
    assert c.eos_token_ids == (151329, 151336, 151338) and not c.quant.is_fp8


def test_transformers5_spelling(tmp_path):
    cfg = dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5})
    del cfg["n_routed_experts"], cfg["num_nextn_predict_layers"]
    cfg.update(num_local_experts=160, num_mtp_layers=1, eos_token_id=151329)
    c = _write(tmp_path, cfg)
    assert (c.rope_theta, c.rotary_dim, c.n_routed_experts, c.num_nextn_predict_layers) == (1e6, 64, 160, 1)
    assert c.eos_token_ids == (151329,)


def test_generation_config_eos_wins(tmp_path):
    c = _write(tmp_path, dict(BASE, rope_theta=1e6, eos_token_id=1), gen={"eos_token_id": [1, 2, 3]})
    assert c.eos_token_ids == (1, 2, 3)


def test_quantization_configs():
    ct = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
        "ignore": ["lm_head"]}
    c = config_from_dict(dict(BASE, rope_theta=1e6, quantization_config=ct), _p())
    assert c.quant.method == "fp8_channel" and c.quant.ignore == ("lm_head",)
    blk = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert config_from_dict(dict(BASE, rope_theta=1e6, quantization_config=blk), _p()).quant.method == "fp8_block"


def _p():
    from pathlib import Path

    return Path("/ckpt/config.json")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"n_group": 3}, "n_group"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"quantization_config": {"quant_method": "fp8"}}, "weight_block_size"),
        ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}}}, "strategy"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_errors_name_file_and_field(change, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(dict(BASE, rope_theta=1e6, **change), _p())
    assert "/ckpt/config.json" in str(e.value) and needle in str(e.value)


def test_missing_field_and_files(tmp_path):
    cfg = dict(BASE)
    with pytest.raises(ConfigError, match="rope_theta"):
        config_from_dict(cfg, _p())
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        config_from_dict(dict(cfg, rope_theta=1e6), _p())
    with pytest.raises(ConfigError, match="config.json: file not found"):
        load_model_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(tmp_path / "nope")
