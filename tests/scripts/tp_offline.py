"""Run under torchrun: every rank builds the same LLM and calls generate(); rank 0 writes the outputs."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":
    model, out_file, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model, device="cpu", tensor_parallel_size=tp)
    prompts = [{"prompt_token_ids": list(range(10, 60))}, {"prompt_token_ids": [5, 7, 9]}]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    second = llm.generate(prompts[:1], sp, use_tqdm=False)  # a second call works too
    if llm.is_driver:
        Path(out_file).write_text(json.dumps({
            "tokens": [o.outputs[0].token_ids for o in outs + second],
            "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs],
        }))
    else:
        assert outs == [] and second == []
