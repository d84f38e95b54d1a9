"""Scheduler actor: one per replica. Wraps SchedulerCore with its four ring endpoints.

    supervisor ──requests──► scheduler ──StepPlan (broadcast)──► workers
    supervisor ◄──outputs─── scheduler ◄──StepResult (rank 0)─── workers

Per iteration: drain requests and aborts (blocking only when there is no work), schedule one
step, send the plan, wait for the sampled ids, send the outputs. A request the worker failed
(StepResult.failed_rows) ends with RequestFailed; the rest of the batch goes on. A synchronous loop: the actor
waits on one ring at a time, and a blocked ring read sleeps on an eventfd (idle CPU ~0%).
Stats go to the supervisor at most every STATS_INTERVAL seconds while busy, and always right
before the scheduler goes idle (so a drained backend reports zero running requests).

Started by the supervisor as `python -m mi.actors.scheduler SPEC_JSON`.
"""

import json
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

from mi.actors import messages as m
from mi.actors.lifecycle import die_with_parent, ignore_interrupts
from mi.actors.scheduler.core import NewSlot, SchedulerCore, StepPlan
from mi.shm import Receiver, Ring, Sender

_FINISH_CODES = {None: m.NOT_FINISHED, "stop": m.FINISHED_STOP, "length": m.FINISHED_LENGTH}
STATS_INTERVAL = 0.2
_NO_TOKENS = np.zeros(0, dtype=np.int32)


@dataclass(frozen=True)
class SchedulerSpec:
    parent_pid: int
    request_ring: dict  # supervisor -> scheduler
    output_ring: dict  # scheduler -> supervisor
    plan_ring: dict  # scheduler -> workers (broadcast)
    result_ring: dict  # worker rank 0 -> scheduler
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_ids: list[int]
    enable_prefix_caching: bool
    check_invariants: bool  # debug: verify the block manager every time the scheduler goes idle
    ready_timeout: float
    max_queue_wait: float = 0.0  # seconds a request may wait unscheduled; 0: no limit
    # Every layer's window (mi.config.kv_window): the blocks behind it are freed.
    sliding_window: int | None = None


class SchedulerActor:
    def __init__(self, spec: SchedulerSpec):
        self.spec = spec
        self.requests = Receiver(Ring.attach(spec.request_ring).reader(0), m.CODEC)
        self.outputs = Sender(Ring.attach(spec.output_ring).writer(), m.CODEC)
        self.plans = Sender(Ring.attach(spec.plan_ring).writer(), m.CODEC)
        self.results = Receiver(Ring.attach(spec.result_ring).reader(0), m.CODEC)
        self._eos_token_ids = tuple(spec.eos_token_ids)
        self.core: SchedulerCore | None = None
        self.step_id = 0
        self._stats_sent_at = 0.0

    def start(self) -> None:
        ready = self.results.recv(timeout=self.spec.ready_timeout)
        if isinstance(ready, m.ActorFailed):
            self.outputs.send(ready)
            raise SystemExit(1)
        if not isinstance(ready, m.WorkerReady):
            raise TypeError(f"expected WorkerReady, got {type(ready).__name__}")
        self.core = SchedulerCore(
            num_blocks=ready.num_kv_blocks,
            block_size=self.spec.block_size,
            max_num_seqs=self.spec.max_num_seqs,
            max_num_batched_tokens=self.spec.max_num_batched_tokens,
            max_model_len=self.spec.max_model_len,
            eos_token_ids=tuple(self.spec.eos_token_ids),
            enable_prefix_caching=self.spec.enable_prefix_caching,
            sliding_window=self.spec.sliding_window,
        )
        self.outputs.send(m.SchedulerReady(num_kv_blocks=ready.num_kv_blocks))
        self._send_stats()

    def _send_stats(self) -> None:
        self.outputs.send(m.SchedulerStats(stats=m.SchedulerCounters(**self.core.stats())))
        self._stats_sent_at = time.monotonic()

    def _handle(self, msg) -> bool:
        """Applies one supervisor message; False on Shutdown."""
        if isinstance(msg, m.AddRequest):
            try:
                self.core.add_request(msg.req_id, msg.prompt_ids, msg.params, now=time.monotonic())
            except ValueError as exc:
                self.outputs.send(m.RequestRejected(req_id=msg.req_id, reason=str(exc)))
        elif isinstance(msg, m.AbortRequest):
            if self.core.abort(msg.req_id):
                self.outputs.send(_token_outputs([msg.req_id], [-1], [m.FINISHED_ABORT], [0]))
        elif isinstance(msg, m.Shutdown):
            return False
        else:
            raise TypeError(f"scheduler got unexpected {type(msg).__name__}")
        return True

    def _drain_requests(self) -> bool:
        msg = self.requests.try_recv()
        if msg is None and not self.core.has_unfinished():
            if self.spec.check_invariants:
                self.core.check_invariants()  # raises: the actor reports ActorFailed and exits
            self._send_stats()  # about to sleep: report the idle state first
            msg = self.requests.recv()
        while msg is not None:
            if not self._handle(msg):
                return False
            msg = self.requests.try_recv()
        return True

    def _new_slot(self, new: NewSlot) -> m.NewSlot:
        p = new.params
        bans = () if p.min_tokens == 0 else (p.stop_token_ids + (() if p.ignore_eos else self._eos_token_ids))
        return m.NewSlot(
            slot=new.slot,
            num_prompt_tokens=new.num_prompt_tokens,
            params=p,
            ban_token_ids=np.array(bans, dtype=np.int32),
            cached_token_ids=new.cached_token_ids if p.is_penalized else _NO_TOKENS,
        )

    def _plan_message(self, plan: StepPlan) -> m.StepPlan:
        return m.StepPlan(
            step_id=self.step_id,
            new_slots=[self._new_slot(new) for new in plan.new_reqs],
            freed_slots=plan.freed_slots,
            slots=plan.slots,
            num_new_tokens=plan.num_new_tokens,
            num_computed_tokens=plan.num_computed_tokens,
            input_ids=plan.input_ids,
            do_sample=plan.do_sample.astype(np.uint8),
            block_appends=plan.block_appends,
            prompt_logprobs_rows=plan.prompt_logprobs_rows.astype(np.uint8),
            prompt_targets=plan.prompt_targets,
        )

    def _send_prompt_logprobs(self, plan: StepPlan, result: m.StepResult) -> None:
        rows = np.flatnonzero(plan.prompt_logprobs_rows)
        ends = np.cumsum(plan.num_new_tokens[rows])
        for row, end, n in zip(rows.tolist(), ends.tolist(), plan.num_new_tokens[rows].tolist()):
            part = slice(end - n, end)
            self.outputs.send(
                m.PromptLogprobs(
                    req_id=plan.req_ids[row],
                    start_pos=int(plan.num_computed_tokens[row]),
                    logprobs=result.prompt_logprobs[part],
                    top_ids=result.prompt_top_ids[part],
                    top_logprobs=result.prompt_top_logprobs[part],
                )
            )

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for req_id, queued_at in self.core.expire_waiting(now - self.spec.max_queue_wait):
            self.outputs.send(m.QueueTimeout(req_id=req_id, waited=now - queued_at))

    def _step(self) -> None:
        if self.spec.max_queue_wait:
            self._expire_waiting()
        plan = self.core.schedule()
        if plan is None:
            return
        self.step_id += 1
        self.plans.send(self._plan_message(plan))
        result = self.results.recv()
        if isinstance(result, m.ActorFailed):
            self.outputs.send(result)
            raise SystemExit(1)
        if not isinstance(result, m.StepResult) or result.step_id != self.step_id:
            raise TypeError(f"expected StepResult for step {self.step_id}, got {result!r:.200}")
        failed = dict(zip(result.failed_rows.tolist(), result.failure_reasons))
        for row, reason in failed.items():  # first: the supervisor then ignores their other outputs
            self.outputs.send(m.RequestFailed(req_id=plan.req_ids[row], reason=reason))
        if len(result.prompt_logprobs):
            self._send_prompt_logprobs(plan, result)
        outputs = self.core.update(plan, result.token_ids.tolist(), failed)
        if outputs:
            self.outputs.send(_outputs_message(plan, result, outputs))
        if time.monotonic() - self._stats_sent_at > STATS_INTERVAL:
            self._send_stats()

    def run(self) -> None:
        self.start()
        try:
            while self._drain_requests():
                self._step()
        finally:
            self.plans.send(m.Shutdown(reason="scheduler stopping"))


def _token_outputs(
    req_ids, token_ids, codes, cached, logprobs=None, top_ids=None, top_logprobs=None
) -> m.TokenOutputs:
    return m.TokenOutputs(
        req_ids=np.asarray(req_ids, dtype=np.int64),
        token_ids=np.asarray(token_ids, dtype=np.int32),
        finish_reasons=np.asarray(codes, dtype=np.uint8),
        num_cached_tokens=np.asarray(cached, dtype=np.int32),
        logprobs=np.zeros(0, np.float32) if logprobs is None else logprobs,
        top_ids=np.zeros((0, 0), np.int32) if top_ids is None else top_ids,
        top_logprobs=np.zeros((0, 0), np.float32) if top_logprobs is None else top_logprobs,
    )


def _outputs_message(plan: StepPlan, result: m.StepResult, outputs) -> m.TokenOutputs:
    """Outputs with the logprobs of their sampled row attached (when the step computed any)."""
    msg = _token_outputs(
        [o.req_id for o in outputs],
        [o.token_id for o in outputs],
        [_FINISH_CODES[o.finish_reason] for o in outputs],
        [o.num_cached_tokens for o in outputs],
    )
    if len(result.logprobs) == 0:
        return msg
    sampled_req_ids = np.asarray(plan.req_ids, dtype=np.int64)[plan.do_sample.astype(bool)]
    order = np.argsort(sampled_req_ids)
    pos = np.searchsorted(sampled_req_ids, msg.req_ids, sorter=order)
    rows = order[np.minimum(pos, len(order) - 1)]
    # An output without a sampled row (a prompt-only request) gets an arbitrary row's values;
    # its token id is -1, so the supervisor records no logprob for it.
    return _token_outputs(
        msg.req_ids,
        msg.token_ids,
        msg.finish_reasons,
        msg.num_cached_tokens,
        result.logprobs[rows],
        result.top_ids[rows],
        result.top_logprobs[rows],
    )


def main() -> None:
    spec = SchedulerSpec(**json.loads(sys.argv[1]))
    die_with_parent(spec.parent_pid)
    ignore_interrupts()
    actor = SchedulerActor(spec)
    try:
        actor.run()
    except SystemExit:
        raise
    except Exception as exc:
        traceback.print_exc()
        actor.outputs.send(m.ActorFailed(actor="scheduler", reason=f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
