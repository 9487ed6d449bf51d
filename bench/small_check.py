"""Check a model written by bench.train_small through glint's engine: held-out code loss from prompt
log-probs, and greedy answers to agentic-edit turns compared with the expected edited files.

    python -m bench.small_check DIR [--device cuda] [--turns 6] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.code_corpus import stdlib_files
from bench.datasets import make_edit_sessions
from engine import LLM, SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.small_check", description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--turns", type=int, default=6, help="agentic-edit turns (one-turn sessions) to answer")
    ap.add_argument("--chunk-len", type=int, default=300, help="file tokens per edit turn")
    ap.add_argument("--code-windows", type=int, default=8, help="held-out code windows of 1024 tokens")
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    llm = LLM(args.model, device=args.device, enforce_eager=args.enforce_eager, max_model_len=4096)
    tok = llm.tokenizer
    ids = tok.encode("".join(f.text for f in stdlib_files("heldout")), add_special_tokens=False)
    stride = max(1024, len(ids) // max(1, args.code_windows))
    windows = [ids[i:i + 1024] for i in range(0, len(ids) - 1024, stride)][: args.code_windows]
    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    nll = [-o.prompt_logprobs[p][w[p]].logprob for o, w in zip(outs, windows) for p in range(1, len(w))]
    sessions = make_edit_sessions(args.turns, 1, args.chunk_len, 4096, 0, 1.0, seed=0, tokenizer=tok)
    params = [SamplingParams(temperature=0, max_tokens=s.output_lens[0]) for s in sessions]
    answers = llm.chat([s.next_request().messages for s in sessions], params, use_tqdm=False)
    exact, prefix_frac = 0, []
    for s, a in zip(sessions, answers):
        text = a.outputs[0].text.split("</think>")[-1].strip()
        want = s.expected[0]
        exact += text == want
        got_ids = tok.encode(text, add_special_tokens=False)
        want_ids = tok.encode(want, add_special_tokens=False)
        same = next((i for i, (x, y) in enumerate(zip(got_ids, want_ids)) if x != y),
                    min(len(got_ids), len(want_ids)))
        prefix_frac.append(same / max(1, len(want_ids)))
    report = {"heldout_code_loss": sum(nll) / len(nll), "heldout_code_tokens": len(nll),
              "edit_turns": len(sessions), "edit_exact": exact,
              "edit_prefix_match_mean": sum(prefix_frac) / len(prefix_frac), "seconds": time.time() - t0,
              "sample_answer": answers[0].outputs[0].text[:400],
              "sample_expected": sessions[0].expected[0][:400]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
