"""Verification of a draft chain against the tokens the target model sampled at every chain position.

The runner computes logits at the k draft positions and the bonus position; the sampler samples each of those
rows from the request's own target distribution p_j (temperature, top-k/p, min-p, penalties, logit bias and
min_tokens applied with the history up to that row). Then:

- greedy: the row's token is argmax p_j, so accepting the longest prefix on which draft == sampled, plus the
  sampled token after it, is exactly what plain greedy decoding emits;
- temperature > 0: our drafts are point masses (a suffix tree or a top-1 MTP chain picks one token), and the
  lossless rule for a point-mass draft x is "accept with probability p(x), else sample from p with x removed,
  renormalized". Drawing y ~ p and accepting iff y == x does exactly that: P(accept) = p(x), and on rejection
  y is distributed as p conditioned on y != x. Rows past the first rejection are discarded, so each emitted
  token was drawn with the exact history before it (never greedy verification of a sampled request).

Only the request's real drafts are compared: padding slots (CUDA-graph fillers) are never accepted.
"""
from __future__ import annotations

from collections.abc import Sequence


def accept_chain(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """drafts: the request's k real draft tokens; sampled: the k + 1 (or more, padded) tokens sampled at the
    chain rows. Returns the emitted tokens: the accepted drafts followed by one sampled token."""
    if len(sampled) < len(drafts) + 1:
        raise ValueError(f"need {len(drafts) + 1} sampled rows for {len(drafts)} drafts, got {len(sampled)}")
    n = 0
    while n < len(drafts) and drafts[n] == sampled[n]:
        n += 1
    return list(drafts[:n]) + [sampled[n]]
