"""Plain data exchanged by the scheduler core, its actor shell and the workers.

``SamplingParams`` arrive with a request and cross to the workers once, in ``NewSlot``; a
``StepPlan`` is one iteration as diffs of the workers' mirrors; ``RequestOutput`` is one event of a
request after a step. No behaviour here beyond validation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_LOGPROBS = 20      # most top alternatives per token, for logprobs and prompt_logprobs
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0      # bound of |presence_penalty| and |frequency_penalty|


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops; ``ValueError`` on any out-of-range field."""
    max_tokens: int                  # tokens to generate; 0 (needs prompt_logprobs) = score only
    temperature: float = 1.0         # 0 = greedy
    top_p: float = 1.0               # in (0, 1]; 1 = off
    top_k: int = 0                   # 0 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0              # EOS / stop ids end the request only after this many tokens
    min_p: float = 0.0               # in [0, 1]; drop tokens below min_p * top probability
    repetition_penalty: float = 1.0  # > 0; tokens of prompt and output; 1 = off
    presence_penalty: float = 0.0    # in [-2, 2]; once per distinct generated token
    frequency_penalty: float = 0.0   # in [-2, 2]; per occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias in [-100, 100]), ids unique
    logprobs: int | None = None         # top alternatives per generated token, in [0, 20]
    prompt_logprobs: int | None = None  # top alternatives per prompt token, in [0, 20]

    def __post_init__(self) -> None:
        checks = (
            (_is_int(self.max_tokens) and (self.max_tokens >= 1 or (
                self.max_tokens == 0 and self.prompt_logprobs is not None)),
             "max_tokens >= 1 (0 only with prompt_logprobs)"),
            (_in_range(self.temperature, 0, math.inf), "temperature >= 0"),
            (_in_range(self.top_p, 0, 1) and self.top_p > 0, "0 < top_p <= 1"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k >= 0"),
            (_is_int(self.min_tokens) and 0 <= self.min_tokens <= max(self.max_tokens, 0),
             "0 <= min_tokens <= max_tokens"),
            (_in_range(self.min_p, 0, 1), "0 <= min_p <= 1"),
            (_in_range(self.repetition_penalty, 0, math.inf) and self.repetition_penalty > 0,
             "repetition_penalty > 0"),
            (_in_range(self.presence_penalty, -MAX_PENALTY, MAX_PENALTY),
             "-2 <= presence_penalty <= 2"),
            (_in_range(self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY),
             "-2 <= frequency_penalty <= 2"),
            (_is_bias(self.logit_bias),
             "logit_bias as unique (token_id >= 0, bias in [-100, 100]) pairs"),
            (_is_num_logprobs(self.logprobs), "logprobs None or in [0, 20]"),
            (_is_num_logprobs(self.prompt_logprobs), "prompt_logprobs None or in [0, 20]"),
        )
        failed = [need for ok, need in checks if not ok]
        if failed:
            raise ValueError(f"invalid sampling params: need {'; '.join(failed)} ({self})")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _in_range(x: object, lo: float, hi: float) -> bool:
    """A finite real number in [lo, hi]; False for NaN, infinities, bools and non-numbers."""
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return False
    try:
        value = float(x)
    except OverflowError:
        return False
    return math.isfinite(value) and lo <= value <= hi


def _is_num_logprobs(x: object) -> bool:
    return x is None or (_is_int(x) and 0 <= x <= MAX_LOGPROBS)


def _is_bias(pairs: object) -> bool:
    if not isinstance(pairs, tuple):
        return False
    if not all(isinstance(p, tuple) and len(p) == 2 and _is_int(p[0]) and p[0] >= 0
               and _in_range(p[1], -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS) for p in pairs):
        return False
    return len({p[0] for p in pairs}) == len(pairs)


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
    cached_token_ids: np.ndarray     # int32[n]


@dataclass
class StepPlan:
    """One iteration, as diffs. Per-request arrays have length B, in plan order."""
    new_reqs: list[NewSlot]
    freed_slots: np.ndarray          # int32[K] slots released since the previous plan
    slots: np.ndarray                # int32[B]
    num_new_tokens: np.ndarray       # int32[B] tokens computed this step
    num_computed_tokens: np.ndarray  # int32[B] tokens already cached = position of first new one
    input_ids: np.ndarray            # int32[sum(num_new_tokens)]
    do_sample: np.ndarray            # bool[B] reaches the last token: sample one (not max_tokens 0)
    block_appends: np.ndarray        # int32[M, 2] (slot, block_id) in append order
    prompt_logprobs_rows: np.ndarray  # bool[B] row has prompt tokens of a prompt_logprobs request
    prompt_targets: np.ndarray       # int32[sum(num_new_tokens[prompt_logprobs_rows])], plan
    #                                  order: token at p + 1 for a new token at p, -1 when
    #                                  p + 1 >= num_prompt_tokens (no prompt target)
    req_ids: list[int]               # kept for ``update``; the workers do not need it


@dataclass(frozen=True)
class RequestOutput:
    """One event of a request after a step. ``token_id`` is -1 (with ``finish_reason`` "length")
    when a max_tokens=0 request has finished scoring its prompt: no token was sampled."""
    req_id: int
    token_id: int
    finish_reason: str | None        # None, "stop" or "length"
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache (first admission)
