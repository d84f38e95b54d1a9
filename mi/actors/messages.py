"""Every message that crosses a ring inside the backend: one closed union of tagged frozen Structs.

Channels (one writer each):
    supervisor -> scheduler   AddRequest, AbortRequest, Shutdown
    scheduler  -> supervisor  SchedulerReady, TokenOutputs, PromptLogprobs, RequestRejected,
                              RequestFailed, SchedulerStats, ActorFailed
    scheduler  -> workers     StepPlan (broadcast), Shutdown
    worker 0   -> scheduler   WorkerReady, StepResult, ActorFailed

Prompts and sampling parameters cross once (AddRequest, then StepPlan.new_slots); a step carries
only slots, counts, input ids and newly appended blocks.

Wire: msgpack through `CODEC` (mi/shm/codec.py). Structs are `array_like` (fields by position, no
names on the wire; every process runs this same file) and tagged with small ints, the one-byte
tags of the codec before msgspec: a positive fixint is one msgpack byte, and the number, not the
class name, is the wire identity. Array fields declare their dtype; the decoder rejects any
other. `logprobs` and `prompt_logprobs` are `int | None` on every hop (None: not asked).
"""

import msgspec
import numpy as np
import numpy.typing as npt

from mi.api.sampling import SamplingParams
from mi.shm.codec import Codec

__all__ = [
    "CODEC",
    "FINISHED_ABORT",
    "FINISHED_LENGTH",
    "FINISHED_STOP",
    "FINISH_REASON_NAMES",
    "NOT_FINISHED",
    "AbortRequest",
    "ActorFailed",
    "AddRequest",
    "Message",
    "NewSlot",
    "PromptLogprobs",
    "RequestFailed",
    "RequestRejected",
    "SchedulerCounters",
    "SchedulerReady",
    "SchedulerStats",
    "Shutdown",
    "StepPlan",
    "StepResult",
    "TokenOutputs",
    "WorkerReady",
]

# TokenOutputs.finish_reasons codes.
NOT_FINISHED, FINISHED_STOP, FINISHED_LENGTH, FINISHED_ABORT = 0, 1, 2, 3
FINISH_REASON_NAMES = {FINISHED_STOP: "stop", FINISHED_LENGTH: "length", FINISHED_ABORT: "abort"}

Int32s = npt.NDArray[np.int32]
Int64s = npt.NDArray[np.int64]
Float32s = npt.NDArray[np.float32]
UInt8s = npt.NDArray[np.uint8]


class _Part(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Wire options of every message and of the Structs nested in them."""


class AddRequest(_Part, tag=1):
    """A request's prompt and sampling parameters (see docs/backend-api.md for each); `seed` is
    never None here (the supervisor draws one)."""

    req_id: int
    prompt_ids: Int32s
    params: SamplingParams


class AbortRequest(_Part, tag=2):
    req_id: int


class Shutdown(_Part, tag=3):
    reason: str


class WorkerReady(_Part, tag=4):
    num_kv_blocks: int


class SchedulerReady(_Part, tag=5):
    num_kv_blocks: int


class TokenOutputs(_Part, tag=6):
    """One entry per sampled token or finished request of a step."""

    req_ids: Int64s
    token_ids: Int32s  # -1 where a request finished without a new token (abort)
    finish_reasons: UInt8s  # NOT_FINISHED / FINISHED_*
    num_cached_tokens: Int32s  # prompt tokens the request got from the prefix cache
    logprobs: Float32s  # [E]; empty when no request of the step asked
    top_ids: Int32s  # [E, k] (k = the largest number asked in the step)
    top_logprobs: Float32s  # [E, k]


class RequestRejected(_Part, tag=7):
    req_id: int
    reason: str


class ActorFailed(_Part, tag=8):
    actor: str
    reason: str


class NewSlot(_Part):
    """A request (re)admitted into a worker slot: the worker resets the slot's block table and
    sampling state. Positions >= `num_prompt_tokens` hold generated tokens (penalties,
    min_tokens)."""

    slot: int
    num_prompt_tokens: int
    params: SamplingParams
    ban_token_ids: Int32s  # banned while fewer than min_tokens are generated (EOS, stop ids)
    # Prefix-cache hits [0, n) of a penalized request (else empty): they never reach the worker
    # as inputs, and its penalty counts need them.
    cached_token_ids: Int32s


class StepPlan(_Part, tag=9):
    step_id: int
    new_slots: list[NewSlot]  # (re)admitted requests
    freed_slots: Int32s
    slots: Int32s  # [B]
    num_new_tokens: Int32s  # [B]
    num_computed_tokens: Int32s  # [B]
    input_ids: Int32s  # [sum(num_new_tokens)]
    do_sample: UInt8s  # [B]
    block_appends: Int32s  # [M, 2]: (slot, block id), in order
    prompt_logprobs_rows: UInt8s  # [B]: the row's new tokens need prompt logprobs
    prompt_targets: Int32s  # next-token id for each new token of those rows (-1: none)


class StepResult(_Part, tag=10):
    step_id: int
    token_ids: Int32s  # [S], one per sampled request of the plan, in plan order
    logprobs: Float32s  # [S], or [0] when no request of the step asked
    top_ids: Int32s  # [S, k]
    top_logprobs: Float32s  # [S, k]
    prompt_logprobs: Float32s  # [T], aligned with StepPlan.prompt_targets
    prompt_top_ids: Int32s  # [T, k2]
    prompt_top_logprobs: Float32s  # [T, k2]
    # Plan rows (indices into `slots`) whose request failed this step: their entries above are
    # meaningless, and the scheduler ends them with RequestFailed. The rest of the batch is valid.
    failed_rows: Int32s  # [F]
    failure_reasons: list[str]  # [F], a sentence for the client each (no internals)


class PromptLogprobs(_Part, tag=11):
    """Logprobs of prompt tokens start_pos + 1 ... computed in one step for one request."""

    req_id: int
    start_pos: int  # position of the first new token of the step; its target is the next token
    logprobs: Float32s  # [n]; NaN where the target is not a prompt token
    top_ids: Int32s  # [n, k]
    top_logprobs: Float32s  # [n, k]


class RequestFailed(_Part, tag=13):
    """A request the engine failed to serve (request-scoped: the rest of the replica goes on).
    The supervisor answers it with a 500 `server_error` carrying `reason`."""

    req_id: int
    reason: str


class QueueTimeout(_Part, tag=14):
    """A request dropped by the scheduler after `waited` seconds in its queue, never scheduled
    (--max-queue-wait). The supervisor answers it with a 503 and Retry-After."""

    req_id: int
    waited: float


class SchedulerCounters(_Part):
    """One replica's gauges and counters for /v1/stats (SchedulerCore.stats())."""

    num_requests_running: int
    num_requests_waiting: int
    num_kv_blocks: int
    num_kv_blocks_used: int
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int


class SchedulerStats(_Part, tag=12):
    stats: SchedulerCounters


Message = (
    AddRequest
    | AbortRequest
    | Shutdown
    | WorkerReady
    | SchedulerReady
    | TokenOutputs
    | RequestRejected
    | RequestFailed
    | QueueTimeout
    | ActorFailed
    | StepPlan
    | StepResult
    | PromptLogprobs
    | SchedulerStats
)
CODEC = Codec(Message)
