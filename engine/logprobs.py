"""Logprob summaries in vLLM's layout: per row the chosen token's log-probability and rank (rank = 1 + the number of
tokens with a strictly larger logprob), then the top k of the distribution. Sampled rows (`logprobs: k`, the sampler)
and prompt rows (`prompt_logprobs: k`) share the math and the dicts.

A step's prompt rows are scored inside the forward, a slice of rows at a time: each slice's [rows, vocab] fp32
logits exist only while it is scored, so a whole prefill chunk (thousands of rows) needs no more memory than the
one slice the memory profile scores, and prompt-logprobs requests prefill in full chunks. What leaves the forward
is small: per row the target's logprob and rank, and the top k ids, logprobs and ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from engine.outputs import Logprob, LogprobsDict


# Each slice reads the whole LM head (GLM-4.7: 151,552 x 5,120 bf16, 1.55 GB) for its rows' logits; from ~256 rows
# that GEMM is compute-bound on an H100 / H200, below it the head's reads dominate (a 4K prompt in 64-row slices
# would read it 64 times). So a slice has at least this many rows, max_num_seqs where that is larger.
MIN_PROMPT_SLICE_ROWS = 256


def prompt_slice_rows(max_num_seqs: int) -> int:
    """Prompt rows scored at once (the memory profile scores one such slice)."""
    return max(max_num_seqs, MIN_PROMPT_SLICE_ROWS)


@dataclass(frozen=True)
class PromptRows:
    """A step's rows predicting prompt tokens (host lists, broadcast to TP ranks with the step's inputs)."""

    rows: list[int]  # rows of the forward's hidden states
    targets: list[int]  # the prompt token each row predicts
    top_k: int  # the most top entries any of the step's requests asks for


@dataclass(frozen=True)
class LogprobScores:
    """The device-side summary of a run of rows (a step's PromptRows, or sampled rows), row for row."""

    target_logprob: torch.Tensor  # [R] fp32
    target_rank: torch.Tensor  # [R] int64
    top_ids: torch.Tensor  # [R, top_k] int64
    top_logprob: torch.Tensor  # [R, top_k] fp32
    top_rank: torch.Tensor  # [R, top_k] int64


def score_rows(
    hidden: torch.Tensor, prompt: PromptRows, compute_logits: Callable[[torch.Tensor], torch.Tensor], slice_rows: int
) -> LogprobScores:
    """Score prompt.rows of `hidden` [T, ...] slice_rows at a time; compute_logits maps hidden rows to [n, V] logits
    (the LM head; the identity when `hidden` already holds logits)."""
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be >= 1, got {slice_rows}")
    if len(prompt.rows) != len(prompt.targets):
        raise ValueError(f"{len(prompt.rows)} prompt rows but {len(prompt.targets)} targets")
    dev = hidden.device
    rows = torch.tensor(prompt.rows, dtype=torch.long, device=dev)
    targets = torch.tensor(prompt.targets, dtype=torch.long, device=dev)
    parts = [] if prompt.rows else [score_logprobs(hidden.new_zeros(0, 1, dtype=torch.float32), targets[:0], 0)]
    for start in range(0, len(prompt.rows), slice_rows):
        logits = compute_logits(hidden.index_select(0, rows[start : start + slice_rows]))
        parts.append(score_logprobs(torch.log_softmax(logits.float(), dim=-1), targets[start : start + slice_rows],
                                    prompt.top_k))
    return LogprobScores(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(LogprobScores)))


def score_logprobs(raw: torch.Tensor, targets: torch.Tensor, k: int) -> LogprobScores:
    """raw: log-probabilities [N, V]; targets [N] (the chosen tokens); the top k of every row."""
    targets = targets.long()
    chosen = raw.gather(1, targets[:, None])
    rank = (raw > chosen).sum(dim=-1) + 1
    top_v, top_i = raw.topk(k, dim=-1) if k > 0 else (raw[:, :0], targets[:, None][:, :0])
    # rank within the sorted top k equals rank in the vocabulary: every larger value is in the top k too
    top_rank = (top_v[:, None, :] > top_v[:, :, None]).sum(dim=-1) + 1
    return LogprobScores(chosen[:, 0], rank, top_i, top_v, top_rank)


def logprob_dicts(
    scores: LogprobScores, first: int, targets: Sequence[int], num_top: int | Sequence[int]
) -> list[LogprobsDict]:
    """Rows first..first+len(targets)-1 as vLLM's dicts: the chosen token first, then its top entries (num_top: one k
    for every row, or one per row; each <= the scores' k)."""
    end = first + len(targets)
    tops = [num_top] * len(targets) if isinstance(num_top, int) else list(num_top)
    kmax = max(tops, default=0)
    lp, rank = scores.target_logprob[first:end].tolist(), scores.target_rank[first:end].tolist()
    top_i = scores.top_ids[first:end, :kmax].tolist()
    top_v = scores.top_logprob[first:end, :kmax].tolist()
    top_r = scores.top_rank[first:end, :kmax].tolist()
    out: list[LogprobsDict] = []
    for n, (token, k) in enumerate(zip(targets, tops)):
        d: LogprobsDict = {token: Logprob(lp[n], rank[n])}
        for j in range(k):
            d.setdefault(top_i[n][j], Logprob(top_v[n][j], top_r[n][j]))
        out.append(d)
    return out


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: Sequence[int], num_logprobs: int, chunk_rows: int = 256
) -> list[LogprobsDict]:
    """Prompt logprobs straight from logits [N, V] at positions p..p+N-1 and the prompt tokens at p+1..p+N (the
    reference the engine's scoring is tested against; the caller puts None first for position 0)."""
    targets = list(next_token_ids)
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {len(targets)} next tokens")
    prompt = PromptRows(list(range(len(targets))), targets, num_logprobs)
    return logprob_dicts(score_rows(logits, prompt, lambda x: x, chunk_rows), 0, targets, num_logprobs)
