"""Logit processing that runs before temperature: logit_bias, then repetition, frequency and
presence penalties (vLLM's order).

Invariants: the input logits are never modified; a penalty whose tensor is None costs nothing;
a row whose parameters are neutral (penalty 1, frequency 0, presence 0, no bias entry) gets its
logits back bit for bit; a token the row has not seen keeps its logit (plus its bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mi.ops.sampling import SamplingTensors


def apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [B, V] any float dtype -> processed logits [B, V] float32.

    May return `logits` itself when it is float32 and there is nothing to apply: never write to
    the result in place.
    """
    out = logits.float()
    if not st.has_penalties:
        return out
    if out is logits:
        out = out.clone()
    _check_vocab_shapes(out, st)

    if st.logit_bias is not None:
        row_ids, token_ids, bias = st.logit_bias
        # accumulate=True sums duplicate (row, token) entries instead of keeping an arbitrary one.
        out.index_put_((row_ids, token_ids), bias.float(), accumulate=True)

    if st.repetition_penalty is None and st.frequency_penalty is None and st.presence_penalty is None:
        return out
    # The penalties change only tokens a row has seen (prompt or output), a few hundred of the
    # vocabulary: they run on those entries, gathered, not on [B, V]. NOTE: nonzero() is a
    # device-to-host sync on a GPU.
    generated = None if st.output_counts is None else st.output_counts.bool()  # counts are >= 0
    touched = _or(st.prompt_mask, generated) if st.repetition_penalty is not None else generated
    rows, token_ids = touched.nonzero(as_tuple=True)
    values = out[rows, token_ids]
    if st.repetition_penalty is not None:
        penalty = st.repetition_penalty[rows]
        # Positive logits divided, negative multiplied. NOTE: the clamp form is bit-identical to
        # where(out > 0, out / penalty, out * penalty) but branch-free.
        values = values.clamp_min(0).div_(penalty).add_(values.clamp_max(0).mul_(penalty))
    if st.frequency_penalty is not None or st.presence_penalty is not None:
        counts = st.output_counts[rows, token_ids]
        if st.frequency_penalty is not None:
            values -= counts.float().mul_(st.frequency_penalty[rows])
        if st.presence_penalty is not None:
            values -= (counts > 0) * st.presence_penalty[rows]
    out[rows, token_ids] = values
    return out


def _or(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """Elementwise or of two [B, V] bool masks, either (not both) of which may be None."""
    if a is None or b is None:
        return b if a is None else a
    return a | b


def _check_vocab_shapes(logits: torch.Tensor, st: SamplingTensors) -> None:
    for name in ("output_counts", "prompt_mask"):
        value = getattr(st, name)
        if value is not None and value.shape != logits.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, logits {tuple(logits.shape)}")
