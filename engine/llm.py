"""The offline API (vLLM-shaped): LLM(...).generate(prompts, sampling_params) and .chat(messages, ...).

It drives the same EngineCore step loop the server runs, in process."""
from __future__ import annotations

import atexit
import itertools
import operator
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from tqdm import tqdm
from transformers import AutoTokenizer

from engine.config import EngineConfig, engine_options
from engine.distributed import init_distributed, launched_by_torchrun, shutdown_distributed
from engine.engine_core import EngineCore
from engine.grammar import check_grammar
from engine.model_worker import END_OF_CALL, ModelWorker
from engine.outputs import RequestOutput, RequestOutputAccumulator
from engine.sampling_params import SamplingParams

PromptType = str | dict[str, Any]
PROMPT_KEYS = ("prompt", "prompt_token_ids")
CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles GLM-4.7's chat template renders (others vanish)


class LLM:
    def __init__(self, model: str, **options: Any) -> None:
        """`model`: a checkpoint folder. `options`: engine options by keyword (listed below, declared once in
        engine/config.py; EngineConfig.create takes the same); TypeError for an unknown one."""
        self.config = EngineConfig.create(model, **options)
        tensor_parallel_size = self.config.parallel.tensor_parallel_size
        self._counter = itertools.count()
        self._worker: ModelWorker | None = None  # set on ranks > 0 under torchrun
        self._torchrun = tensor_parallel_size > 1 and launched_by_torchrun()
        self.engine: EngineCore | None = None
        if self._torchrun:
            info = init_distributed(tensor_parallel_size, self.config.device, parallel=self.config.parallel)
            atexit.register(shutdown_distributed, info)
            if not info.is_driver:
                self._worker = ModelWorker(self.config, info)
                # atexit runs last-registered first: the CUDA graphs (holding NCCL all-reduces) go before the group
                atexit.register(self._worker.release_graphs)
                self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer or self.config.model.path)
                return
            self.engine = EngineCore(self.config, info)
            atexit.register(self.engine.worker.release_graphs)
        else:
            self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.tokenizer
        # Stops spawned TP ranks when this LLM is collected or at exit, without keeping it alive.
        self._finalizer = weakref.finalize(self, EngineCore.shutdown, self.engine)

    def shutdown(self) -> None:
        """Stop the TP ranks this LLM started (spawned ranks) or release torchrun's ranks."""
        if self.engine is not None:
            self._finalizer()

    @property
    def is_driver(self) -> bool:
        """True on the process that schedules and returns outputs (rank 0)."""
        return self._worker is None

    def get_tokenizer(self):
        return self.tokenizer

    def stats(self) -> dict[str, int]:
        return self.engine.stats() if self.engine is not None else {}

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        if not isinstance(prompt, dict) or not any(k in prompt for k in PROMPT_KEYS):
            raise ValueError(f"each prompt must be a string or a dict with 'prompt_token_ids' (or 'prompt'), "
                             f"got {type(prompt).__name__}")
        unknown = [k for k in prompt if k not in PROMPT_KEYS]
        if unknown:  # e.g. a misspelt "prompt_token_id" next to "prompt" would be ignored silently
            raise ValueError(f"prompt dict has unknown key(s) {unknown}; known: {list(PROMPT_KEYS)}")
        text = prompt.get("prompt")
        if not isinstance(text, str) and (text is not None or "prompt_token_ids" not in prompt):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        if "prompt_token_ids" not in prompt:
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        ids = prompt["prompt_token_ids"]
        try:  # operator.index: ints (numpy's too), not 1.5 / "5" (int() would turn them into other tokens)
            if isinstance(ids, (str, bytes)) or any(isinstance(t, bool) for t in ids):
                raise TypeError
            return text, list(map(operator.index, ids))
        except TypeError:
            raise TypeError(f"prompt_token_ids must be a list of int, got {ids!r:.200}") from None

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in input order on rank 0; under torchrun, ranks > 0 execute rank 0's steps and return []."""
        if self._worker is not None:
            self._worker.serve_forever(until=END_OF_CALL)
            return []
        try:
            return self._generate(prompts, sampling_params, use_tqdm)
        finally:
            if self._torchrun:
                self.engine.worker.send_control(END_OF_CALL)

    def _generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Iterable):
            raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        for sp in {id(sp): sp for sp in params}.values():
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams (or a list of them), got {type(sp).__name__}")
        # else a bad grammar fails its request at the first token (the server checks too); once per grammar
        for grammar in {sp.structured_output.grammar for sp in params if sp.structured_output is not None}:
            check_grammar(grammar)
        accs: dict[str, RequestOutputAccumulator] = {}
        order: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                text, ids = self._tokenize(prompt)
                rid = str(next(self._counter))
                self.engine.add_request(rid, ids, sp, prompt=text)
                accs[rid] = RequestOutputAccumulator(rid, text, ids, sp.n)
                order.append(rid)
            bar = tqdm(total=len(order), desc="Generating", unit="req", disable=not use_tqdm or len(order) < 2)
            done = 0
            while any(not a.finished for a in accs.values()):
                for delta in self.engine.step():
                    acc = accs.get(delta.request_id)
                    if acc is not None:
                        acc.add(delta)
                now_done = sum(a.finished for a in accs.values())
                bar.update(now_done - done)
                done = now_done
            bar.close()
        except BaseException:
            for rid in order:  # never leave pages held by an interrupted call
                self.engine.abort_request(rid)
            self.engine.step()
            raise
        return [accs[rid].get_output() for rid in order]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if self._worker is not None:
            return self.generate([], use_tqdm=False)
        try:
            prompts = self._chat_prompts(messages, tools, chat_template_kwargs)
        except BaseException:
            if self._torchrun:  # ranks > 0 wait in generate() for this call's end
                self.engine.worker.send_control(END_OF_CALL)
            raise
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _chat_prompts(
        self, messages: Any, tools: list[dict[str, Any]] | None, chat_template_kwargs: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        nested = isinstance(messages, list) and messages and isinstance(messages[0], list)
        prompts = []
        for conv in messages if nested else [messages]:
            _check_messages(conv)
            ids = self.tokenizer.apply_chat_template(
                conv, tools=tools, add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return prompts


def _check_messages(conv: Any) -> None:
    """A conversation the chat template renders as given: else a bad message would vanish from the prompt (an
    unknown role, no role) or render as nonsense."""
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"messages must be a non-empty list of message dicts (or a list of such lists), "
                         f"got {conv!r:.200}")
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {CHAT_ROLES}, got {m.get('role')!r}")
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and m["role"] == "assistant")):
            raise TypeError(f"messages[{i}]['content'] must be a str or a list of content parts, "
                            f"got {content!r:.200}")


def _options_doc() -> str:
    lines = [f"    {opt.name} = {opt.default!r}: {opt.help}" for opt in engine_options()]
    return "\n\nEngine options:\n" + "\n".join(lines)


LLM.__init__.__doc__ = (LLM.__init__.__doc__ or "") + _options_doc()  # help(LLM) lists every keyword, from the one declaration
