"""Every message that crosses a ring inside the backend, one frozen dataclass each.

Channels (one writer each):
    supervisor -> scheduler   AddRequest, AbortRequest, Shutdown
    scheduler  -> supervisor  SchedulerReady, TokenOutputs, PromptLogprobs, RequestRejected,
                              SchedulerStats, ActorFailed
    scheduler  -> workers     StepPlan (broadcast), Shutdown
    worker 0   -> scheduler   WorkerReady, StepResult, ActorFailed

Prompts and sampling parameters cross once (AddRequest, then StepPlan.new_slots); a step carries
only slots, counts, input ids and newly appended blocks.
"""
from dataclasses import dataclass

import numpy as np

from mi.shm.codec import message

# TokenOutputs.finish_reasons codes.
NOT_FINISHED, FINISHED_STOP, FINISHED_LENGTH, FINISHED_ABORT = 0, 1, 2, 3
FINISH_REASON_NAMES = {FINISHED_STOP: "stop", FINISHED_LENGTH: "length", FINISHED_ABORT: "abort"}


@message(tag=1)
@dataclass(frozen=True)
class AddRequest:
    """A request's prompt and sampling parameters (see docs/backend-api.md for each)."""

    req_id: int
    prompt_ids: np.ndarray  # int32
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: list  # [[token_id, bias], ...]
    seed: int
    stop_token_ids: np.ndarray  # int32
    ignore_eos: bool
    logprobs: int  # -1: none
    prompt_logprobs: int  # -1: none


@message(tag=2)
@dataclass(frozen=True)
class AbortRequest:
    req_id: int


@message(tag=3)
@dataclass(frozen=True)
class Shutdown:
    reason: str


@message(tag=4)
@dataclass(frozen=True)
class WorkerReady:
    num_kv_blocks: int


@message(tag=5)
@dataclass(frozen=True)
class SchedulerReady:
    num_kv_blocks: int


@message(tag=6)
@dataclass(frozen=True)
class TokenOutputs:
    """One entry per sampled token or finished request of a step."""

    req_ids: np.ndarray  # int64
    token_ids: np.ndarray  # int32; -1 where a request finished without a new token (abort)
    finish_reasons: np.ndarray  # uint8, NOT_FINISHED / FINISHED_*
    num_cached_tokens: np.ndarray  # int32: prompt tokens the request got from the prefix cache
    logprobs: np.ndarray  # float32 [E]; empty when no request of the step asked
    top_ids: np.ndarray  # int32 [E, k] (k = the largest number asked in the step)
    top_logprobs: np.ndarray  # float32 [E, k]


@message(tag=11)
@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens start_pos + 1 ... computed in one step for one request."""

    req_id: int
    start_pos: int  # position of the first new token of the step; its target is the next token
    logprobs: np.ndarray  # float32 [n]; NaN where the target is not a prompt token
    top_ids: np.ndarray  # int32 [n, k]
    top_logprobs: np.ndarray  # float32 [n, k]


@message(tag=12)
@dataclass(frozen=True)
class SchedulerStats:
    stats: dict  # SchedulerCore.stats()


@message(tag=7)
@dataclass(frozen=True)
class RequestRejected:
    req_id: int
    reason: str


@message(tag=8)
@dataclass(frozen=True)
class ActorFailed:
    actor: str
    reason: str


@message(tag=9)
@dataclass(frozen=True)
class StepPlan:
    step_id: int
    new_slots: list  # one dict per (re)admitted request: slot, num_prompt_tokens, sampling params
    freed_slots: np.ndarray  # int32
    slots: np.ndarray  # int32 [B]
    num_new_tokens: np.ndarray  # int32 [B]
    num_computed_tokens: np.ndarray  # int32 [B]
    input_ids: np.ndarray  # int32 [sum(num_new_tokens)]
    do_sample: np.ndarray  # uint8 [B]
    block_appends: np.ndarray  # int32 [M, 2]: (slot, block id), in order
    prompt_logprobs_rows: np.ndarray  # uint8 [B]: the row's new tokens need prompt logprobs
    prompt_targets: np.ndarray  # int32: next-token id for each new token of those rows (-1: none)


@message(tag=10)
@dataclass(frozen=True)
class StepResult:
    step_id: int
    token_ids: np.ndarray  # int32 [S], one per sampled request of the plan, in plan order
    logprobs: np.ndarray  # float32 [S], or [0] when no request of the step asked
    top_ids: np.ndarray  # int32 [S, k]
    top_logprobs: np.ndarray  # float32 [S, k]
    prompt_logprobs: np.ndarray  # float32 [T], aligned with StepPlan.prompt_targets
    prompt_top_ids: np.ndarray  # int32 [T, k2]
    prompt_top_logprobs: np.ndarray  # float32 [T, k2]
