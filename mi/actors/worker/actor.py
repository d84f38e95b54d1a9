"""Worker actor: one per accelerator (or CPU share). Holds a model shard and its KV cache.

Loop: read a StepPlan from the broadcast ring, run the forward pass, and (rank 0 only) send the
sampled ids back. A synchronous loop rather than asyncio: the worker waits on exactly one thing at
a time, and blocking on the ring's eventfd keeps an idle worker at ~0% CPU.

Started by the supervisor as `python -m mi.actors.worker SPEC_JSON` with the ring fds inherited.
"""

import collections
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mi.actors.lifecycle import die_with_parent, ignore_interrupts
from mi.actors.messages import CODEC, ActorFailed, Shutdown, StepPlan, WorkerReady
from mi.actors.worker.model_runner import ModelRunner, RunnerConfig
from mi.models.parallel import TensorParallel
from mi.ops import dispatch
from mi.shm import Receiver, Ring, Sender
from mi.shm.allreduce import ShmCollectives


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    tp: int
    parent_pid: int
    runner: RunnerConfig
    plan_ring: dict  # Ring.describe() of the broadcast ring; this worker reads slot `rank`
    result_ring: dict  # rank 0 writes StepResult here
    dist_init_file: str  # torch.distributed file store (no TCP port to collide on)
    num_threads: int
    cpu_ids: list[int]  # cores this rank is pinned to (CPU serving); [] = no pinning
    profile: bool  # time steps and collectives; print a summary to stderr on shutdown
    force_triton: bool  # the triton kernels also on CPU (the backend's MI_FORCE_TRITON)
    collectives: dict | None  # ShmCollectives.describe() for CPU tensor parallelism, else None

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        raw = json.loads(text)
        raw["runner"] = RunnerConfig(**raw["runner"])
        return cls(**raw)


def _init_tensor_parallel(spec: WorkerSpec) -> TensorParallel:
    if spec.tp == 1:
        return TensorParallel(profile=spec.profile)
    backend = "nccl" if spec.runner.device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{spec.dist_init_file}", rank=spec.rank, world_size=spec.tp
    )
    shm = ShmCollectives.attach(spec.collectives, spec.rank) if spec.collectives else None
    return TensorParallel(rank=spec.rank, size=spec.tp, group=dist.group.WORLD, shm=shm, profile=spec.profile)


def run(spec: WorkerSpec) -> None:
    dispatch.force_triton(spec.force_triton)
    if spec.cpu_ids:
        os.sched_setaffinity(0, spec.cpu_ids)
    torch.set_num_threads(spec.num_threads)
    plans = Receiver(Ring.attach(spec.plan_ring).reader(spec.rank), CODEC)
    results = Sender(Ring.attach(spec.result_ring).writer(), CODEC) if spec.rank == 0 else None
    try:
        if spec.runner.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(spec.runner.device))
        runner = ModelRunner(spec.runner, _init_tensor_parallel(spec))
    except Exception as exc:  # report start-up failures instead of dying silently
        if results is not None:
            results.send(ActorFailed(actor=f"worker {spec.rank}", reason=f"{type(exc).__name__}: {exc}"))
        raise
    if results is not None:
        results.send(WorkerReady(num_kv_blocks=runner.num_kv_blocks))

    num_steps, step_seconds = 0, 0.0
    # Profile: the wait from one step's end to the next plan (the scheduler's share of a step
    # when the engine is busy); the last 10k waits, idle periods included.
    gaps, step_ended = collections.deque(maxlen=10_000), None
    while True:
        msg = plans.recv()
        if spec.profile and step_ended is not None:
            gaps.append(time.perf_counter() - step_ended)
        if isinstance(msg, Shutdown):
            if spec.profile and num_steps:
                collective = runner.tp.collective_seconds
                print(
                    f"mi-profile worker {spec.rank}: {num_steps} steps, {step_seconds:.3f} s "
                    f"in steps, {collective:.3f} s in collectives "
                    f"({collective / step_seconds:.1%}), waits for the next plan: "
                    f"p50 {1e3 * statistics.median(gaps or [0]):.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if not isinstance(msg, StepPlan):
            raise TypeError(f"worker got unexpected {type(msg).__name__}")
        started = time.perf_counter()
        try:
            result = runner.execute(msg)
        except Exception as exc:
            if results is not None:
                results.send(ActorFailed(actor=f"worker {spec.rank}", reason=f"{type(exc).__name__}: {exc}"))
            raise
        num_steps += 1
        step_seconds += time.perf_counter() - started
        if results is not None:
            results.send(result)
        step_ended = time.perf_counter()


def main() -> None:
    spec = WorkerSpec.from_json(sys.argv[1])
    die_with_parent(spec.parent_pid)
    ignore_interrupts()
    try:
        run(spec)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
