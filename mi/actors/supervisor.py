"""Supervisor: owns the backend's child processes, their rings, and the table of live requests.

    Supervisor ──AddRequest/Abort──► scheduler ──StepPlan──► workers
        ▲ ◄────────TokenOutputs─────────┘        ◄──StepResult── worker 0

It tokenizes prompts, turns token outputs into text (incremental, UTF-8 safe, stop strings) and
hands each request's events to its HTTP handler through an asyncio queue. A child that dies turns
into an error for every request in flight and a shutdown, never a hang.

Lifetime: rings are anonymous memfds (nothing in /dev/shm to leak); children are started with
`pass_fds`, die with the supervisor (PR_SET_PDEATHSIG) and are stopped in order on shutdown:
Shutdown message, grace period, SIGKILL.
"""
import asyncio
import itertools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from mi.actors import messages as m
from mi.actors.detokenizer import TextStream
from mi.api.backend import GenerateRequest, StreamDelta, Usage, check_context_len
from mi.api.errors import ApiError
from mi.config import BackendConfig
from mi.shm import Receiver, Ring, Sender

log = logging.getLogger("mi.backend")

_REQUEST_RING_BYTES = 8 << 20
_OUTPUT_RING_BYTES = 4 << 20
_PLAN_RING_BYTES = 8 << 20
_RESULT_RING_BYTES = 1 << 20


@dataclass
class LiveRequest:
    """A request between submission and its final event."""

    request_id: str
    req_id: int
    prompt_ids: list[int]
    text: TextStream
    ids: list[int] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StreamDelta | ApiError


class Supervisor:
    def __init__(self, cfg: BackendConfig, mi_config: dict, tokenizer):
        self.cfg = cfg
        self.mi_config = mi_config
        self.tokenizer = tokenizer
        model = mi_config["model"]
        self.vocab_size = model["vocab_size"]
        self.eos_token_ids = list(model["eos_token_ids"])
        self.state = "starting"  # -> "ok" -> "stopping" | "dead"
        self.num_kv_blocks = 0
        self.failure = asyncio.Event()  # set when a child dies or reports a failure
        self._failure_reason: str | None = None
        self._requests: dict[int, LiveRequest] = {}
        self._by_request_id: dict[str, LiveRequest] = {}
        self._req_ids = itertools.count(1)
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._tasks: list[asyncio.Task] = []
        self._run_dir = tempfile.mkdtemp(prefix=f"mi-backend-{os.getpid()}-")

    # -- start-up ---------------------------------------------------------------------------
    def _spawn(self, name: str, module: str, spec: dict, fds: list[int]) -> None:
        proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(spec)], pass_fds=fds,
                                stdin=subprocess.DEVNULL)
        self._procs.append((name, proc))

    def _cpu_plan(self) -> tuple[int, list[list[int]]]:
        """Threads per rank and the cores each rank is pinned to (CPU: equal shares)."""
        tp = self.cfg.tp
        if self.cfg.device_type != "cpu":
            return 1, [[] for _ in range(tp)]
        cores = sorted(os.sched_getaffinity(0))
        if tp == 1:
            return len(cores), [[]]
        share = max(1, len(cores) // tp)
        return share, [cores[(r * share) % len(cores):][:share] for r in range(tp)]

    async def start(self) -> None:
        cfg = self.cfg
        rings = {
            "request": Ring.create(_REQUEST_RING_BYTES, num_readers=1),
            "output": Ring.create(_OUTPUT_RING_BYTES, num_readers=1),
            "plan": Ring.create(_PLAN_RING_BYTES, num_readers=cfg.tp),
            "result": Ring.create(_RESULT_RING_BYTES, num_readers=1),
        }
        self._rings = rings
        self._to_scheduler = Sender(rings["request"].writer())
        self._from_scheduler = Receiver(rings["output"].reader(0))
        kv_cache_bytes = cfg.kv_cache_bytes
        threads, cpu_ids = self._cpu_plan()
        for rank in range(cfg.tp):
            device = "cpu" if cfg.device_type == "cpu" else f"cuda:{rank}"
            spec = dict(
                rank=rank, tp=cfg.tp, parent_pid=os.getpid(),
                runner=dict(model_dir=cfg.model_dir, device=device, dtype=cfg.dtype,
                            block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                            max_model_len=cfg.max_model_len, num_kv_blocks=cfg.num_kv_blocks,
                            kv_cache_bytes=kv_cache_bytes),
                plan_ring=rings["plan"].describe(), result_ring=rings["result"].describe(),
                dist_init_file=os.path.join(self._run_dir, "dist-init"),
                num_threads=threads, cpu_ids=cpu_ids[rank])
            self._spawn(f"worker {rank}", "mi.actors.worker", spec,
                        rings["plan"].fds() + rings["result"].fds())
        spec = dict(parent_pid=os.getpid(), request_ring=rings["request"].describe(),
                    output_ring=rings["output"].describe(), plan_ring=rings["plan"].describe(),
                    result_ring=rings["result"].describe(), block_size=cfg.block_size,
                    max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                    max_model_len=cfg.max_model_len, eos_token_ids=self.eos_token_ids,
                    ready_timeout=cfg.ready_timeout)
        self._spawn("scheduler", "mi.actors.scheduler", spec,
                    sum((ring.fds() for ring in rings.values()), []))
        self._tasks.append(asyncio.create_task(self._watch_children()))

        ready = asyncio.create_task(self._from_scheduler.recv_async())
        failed = asyncio.create_task(self.failure.wait())
        done, _ = await asyncio.wait({ready, failed}, timeout=cfg.ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if ready not in done:
            ready.cancel()
            raise RuntimeError(self._failure_reason or f"workers not ready after {cfg.ready_timeout:.0f} s")
        msg = ready.result()
        if isinstance(msg, m.ActorFailed):
            raise RuntimeError(f"{msg.actor} failed to start: {msg.reason}")
        if not isinstance(msg, m.SchedulerReady):
            raise RuntimeError(f"unexpected first message from the scheduler: {type(msg).__name__}")
        self.num_kv_blocks = msg.num_kv_blocks
        self.state = "ok"
        self._tasks.append(asyncio.create_task(self._pump_outputs()))

    def _fail(self, reason: str) -> None:
        if self.failure.is_set():
            return
        log.error("backend failed: %s", reason)
        self._failure_reason = reason
        if self.state != "stopping":
            self.state = "dead"
        self._finish_all(ApiError(500, "The backend failed while serving this request.",
                                  type="server_error", code="backend_failed"))
        self.failure.set()

    async def _watch_children(self) -> None:
        while True:
            for name, proc in self._procs:
                if proc.poll() is not None and self.state in ("starting", "ok"):
                    self._fail(f"{name} exited with code {proc.returncode}")
                    return
            await asyncio.sleep(0.2)

    # -- requests ---------------------------------------------------------------------------
    def submit(self, req: GenerateRequest) -> LiveRequest:
        """Validates what needs the tokenizer or the KV size, then queues the request."""
        if self.state != "ok":
            raise ApiError(503, f"The backend is {self.state}.", code="backend_unavailable",
                           retry_after=1)
        if req.request_id in self._by_request_id:
            raise ApiError(400, f"request_id {req.request_id!r} is already in use.", "request_id")
        if req.prompt_ids is not None:
            prompt_ids = list(req.prompt_ids)
        else:
            prompt_ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        check_context_len(len(prompt_ids), req.max_tokens, self.cfg.max_model_len)
        needed = -(-(len(prompt_ids) + req.max_tokens - 1) // self.cfg.block_size)
        if needed > self.num_kv_blocks:
            raise ApiError(400, f"The request needs {needed} KV-cache blocks but the backend has "
                           f"{self.num_kv_blocks}; shorten the prompt or max_tokens.", "max_tokens")
        live = LiveRequest(req.request_id, next(self._req_ids), prompt_ids,
                           TextStream(self.tokenizer, prompt_ids, req.stop, req.skip_special_tokens))
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        self._to_scheduler.send(m.AddRequest(
            req_id=live.req_id, prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=max(0, req.top_k), seed=seed,
            stop_token_ids=np.asarray(req.stop_token_ids, dtype=np.int32),
            ignore_eos=req.ignore_eos, min_tokens=0))
        self._requests[live.req_id] = live
        self._by_request_id[live.request_id] = live
        return live

    def abort(self, request_id: str) -> bool:
        live = self._by_request_id.get(request_id)
        if live is None:
            return False
        self._forget(live)
        if self.state == "ok":
            self._to_scheduler.send(m.AbortRequest(req_id=live.req_id))
        live.events.put_nowait(StreamDelta((), live.text.take_delta(final=True), "abort",
                                           Usage(len(live.prompt_ids), len(live.ids))))
        return True

    def cancel(self, live: LiveRequest) -> None:
        """Aborts `live` if it is still running (a no-op once it has finished)."""
        if self._by_request_id.get(live.request_id) is live:
            self.abort(live.request_id)

    def _forget(self, live: LiveRequest) -> None:
        self._requests.pop(live.req_id, None)
        self._by_request_id.pop(live.request_id, None)

    def _finish_all(self, event) -> None:
        for live in list(self._requests.values()):
            self._forget(live)
            live.events.put_nowait(event)

    def _on_outputs(self, msg: m.TokenOutputs) -> None:
        for req_id, token_id, code in zip(msg.req_ids.tolist(), msg.token_ids.tolist(),
                                          msg.finish_reasons.tolist()):
            live = self._requests.get(req_id)
            if live is None:
                continue  # finished here already (stop string, client abort)
            new_ids = (token_id,) if token_id >= 0 else ()
            if new_ids:
                live.ids.append(token_id)
                live.text.add(list(new_ids))
            finish = m.FINISH_REASON_NAMES.get(code)
            if finish is None and live.text.stopped:
                finish = "stop"
                self._to_scheduler.send(m.AbortRequest(req_id=req_id))
            if finish is not None:
                live.text.flush()
                self._forget(live)
            usage = Usage(len(live.prompt_ids), len(live.ids)) if finish else None
            live.events.put_nowait(StreamDelta(new_ids, live.text.take_delta(final=finish is not None),
                                               finish, usage))

    async def _pump_outputs(self) -> None:
        while True:
            msg = await self._from_scheduler.recv_async()
            if isinstance(msg, m.TokenOutputs):
                self._on_outputs(msg)
            elif isinstance(msg, m.RequestRejected):
                live = self._requests.get(msg.req_id)
                if live is not None:
                    self._forget(live)
                    live.events.put_nowait(ApiError(400, msg.reason))
            elif isinstance(msg, m.ActorFailed):
                self._fail(f"{msg.actor}: {msg.reason}")
                return
            else:
                self._fail(f"unexpected {type(msg).__name__} from the scheduler")
                return

    # -- shutdown ---------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Abort in-flight requests, stop the children (grace period, then SIGKILL), free rings."""
        if self.state != "dead":
            self.state = "stopping"
        for live in list(self._requests.values()):
            self.abort(live.request_id)
        for task in self._tasks:
            task.cancel()
        if hasattr(self, "_to_scheduler") and not self.failure.is_set():
            try:
                self._to_scheduler.send(m.Shutdown(reason="supervisor stopping"), timeout=1.0)
            except Exception as exc:  # a full ring must not block the exit
                log.warning("could not send Shutdown to the scheduler: %s", exc)
        deadline = asyncio.get_running_loop().time() + self.cfg.shutdown_grace
        for name, proc in self._procs:
            while proc.poll() is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        for name, proc in self._procs:
            if proc.poll() is None:
                log.warning("%s did not stop in %.0f s; killing it", name, self.cfg.shutdown_grace)
                proc.kill()
            proc.wait()
        for ring in getattr(self, "_rings", {}).values():
            ring.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)
