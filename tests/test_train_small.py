"""bench.train_small on CPU at the tiny preset (seconds): its folders load in glint and in HF transformers
with the same log-probs, its training module computes what both compute, and its MTP layer lands where
glint's loader puts the NextN layer. The initial weights are large (--init-std) so that the distributions
compared are far from uniform and a wrong tensor layout shows."""

from __future__ import annotations

import json

import pytest
import torch

from bench import train_small
from bench.small_model import load_folder
from engine import LLM, SamplingParams
from hf_reference import hf_logprobs, hf_model
from model.builder import build_model
from model.config import load_model_config
from model.context import ForwardContext

CODE = "def parse(self, text):\n    for i, line in enumerate(text.splitlines()):\n        yield i, line\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained-small")
    rc = train_small.main(["--out", str(out), "--preset", "tiny", "--device", "cpu", "--steps", "4",
                           "--max-files", "10", "--workers", "1", "--seq-len", "64", "--batch-size", "4",
                           "--episode-rows", "8", "--lr", "3e-3", "--warmup", "1", "--init-std", "0.3",
                           "--eval-every", "2"])
    assert rc == 0
    return out


def _ids(path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).encode(CODE, add_special_tokens=False)


def test_report_and_training_moves_the_loss(trained):
    report = json.loads((trained / "train_small.json").read_text())
    assert report["steps"] == 4 and set(report["sizes_bytes"]) == {"bf16", "fp8-channel"}
    first, last = report["history"][0], report["history"][-1]
    assert last["step"] == 4 and last["main"] < first["main"] and last["mtp"] < first["mtp"]
    assert report["kept_step"] in (2, 4)  # the weights of the best validated step
    for split in ("code", "edit_episodes"):
        m = report["heldout"][split]
        assert 0 < m["main_loss"] < 20 and 0 < m["mtp_loss"] < 20 and 0 <= m["mtp_acc"] <= 1


def test_training_module_matches_hf(trained):
    path = trained / "bf16"
    ids = _ids(path)
    ref = hf_logprobs(hf_model(path), ids)
    assert ref.std(dim=-1).mean() > 1.0, "near-uniform distributions would not test the layout"
    model = load_folder(path)
    with torch.no_grad():
        ours = torch.log_softmax(model.lm_head(model.hidden(torch.tensor([ids])))[0].float(), dim=-1)
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("fmt", ["bf16", "fp8-channel"])
def test_glint_prompt_logprobs_match_hf(trained, fmt):
    path = trained / fmt
    ids = _ids(path)
    ref = hf_logprobs(hf_model(path), ids)
    llm = LLM(str(path), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=1, prompt_logprobs=20)
    out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        for tok, lp in out.prompt_logprobs[pos].items():
            assert abs(lp.logprob - ref[pos - 1, tok].item()) <= 1e-3, (fmt, pos, tok)


def _context(t: int, layers: int, kv_heads: int, head_dim: int) -> ForwardContext:
    shape = (1, t, kv_heads, head_dim)
    return ForwardContext(
        positions=torch.arange(t), slot_mapping=torch.arange(t),
        block_tables=torch.zeros(1, 1, dtype=torch.int32), seq_lens=torch.tensor([t], dtype=torch.int32),
        query_start_loc=torch.tensor([0, t], dtype=torch.int32), max_query_len=t, max_seq_len=t,
        kv_caches={i: (torch.zeros(shape), torch.zeros(shape)) for i in range(layers)},
    )


def test_mtp_layer_lands_where_glint_expects_it(trained):
    """glint's model (with_mtp) on the trained bf16 folder: its final hidden states and its NextN layer's
    output equal the training module's, and the MTP head's top-1 equals the training module's too."""
    path = trained / "bf16"
    cfg = load_model_config(path)
    n = cfg.num_hidden_layers
    glint = build_model(cfg, torch.device("cpu"), torch.float32, with_mtp=True, progress=False)
    ours = load_folder(path)
    ids = torch.tensor(_ids(path))
    t = len(ids)
    with torch.no_grad():
        h_ref = ours.hidden(ids[None])[0]
        h = glint(ids, _context(t, n + 1, cfg.num_key_value_heads, cfg.head_dim))
        assert (h - h_ref).abs().max().item() < 1e-4
        # slot p: token p+1 and h_p, at position p (the training layout of the MTP loss)
        mtp_ctx = _context(t - 1, n + 1, cfg.num_key_value_heads, cfg.head_dim)
        g = glint.mtp_forward(ids[1:], h[:-1], mtp_ctx)
        g_ref = ours.mtp_hidden(ids[None, 1:], h_ref[None, :-1])[0]
        assert g_ref.std() > 0.1
        assert (g - g_ref).abs().max().item() < 1e-4
        assert torch.equal(glint.compute_logits(g).argmax(-1), ours.lm_head(g_ref).argmax(-1))
        # swapping [embedding ; hidden] in eh_proj must show: the layout test can fail
        m = ours.mtp_layer
        e = ours.model.embed_tokens(ids[None, 1:])
        swapped = m.eh_proj(torch.cat([m.hnorm(h_ref[None, :-1]), m.enorm(e)], dim=-1))
        straight = m.eh_proj(torch.cat([m.enorm(e), m.hnorm(h_ref[None, :-1])], dim=-1))
        assert (swapped - straight).abs().max().item() > 1e-2


def test_fp8_folder_is_reproducible_from_bf16(trained, tmp_path):
    assert train_small.main(["--from-bf16", str(trained / "bf16"), "--out", str(tmp_path),
                             "--formats", "fp8-channel"]) == 0
    made, shipped = tmp_path / "fp8-channel", trained / "fp8-channel"
    names = sorted(p.name for p in shipped.iterdir())
    assert names == sorted(p.name for p in made.iterdir())
    for name in names:
        assert (made / name).read_bytes() == (shipped / name).read_bytes(), name
