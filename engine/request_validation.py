"""Checks of a new request against the model (vocabulary, context length) before it reaches the scheduler."""
from __future__ import annotations

from engine.sampling_params import SamplingParams


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> int:
    """Raise ValueError naming the problem; return max_tokens resolved against the context left."""
    if not prompt_token_ids:
        raise ValueError("prompt is empty: at least one prompt token is required")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:  # C loops; the list only on failure
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        raise ValueError(f"prompt_token_ids contains ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    params.verify_token_ids(vocab_size)
    n_prompt = len(prompt_token_ids)
    room = max_model_len - n_prompt
    if room < 1:
        raise ValueError(
            f"prompt is too long: {n_prompt} tokens leave no room in the model's context of "
            f"{max_model_len} tokens (context_length_exceeded)"
        )
    if params.max_tokens is None:
        max_tokens = room
    elif params.max_tokens > room:
        raise ValueError(
            f"max_tokens={params.max_tokens} plus the prompt's {n_prompt} tokens exceeds the model's context "
            f"of {max_model_len} tokens"
        )
    else:
        max_tokens = params.max_tokens
    if params.min_tokens > max_tokens:
        raise ValueError(f"min_tokens={params.min_tokens} exceeds the {max_tokens} tokens that fit")
    return max_tokens
