"""Supervisor: owns the replicas (child processes and rings) and the table of live requests.

    Supervisor ──AddRequest/Abort──► scheduler ──StepPlan──► workers      (one set per replica)
        ▲ ◄──TokenOutputs, PromptLogprobs, SchedulerStats──┘ ◄──StepResult── worker 0

It tokenizes prompts, routes each request to the least-loaded replica, turns token outputs into
text (incremental, UTF-8 safe, stop strings) and hands each request's events to its HTTP handler
through an asyncio queue. A child that dies, a replica that makes no progress for
`--step-timeout` seconds while it has work (a hung worker or collective), or a failed reader of a
replica's outputs is an engine-scoped failure of that replica: its requests in flight get a 503
`backend_failed`, never a hang; then the backend shuts down (`--on-failure exit`) or the replica
is replaced (`--on-failure restart`, mi/actors/supervisor/restarts.py). The loop never waits on a
ring: sends go through `Replica.send`, reads through `recv_async`.

States (GET /health is 200 only in "ok"):

    starting ─► ok ◄─► restarting (no replica serving)
                 │         │
                 └────┬────┘
                      ├─► stopping (SIGTERM: drain, then shutdown)
                      └─► dead (engine failure, or the restart budget spent)
"""

import asyncio
import itertools
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
import numpy as np

from mi.actors import messages as m
from mi.actors.scheduler.block_manager import peak_blocks
from mi.actors.supervisor.admission import PromptTokenizer
from mi.actors.supervisor.detokenizer import TextStream
from mi.actors.supervisor.replica import Replica, cpu_shares
from mi.actors.supervisor.restarts import RestartBudget, replace_replica
from mi.api.backend import GenerateRequest, Logprob, StreamDelta, Usage, check_context_len
from mi.api.errors import ApiError
from mi.config import BackendConfig, kv_window
from mi.grammar import GrammarCompiler

log = logging.getLogger("mi.backend")


@dataclass
class LiveRequest:
    """A request between submission and its final event."""

    request_id: str
    req_id: int
    replica: Replica
    prompt_ids: list[int]
    text: TextStream
    num_logprobs: int | None  # None: not asked
    num_prompt_logprobs: int | None
    ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list = field(default_factory=list)  # entry per prompt token, first None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # StreamDelta | ApiError
    deadline: asyncio.TimerHandle | None = None  # --max-request-time

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.ids), self.num_cached_tokens)


def _logprob_entry(token_id: int, logprob: float, top_ids, top_logprobs, k: int) -> Logprob:
    return Logprob(
        token_id,
        None if math.isnan(logprob) else logprob,
        tuple((int(i), float(lp)) for i, lp in zip(top_ids[:k], top_logprobs[:k])),
    )


def _remove_stale_run_dirs() -> None:
    """The run directories of supervisors that died without their teardown (kill -9)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        parts = name.split("-")
        if len(parts) == 4 and parts[:2] == ["mi", "backend"] and parts[2].isdecimal():
            pid = int(parts[2])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            except PermissionError:
                pass  # someone else's live process


class Supervisor:
    def __init__(self, cfg: BackendConfig, mi_config: dict, tokenizer):
        self.cfg = cfg
        self.mi_config = mi_config
        self.tokenizer = tokenizer
        model = mi_config["model"]
        self.vocab_size = model["vocab_size"]
        self.eos_token_ids = list(model["eos_token_ids"])
        self.kv_window = kv_window(model)  # the scheduler frees blocks behind it (None: keeps all)
        self.state = "starting"  # see the module docstring
        self.failure = asyncio.Event()  # set when a child dies or reports a failure
        self.failure_reason: str | None = None
        self.replicas: list[Replica] = []
        self.finished = Counter()  # finish reason -> requests
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self._requests: dict[int, LiveRequest] = {}
        self._by_request_id: dict[str, LiveRequest] = {}
        self._req_ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self._pumps: dict[int, asyncio.Task] = {}  # replica index -> its output reader
        self._cpu_shares: list[tuple[int, list[list[int]]]] = []  # replica index -> start() args
        self.restarts = RestartBudget()
        self._drained = asyncio.Event()  # set when the last live request finishes
        _remove_stale_run_dirs()
        self._run_dir = tempfile.mkdtemp(prefix=f"mi-backend-{os.getpid()}-")
        self.prompts = PromptTokenizer(tokenizer, cfg.max_model_len, cfg.max_prompt_bytes)
        self._grammars: GrammarCompiler | None = None  # from the first structured-output request

    @property
    def num_kv_blocks(self) -> int:
        return min((r.num_kv_blocks for r in self._serving()), default=0)

    def _serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.phase == "serving"]

    # -- start-up ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        threads, cpu_ids = (
            cpu_shares(cfg.num_devices)
            if cfg.device_type == "cpu"
            else (1, [[] for _ in range(cfg.num_devices)])
        )
        for index in range(cfg.num_replicas):
            replica = Replica(index, cfg, self.mi_config["model"], self.eos_token_ids, self._run_dir)
            self.replicas.append(replica)
            self._cpu_shares.append((threads, cpu_ids[index * cfg.tp : (index + 1) * cfg.tp]))
            replica.start(*self._cpu_shares[index])
        self._tasks.append(asyncio.create_task(self._watch_children()))
        ready = asyncio.create_task(
            asyncio.wait_for(asyncio.gather(*(r.wait_ready() for r in self.replicas)), cfg.ready_timeout)
        )
        failed = asyncio.create_task(self.failure.wait())
        await asyncio.wait({ready, failed}, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if not ready.done():
            ready.cancel()
            raise RuntimeError(self.failure_reason)
        try:
            ready.result()
        except asyncio.TimeoutError:
            raise RuntimeError(f"workers not ready after {cfg.ready_timeout:.0f} s") from None
        self.state = "ok"
        for replica in self.replicas:
            self._serve(replica)

    def _serve(self, replica: Replica) -> None:
        replica.phase = "serving"
        replica.last_progress = time.monotonic()
        self._pumps[replica.index] = asyncio.create_task(self._pump_outputs(replica))

    def _fail(self, reason: str) -> None:
        """An engine failure of the whole backend: every request in flight fails, then exit 1."""
        if self.failure.is_set():
            return
        log.error("backend failed: %s", reason)
        self.failure_reason = reason
        if self.state != "stopping":
            self.state = "dead"
        self._fail_requests(list(self._requests.values()))
        self.failure.set()

    def _fail_requests(self, lives: list[LiveRequest]) -> None:
        for live in lives:
            self._forget(live)
            live.events.put_nowait(
                ApiError(
                    503,  # the engine, not the request: retry elsewhere (issue 10's fault taxonomy)
                    "The backend failed while serving this request.",
                    type="server_error",
                    code="backend_failed",
                )
            )

    def _replica_failed(self, replica: Replica, reason: str) -> None:
        """An engine-scoped failure of one replica: exit, or replace it (--on-failure)."""
        if replica.phase == "failed" or self.failure.is_set():
            return
        delay = self.restarts.next_delay() if self.cfg.on_failure == "restart" else None
        if self.state not in ("ok", "restarting") or delay is None:
            if self.cfg.on_failure == "restart" and self.state in ("ok", "restarting"):
                reason += (
                    f" (the restart budget is spent: {self.restarts.max_restarts} restarts in "
                    f"{self.restarts.window_s:.0f} s)"
                )
            self._fail(reason)
            return
        log.error("%s; restarting replica %d in %g s", reason, replica.index, delay)
        replica.phase = "failed"
        self._fail_requests([live for live in self._requests.values() if live.replica is replica])
        self._update_state()
        self._tasks.append(asyncio.create_task(self._restart(replica, delay)))

    def _update_state(self) -> None:
        if self.state in ("ok", "restarting"):
            self.state = "ok" if self._serving() else "restarting"

    async def _restart(self, old: Replica, delay: float) -> None:
        pump = self._pumps.pop(old.index, None)
        if pump is not None:
            pump.cancel()  # before stop() closes the ring it reads
            await asyncio.gather(pump, return_exceptions=True)

        def make() -> Replica:
            self.restarts.record()
            new = Replica(
                old.index,
                self.cfg,
                self.mi_config["model"],
                self.eos_token_ids,
                self._run_dir,
                old.generation + 1,
            )
            self.replicas[old.index] = new  # from here shutdown() stops it, whatever happens next
            new.start(*self._cpu_shares[old.index])
            return new

        try:
            new, reason = await replace_replica(old, delay, make, self.cfg.ready_timeout)
        except Exception as exc:  # e.g. no memory for the new rings: the backend's failure
            log.exception("restarting replica %d failed", old.index)
            self._fail(f"restarting replica {old.index} failed: {type(exc).__name__}: {exc}")
            return
        if reason is not None:
            self._replica_failed(new, f"replica {old.index} failed to restart: {reason}")
            return
        if self.state not in ("ok", "restarting"):
            return  # stopping meanwhile: shutdown() stops it
        log.info("replica %d restarted (%d restarts so far)", old.index, self.restarts.num_restarts)
        self._serve(new)
        self._update_state()

    async def _watch_children(self) -> None:
        """Every 0.2 s: a dead child, and (once loaded) a replica stalled past --step-timeout.
        A replica being replaced is watched by its restart instead."""
        while not self.failure.is_set():
            for replica in list(self.replicas):
                if self.state == "starting":
                    reason = replica.dead_child()
                    if reason:
                        self._fail(reason)
                    continue
                if replica.phase != "serving":
                    continue
                reason = replica.dead_child() or replica.stalled(self.cfg.step_timeout)
                if reason:
                    self._replica_failed(replica, reason)
            await asyncio.sleep(0.2)

    # -- requests ---------------------------------------------------------------------------
    async def admit(self, req: GenerateRequest) -> LiveRequest:
        """Tokenizes a text prompt off the loop (after the cheap checks and the size check),
        then submits the request."""
        self._admissible_replica(req)
        if req.structured_outputs is not None:
            await self._check_compiles(req.structured_outputs)
        if req.prompt is not None:
            req = await self.prompts.tokenized(req)
        return self.submit(req)

    async def _check_compiles(self, constraint) -> None:
        """A 400 (GrammarError) now for a schema, regex or grammar that does not compile, not a
        failed request later; off the loop, and cached by the constraint's text."""
        if self._grammars is None:
            model = self.mi_config["model"]
            self._grammars = GrammarCompiler(self.cfg.model_dir, model["vocab_size"], self.eos_token_ids)
        await asyncio.wrap_future(self._grammars.compile(constraint))

    def _check_intake(self) -> None:
        if self.state == "stopping":
            raise ApiError(503, "The backend is shutting down.", code="shutting_down", retry_after=1)
        if self.state != "ok":
            raise ApiError(503, f"The backend is {self.state}.", code="backend_unavailable", retry_after=1)

    def _admissible_replica(self, req: GenerateRequest) -> Replica:
        """The replica for `req`, or the ApiError of a backend that cannot take it now."""
        self._check_intake()
        if req.request_id in self._by_request_id:
            raise ApiError(400, f"request_id {req.request_id!r} is already in use.", "request_id")
        replica = min(self._serving(), key=lambda r: r.num_live)
        if replica.num_live >= self.cfg.max_num_seqs + self.cfg.max_queued_requests:
            raise ApiError(
                503,
                "The server is overloaded: too many requests are queued.",
                code="overloaded",
                retry_after=1,
            )
        return replica

    def submit(self, req: GenerateRequest) -> LiveRequest:
        """Validates what needs the KV size, then queues a tokenized request (see `admit`)."""
        replica = self._admissible_replica(req)
        if req.prompt_ids is None:
            raise TypeError("submit() takes a tokenized request; admit() tokenizes one")
        prompt_ids = list(req.prompt_ids)
        check_context_len(len(prompt_ids), req.max_tokens, self.cfg.max_model_len)
        needed = peak_blocks(
            len(prompt_ids) + max(req.max_tokens, 1) - 1,
            self.cfg.block_size,
            self.kv_window,
            self.cfg.max_num_batched_tokens,
        )
        if needed > self.num_kv_blocks:
            raise ApiError(
                400,
                f"The request needs {needed} KV-cache blocks but the backend has "
                f"{self.num_kv_blocks}; shorten the prompt or max_tokens.",
                "max_tokens",
            )
        text = TextStream(
            self.tokenizer, prompt_ids, req.stop, req.skip_special_tokens, req.include_stop_str_in_output
        )
        live = LiveRequest(
            req.request_id, next(self._req_ids), replica, prompt_ids, text, req.logprobs, req.prompt_logprobs
        )
        params = req.sampling_params()
        if params.seed is None:
            params = msgspec.structs.replace(params, seed=secrets.randbits(63))
        replica.send(
            m.AddRequest(req_id=live.req_id, prompt_ids=np.asarray(prompt_ids, dtype=np.int32), params=params)
        )
        if not replica.num_live:
            replica.last_progress = time.monotonic()  # the step timeout runs from here
        replica.num_live += 1
        replica.num_routed += 1
        self.num_prompt_tokens += len(prompt_ids)
        self._requests[live.req_id] = live
        self._by_request_id[live.request_id] = live
        if self.cfg.max_request_time:
            live.deadline = asyncio.get_running_loop().call_later(
                self.cfg.max_request_time, self._expire, live
            )
        return live

    def _expire(self, live: LiveRequest) -> None:
        """--max-request-time: stops a request still running (its KV blocks freed by the abort)."""
        if self._by_request_id.get(live.request_id) is not live:
            return
        if self.state == "ok":
            live.replica.send(m.AbortRequest(req_id=live.req_id))
        self._forget(live)
        live.events.put_nowait(
            ApiError(
                504,
                f"The request ran longer than this server's limit of {self.cfg.max_request_time:g} s "
                "(mi-backend --max-request-time) and was stopped.",
                type="server_error",
                code="request_timeout",
            )
        )

    def abort(self, request_id: str) -> bool:
        live = self._by_request_id.get(request_id)
        if live is None:
            return False
        if live.replica.phase == "serving" and not self.failure.is_set():
            live.replica.send(m.AbortRequest(req_id=live.req_id))
        self._finish(
            live,
            StreamDelta(
                (), live.text.take_delta(final=True), "abort", live.usage(), logprobs=self._no_logprobs(live)
            ),
        )
        return True

    def cancel(self, live: LiveRequest) -> None:
        """Aborts `live` if it is still running (a no-op once it has finished)."""
        if self._by_request_id.get(live.request_id) is live:
            self.abort(live.request_id)

    def _finish(self, live: LiveRequest, event: StreamDelta) -> None:
        self._forget(live)
        self.finished[event.finish_reason] += 1
        live.events.put_nowait(event)

    def _forget(self, live: LiveRequest) -> None:
        if live.deadline is not None:
            live.deadline.cancel()
        self._requests.pop(live.req_id, None)
        self._by_request_id.pop(live.request_id, None)
        live.replica.num_live -= 1
        if not self._requests:
            self._drained.set()

    @staticmethod
    def _no_logprobs(live: LiveRequest) -> list | None:
        return [] if live.num_logprobs is not None else None

    def _on_outputs(self, msg: m.TokenOutputs) -> None:
        has_logprobs = len(msg.logprobs) > 0
        for i, (req_id, token_id, code) in enumerate(
            zip(msg.req_ids.tolist(), msg.token_ids.tolist(), msg.finish_reasons.tolist())
        ):
            live = self._requests.get(req_id)
            if live is None:
                continue  # finished here already (stop string, client abort)
            live.num_cached_tokens = int(msg.num_cached_tokens[i])
            new_ids = (token_id,) if token_id >= 0 else ()
            logprobs = self._no_logprobs(live)
            if new_ids:
                live.ids.append(token_id)
                live.text.add(list(new_ids))
                self.num_generated_tokens += 1
                if has_logprobs and live.num_logprobs is not None:
                    logprobs.append(
                        _logprob_entry(
                            token_id,
                            float(msg.logprobs[i]),
                            msg.top_ids[i],
                            msg.top_logprobs[i],
                            live.num_logprobs,
                        )
                    )
            finish = m.FINISH_REASON_NAMES.get(code)
            if finish is None and live.text.stopped:
                finish = "stop"
                live.replica.send(m.AbortRequest(req_id=req_id))
            if finish is None:
                live.events.put_nowait(
                    StreamDelta(new_ids, live.text.take_delta(final=False), None, logprobs=logprobs)
                )
                continue
            live.text.flush()
            self._finish(
                live,
                StreamDelta(
                    new_ids, live.text.take_delta(final=True), finish, live.usage(), logprobs=logprobs
                ),
            )

    def _on_prompt_logprobs(self, msg: m.PromptLogprobs) -> None:
        live = self._requests.get(msg.req_id)
        if live is None:
            return
        if msg.start_pos == 0:
            live.prompt_logprobs = [None]
        targets = live.prompt_ids[msg.start_pos + 1 : msg.start_pos + 1 + len(msg.logprobs)]
        live.prompt_logprobs += [
            _logprob_entry(
                t, float(msg.logprobs[j]), msg.top_ids[j], msg.top_logprobs[j], live.num_prompt_logprobs
            )
            for j, t in enumerate(targets)
        ]

    async def _pump_outputs(self, replica: Replica) -> None:
        """Reads one replica's outputs until it fails; any exception here fails the backend
        (logged), never a reader that dies silently and leaves its requests waiting."""
        try:
            while self._on_scheduler_message(replica, await replica.from_scheduler.recv_async()):
                pass
        except Exception as exc:
            log.exception("replica %d: reading the scheduler's outputs failed", replica.index)
            self._replica_failed(
                replica, f"replica {replica.index}: reading its outputs failed: {type(exc).__name__}: {exc}"
            )

    def _on_scheduler_message(self, replica: Replica, msg) -> bool:
        """Applies one message from a scheduler; False once the replica has failed."""
        replica.last_progress = time.monotonic()
        if isinstance(msg, m.TokenOutputs):
            self._on_outputs(msg)
        elif isinstance(msg, m.PromptLogprobs):
            self._on_prompt_logprobs(msg)
        elif isinstance(msg, m.SchedulerStats):
            replica.stats = msg.stats
        elif isinstance(msg, m.RequestRejected):
            live = self._requests.get(msg.req_id)
            if live is not None:
                self._forget(live)
                live.events.put_nowait(ApiError(400, msg.reason))
        elif isinstance(msg, m.QueueTimeout):
            live = self._requests.get(msg.req_id)
            if live is not None:
                self._forget(live)
                live.events.put_nowait(
                    ApiError(
                        503,
                        f"The server is overloaded: the request waited {msg.waited:.1f} s in the queue, "
                        f"more than this server's limit of {self.cfg.max_queue_wait:g} s "
                        "(mi-backend --max-queue-wait).",
                        code="queue_timeout",
                        retry_after=1,
                    )
                )
        elif isinstance(msg, m.RequestFailed):
            live = self._requests.get(msg.req_id)
            if live is not None:
                log.warning("request %s failed: %s", live.request_id, msg.reason)
                self._forget(live)
                live.events.put_nowait(ApiError(500, msg.reason, code="request_failed"))
        elif isinstance(msg, m.ActorFailed):
            self._replica_failed(replica, f"replica {replica.index} {msg.actor}: {msg.reason}")
            return False
        else:
            self._replica_failed(replica, f"unexpected {type(msg).__name__} from replica {replica.index}")
            return False
        return True

    def stats(self) -> dict:
        """GET /v1/stats: scheduler counters summed over replicas, plus the supervisor's own."""
        counters = [{} if r.stats is None else msgspec.structs.asdict(r.stats) for r in self.replicas]
        summed = Counter()
        for counts in counters:
            summed.update(counts)
        return {
            "num_requests_running": summed["num_requests_running"],
            "num_requests_waiting": summed["num_requests_waiting"],
            "num_kv_blocks": summed["num_kv_blocks"],
            "num_kv_blocks_used": summed["num_kv_blocks_used"],
            "num_preemptions": summed["num_preemptions"],
            "prefix_cache_queried_tokens": summed["prefix_cache_queried_tokens"],
            "prefix_cache_hit_tokens": summed["prefix_cache_hit_tokens"],
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generated_tokens,
            "requests_finished_total": {r: self.finished[r] for r in ("stop", "length", "abort")},
            "replica_restarts_total": self.restarts.num_restarts,
            "replicas": [
                {
                    "index": r.index,
                    "num_requests_live": r.num_live,
                    "requests_routed_total": r.num_routed,
                    **counts,
                }
                for r, counts in zip(self.replicas, counters)
            ],
        }

    # -- shutdown ---------------------------------------------------------------------------
    async def drain(self, timeout: float, abort_now: asyncio.Event) -> None:
        """SIGTERM: no new requests (503 shutting_down, /health 503); those in flight run on
        until they finish, `timeout` seconds pass, `abort_now` is set or the engine fails."""
        if self.state == "dead":
            return
        self.state = "stopping"
        if not self._requests:
            return
        log.info("draining %d requests for up to %g s", len(self._requests), timeout)
        self._drained.clear()
        waits = [asyncio.ensure_future(e.wait()) for e in (self._drained, abort_now, self.failure)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def shutdown(self) -> None:
        """Fail the requests still in flight, stop the children (grace period, then SIGKILL),
        free rings."""
        if self.state != "dead":
            self.state = "stopping"
        for live in list(self._requests.values()):
            if live.replica.phase == "serving" and not self.failure.is_set():
                live.replica.send(m.AbortRequest(req_id=live.req_id))
            self._forget(live)
            live.events.put_nowait(
                ApiError(
                    503,
                    "The backend shut down before this request finished.",
                    type="server_error",
                    code="shutting_down",
                )
            )
        for task in [*self._tasks, *self._pumps.values()]:
            task.cancel()
        for replica in self.replicas:
            if replica.phase == "serving" and not self.failure.is_set():
                # Queued behind any pending request; a scheduler that does not read it within
                # the grace period is killed with the rest.
                replica.send(m.Shutdown(reason="supervisor stopping"))
        # After a child failure the survivors may be blocked on it (a scheduler waiting for a
        # dead worker's result): no grace period, kill them now.
        grace = 0.0 if self.failure.is_set() else self.cfg.shutdown_grace
        # A replica still loading (a restart under way) has no scheduler to read Shutdown.
        await asyncio.gather(*(r.stop(grace if r.phase == "serving" else 0.0, log) for r in self.replicas))
        self.prompts.close()
        if self._grammars is not None:
            self._grammars.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)
