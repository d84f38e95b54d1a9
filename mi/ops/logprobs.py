"""Logprobs of the raw model distribution: log_softmax of the logits before logit_bias,
penalties, temperature and filtering (docs/backend-api.md).

Nothing here materialises a [N, V] log_softmax: a logprob is `logit - logsumexp(row)`, and the
top-k alternatives are the top-k logits (the same order). The float32 logsumexp runs over bounded
chunks of rows, so scoring a long prompt needs O(N) extra memory, not another [N, V] copy.
"""

import torch

_CHUNK_ELEMENTS = 1 << 24  # rows per logsumexp chunk = this // V (64 MiB of float32 temporaries)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] any float dtype, token_ids [N] int64 in [0, V), k >= 0 ->
    (logprob [N] float32, top_ids [N, k] int64 best first, top_logprobs [N, k] float32)."""
    if not 0 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must be in [0, {logits.shape[-1]}]")
    lse = _logsumexp_rows(logits)
    chosen = logits.gather(1, token_ids[:, None]).squeeze(1).float() - lse
    top_values, top_ids = logits.topk(k, dim=-1)  # sorted, best first
    return chosen, top_ids, top_values.float() - lse[:, None]


def prompt_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (row i predicts token i + 1), targets [N] int64 with -1 = none ->
    (target_logprob [N] float32, nan where the target is -1; top_ids [N, k] int64 best first;
    top_logprobs [N, k] float32)."""
    has_target = targets >= 0
    chosen, top_ids, top_logprobs = token_logprobs(logits, targets.clamp(min=0), k)
    return chosen.masked_fill(~has_target, float("nan")), top_ids, top_logprobs


def _logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] float32 logsumexp, computed in float32 over chunks of rows."""
    num_rows, vocab_size = logits.shape
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(vocab_size, 1))
    if num_rows <= rows_per_chunk:
        return torch.logsumexp(logits.float(), dim=-1)
    return torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(rows_per_chunk)])
