"""Engine: requests, KV pages and prefix cache, scheduler, model runner, sampler, offline LLM API."""
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.llm import LLM
from engine.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput
from engine.sampling_params import SamplingParams, StructuredOutput, ThinkingBudget

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineCore",
    "Logprob",
    "RequestDelta",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutput",
    "ThinkingBudget",
]
