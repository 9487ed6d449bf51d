"""One run of the real-width TP check in its own process (tests/gpu/test_tp_gpu.py):

    python tests/scripts/tp_real_widths.py MODEL_DIR OUT_JSON TP {eager,graphs} [plain|FLAG,FLAG,...]

Builds LLM(MODEL_DIR, dummy weights, tensor_parallel_size=TP) on CUDA (flag `served`: as the optimized presets
serve: FP8 KV cache, shared-expert fusion and the fused qkv + QK-norm/RoPE/KV-store kernel; `fused`: the
one-shot all-reduce fused with the norms; `chunk48`: 48-token steps, so that every all-reduce, prefill
included, is small enough for the one-shot kernel), greedy-decodes
two prompts with prompt log-probs, writes {"prompt_logprobs": [...], "tokens": [[...], [...]]} to OUT_JSON.
Progress is logged with timestamps so a run that stalls shows where."""
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, out_file, tp, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    flags = set(sys.argv[5].split(",")) if len(sys.argv) > 5 else {"plain"}
    served = "served" in flags
    t0 = time.time()
    llm = LLM(model, device="cuda", load_format="dummy", tensor_parallel_size=tp, max_model_len=2048,
              num_kv_blocks=512, enforce_eager=mode == "eager", max_num_seqs=16,
              enable_shared_experts_fusion=served, enable_fused_qk_norm_rope=served,
              kv_cache_dtype="fp8_e4m3" if served else "auto", allreduce_fusion="fused" in flags,
              **({"max_num_batched_tokens": 48} if "chunk48" in flags else {}))
    print(f"[{time.time() - t0:.1f}s] engine up (tp={tp}, {mode}, {sorted(flags)})", flush=True)
    ids = list(range(1000, 1300))
    out = llm.generate(
        [{"prompt_token_ids": ids}, {"prompt_token_ids": ids[:40]}],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0, detokenize=False),
        use_tqdm=False,
    )
    print(f"[{time.time() - t0:.1f}s] generated", flush=True)
    Path(out_file).write_text(json.dumps({
        "prompt_logprobs": [d[t].logprob for t, d in zip(ids[1:], out[0].prompt_logprobs[1:])],
        "tokens": [o.outputs[0].token_ids for o in out],
    }))
    llm.shutdown()
    print(f"[{time.time() - t0:.1f}s] shut down", flush=True)
