"""Plain data exchanged by the scheduler core, its actor shell and the workers.

A request's ``SamplingParams`` (mi/api/sampling.py, bounds checked where it was decoded) cross to
the workers once, in ``NewSlot``; a ``StepPlan`` is one iteration as diffs of the workers'
mirrors; ``RequestOutput`` is one event of a request after a step. No behaviour here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mi.api.sampling import SamplingParams


@dataclass(frozen=True, eq=False)
class NewSlot:
    """A request (re)admitted into a worker slot: the worker resets the slot's block table and
    sampling state. Positions >= ``num_prompt_tokens`` hold generated tokens (penalties,
    min_tokens). ``cached_token_ids`` are the tokens [0, n) served from the prefix cache at this
    admission (n = the row's ``num_computed_tokens``); they never appear in ``input_ids``, so a
    worker that counts seen tokens (penalties) takes them from here."""

    slot: int
    req_id: int
    num_prompt_tokens: int
    params: SamplingParams
    cached_token_ids: np.ndarray  # int32[n]


@dataclass
class StepPlan:
    """One iteration, as diffs. Per-request arrays have length B, in plan order."""

    new_reqs: list[NewSlot]
    freed_slots: np.ndarray  # int32[K] slots released since the previous plan
    slots: np.ndarray  # int32[B]
    num_new_tokens: np.ndarray  # int32[B] tokens computed this step
    num_computed_tokens: np.ndarray  # int32[B] tokens already cached = position of first new one
    input_ids: np.ndarray  # int32[sum(num_new_tokens)]
    do_sample: np.ndarray  # bool[B] reaches the last token: sample one (not max_tokens 0)
    block_appends: np.ndarray  # int32[M, 2] (slot, block_id) in append order
    prompt_logprobs_rows: np.ndarray  # bool[B] row has prompt tokens of a prompt_logprobs request
    prompt_targets: np.ndarray  # int32[sum(num_new_tokens[prompt_logprobs_rows])], plan
    #                                  order: token at p + 1 for a new token at p, -1 when
    #                                  p + 1 >= num_prompt_tokens (no prompt target)
    req_ids: list[int]  # kept for ``update``; the workers do not need it


@dataclass(frozen=True)
class RequestOutput:
    """One event of a request after a step. ``token_id`` is -1 (with ``finish_reason`` "length")
    when a max_tokens=0 request has finished scoring its prompt: no token was sampled."""

    req_id: int
    token_id: int
    finish_reason: str | None  # None, "stop" or "length"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
