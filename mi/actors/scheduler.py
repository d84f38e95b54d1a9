"""Scheduler actor: one per replica. Wraps SchedulerCore with its four ring endpoints.

    supervisor ──requests──► scheduler ──StepPlan (broadcast)──► workers
    supervisor ◄──outputs─── scheduler ◄──StepResult (rank 0)─── workers

Per iteration: drain requests and aborts (blocking only when there is no work), schedule one
step, send the plan, wait for the sampled ids, send the outputs. A synchronous loop: the actor
waits on one ring at a time, and a blocked ring read sleeps on an eventfd (idle CPU ~0%).

Started by the supervisor as `python -m mi.actors.scheduler SPEC_JSON`.
"""
import json
import sys
import traceback
from dataclasses import dataclass

import numpy as np

from mi.actors import messages as m
from mi.actors.lifecycle import die_with_parent, ignore_interrupts
from mi.actors.scheduler_core import SamplingParams, SchedulerCore
from mi.shm import Receiver, Ring, Sender

_FINISH_CODES = {None: m.NOT_FINISHED, "stop": m.FINISHED_STOP, "length": m.FINISHED_LENGTH}


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
    ready_timeout: float


class SchedulerActor:
    def __init__(self, spec: SchedulerSpec):
        self.spec = spec
        self.requests = Receiver(Ring.attach(spec.request_ring).reader(0))
        self.outputs = Sender(Ring.attach(spec.output_ring).writer())
        self.plans = Sender(Ring.attach(spec.plan_ring).writer())
        self.results = Receiver(Ring.attach(spec.result_ring).reader(0))
        self.core: SchedulerCore | None = None
        self.step_id = 0

    def start(self) -> None:
        ready = self.results.recv(timeout=self.spec.ready_timeout)
        if isinstance(ready, m.ActorFailed):
            self.outputs.send(ready)
            raise SystemExit(1)
        if not isinstance(ready, m.WorkerReady):
            raise TypeError(f"expected WorkerReady, got {type(ready).__name__}")
        self.core = SchedulerCore(
            num_blocks=ready.num_kv_blocks, block_size=self.spec.block_size,
            max_num_seqs=self.spec.max_num_seqs,
            max_num_batched_tokens=self.spec.max_num_batched_tokens,
            max_model_len=self.spec.max_model_len, eos_token_ids=tuple(self.spec.eos_token_ids))
        self.outputs.send(m.SchedulerReady(num_kv_blocks=ready.num_kv_blocks))

    def _handle(self, msg) -> bool:
        """Applies one supervisor message; False on Shutdown."""
        if isinstance(msg, m.AddRequest):
            try:
                params = SamplingParams(
                    max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p,
                    top_k=msg.top_k, seed=msg.seed,
                    stop_token_ids=tuple(msg.stop_token_ids.tolist()),
                    ignore_eos=msg.ignore_eos, min_tokens=msg.min_tokens)
                self.core.add_request(msg.req_id, msg.prompt_ids, params)
            except ValueError as exc:
                self.outputs.send(m.RequestRejected(req_id=msg.req_id, reason=str(exc)))
        elif isinstance(msg, m.AbortRequest):
            if self.core.abort(msg.req_id):
                self.outputs.send(m.TokenOutputs(
                    req_ids=np.array([msg.req_id], dtype=np.int64),
                    token_ids=np.array([-1], dtype=np.int32),
                    finish_reasons=np.array([m.FINISHED_ABORT], dtype=np.uint8)))
        elif isinstance(msg, m.Shutdown):
            return False
        else:
            raise TypeError(f"scheduler got unexpected {type(msg).__name__}")
        return True

    def _drain_requests(self) -> bool:
        msg = self.requests.try_recv() if self.core.has_unfinished() else self.requests.recv()
        while msg is not None:
            if not self._handle(msg):
                return False
            msg = self.requests.try_recv()
        return True

    def _step(self) -> None:
        plan = self.core.schedule()
        if plan is None:
            return
        self.step_id += 1
        self.plans.send(m.StepPlan(
            step_id=self.step_id,
            new_slots=[[s.slot, s.temperature, s.top_p, s.top_k, s.seed] for s in plan.new_reqs],
            freed_slots=plan.freed_slots, slots=plan.slots, num_new_tokens=plan.num_new_tokens,
            num_computed_tokens=plan.num_computed_tokens, input_ids=plan.input_ids,
            do_sample=plan.do_sample.astype(np.uint8), block_appends=plan.block_appends))
        result = self.results.recv()
        if isinstance(result, m.ActorFailed):
            self.outputs.send(result)
            raise SystemExit(1)
        if not isinstance(result, m.StepResult) or result.step_id != self.step_id:
            raise TypeError(f"expected StepResult for step {self.step_id}, got {result!r:.200}")
        outputs = self.core.update(plan, result.token_ids.tolist())
        if outputs:
            self.outputs.send(m.TokenOutputs(
                req_ids=np.array([o.req_id for o in outputs], dtype=np.int64),
                token_ids=np.array([o.token_id for o in outputs], dtype=np.int32),
                finish_reasons=np.array([_FINISH_CODES[o.finish_reason] for o in outputs],
                                        dtype=np.uint8)))

    def run(self) -> None:
        self.start()
        try:
            while self._drain_requests():
                self._step()
        finally:
            self.plans.send(m.Shutdown(reason="scheduler stopping"))


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


if __name__ == "__main__":
    main()
