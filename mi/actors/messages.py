"""Every message that crosses a ring inside the backend, one frozen dataclass each.

Channels (one writer each):
    supervisor -> scheduler   AddRequest, AbortRequest, Shutdown
    scheduler  -> supervisor  SchedulerReady, TokenOutputs, RequestRejected, ActorFailed
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
    req_id: int
    prompt_ids: np.ndarray  # int32
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: np.ndarray  # int32
    ignore_eos: bool
    min_tokens: int


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
    new_slots: list  # [[slot, temperature, top_p, top_k, seed], ...] for (re)admitted requests
    freed_slots: np.ndarray  # int32
    slots: np.ndarray  # int32 [B]
    num_new_tokens: np.ndarray  # int32 [B]
    num_computed_tokens: np.ndarray  # int32 [B]
    input_ids: np.ndarray  # int32 [sum(num_new_tokens)]
    do_sample: np.ndarray  # uint8 [B]
    block_appends: np.ndarray  # int32 [M, 2]: (slot, block id), in order


@message(tag=10)
@dataclass(frozen=True)
class StepResult:
    step_id: int
    token_ids: np.ndarray  # int32, one per sampled request of the plan, in plan order
