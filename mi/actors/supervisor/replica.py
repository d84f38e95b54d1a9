"""One data-parallel replica: a scheduler and its tp workers, their four rings and processes.

    request ring (supervisor -> scheduler)      output ring (scheduler -> supervisor)
    plan ring (scheduler -> tp workers)         result ring (worker 0 -> scheduler)

Children are fresh interpreters (`python -m mi.actors.worker SPEC`) that inherit only the ring
fds they need. On CPU each worker is pinned to an equal share of the cores.

The supervisor's loop never waits on the request ring: a message goes out at once when the ring
has room, else it queues in order (behind any earlier one) and a task sends it as space frees up.
The queue is bounded by the requests a replica admits (an AddRequest and an AbortRequest each).
A replica that has work and sends nothing back for `step_timeout` seconds is stalled.

Phases: "loading" (children started, no SchedulerReady yet) -> "serving" -> "failed" (requests
go elsewhere; under --on-failure restart a fresh Replica of the same index replaces it). `stop`
kills and reaps every child and frees the rings, whatever the phase (a second call is harmless).
"""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import deque

from mi.actors import messages as m
from mi.config import BackendConfig, kv_window
from mi.shm import Receiver, Ring, Sender
from mi.shm.allreduce import ShmCollectives

_RING_BYTES = {"request": 8 << 20, "output": 4 << 20, "plan": 8 << 20, "result": 4 << 20}


def cpu_shares(num_workers: int) -> tuple[int, list[list[int]]]:
    """Threads per worker and the cores each one is pinned to ([] = not pinned)."""
    cores = sorted(os.sched_getaffinity(0))
    if num_workers == 1:
        return len(cores), [[]]
    share = max(1, len(cores) // num_workers)
    return share, [[cores[(w * share + i) % len(cores)] for i in range(share)] for w in range(num_workers)]


def _collective_slot_bytes(cfg: BackendConfig, model: dict) -> int:
    """Room for the largest all-reduce (a step's hidden states) and the sampled rows' logits
    shard of the all-gather; anything bigger (e.g. prompt-logprobs logits) goes through gloo."""
    hidden = cfg.max_num_batched_tokens * model["hidden_size"]
    logits = cfg.max_num_seqs * model["padded_vocab_size"] // cfg.tp
    return 4 * max(hidden, logits)


def _child_env() -> dict:
    env = dict(os.environ)
    # Single host: collectives talk over loopback only, never a public interface.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


class Replica:
    def __init__(
        self,
        index: int,
        cfg: BackendConfig,
        model: dict,
        eos_token_ids: list[int],
        run_dir: str,
        generation: int = 0,
    ):
        self.index = index
        self.generation = generation  # restarts of this index so far
        self.cfg = cfg
        self.phase = "loading"
        self.rings = {
            name: Ring.create(size, num_readers=cfg.tp if name == "plan" else 1)
            for name, size in _RING_BYTES.items()
        }
        self.to_scheduler = Sender(self.rings["request"].writer(), m.CODEC)
        self.from_scheduler = Receiver(self.rings["output"].reader(0), m.CODEC)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.num_kv_blocks = 0
        self.num_live = 0  # requests routed here and not finished: the routing load
        self.num_routed = 0
        self.stats: m.SchedulerCounters | None = None  # the latest SchedulerStats
        self.last_progress = time.monotonic()  # a message came from the scheduler, or work began
        self._outbox: deque = deque()  # messages the request ring had no room for yet
        self._outbox_since = 0.0
        self._flusher: asyncio.Task | None = None
        self._send_failure: str | None = None
        self.collectives = (
            ShmCollectives.create(cfg.tp, _collective_slot_bytes(cfg, model))
            if cfg.device_type == "cpu" and cfg.tp > 1 and cfg.shm_collectives
            else None
        )
        self._eos_token_ids = eos_token_ids
        self._model = model
        # NOTE: a fresh file per generation: a rendezvous over a dead group's file would hang.
        self._dist_init_file = os.path.join(run_dir, f"dist-init-{index}-{generation}")

    def _spawn(self, name: str, module: str, spec: dict, rings: list[str], extra_fds: list[int] = ()) -> None:
        fds = [fd for ring in rings for fd in self.rings[ring].fds()] + list(extra_fds)
        proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(spec)],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
        )
        self.procs.append((f"replica {self.index} {name}", proc))

    def start(self, threads: int, cpu_ids: list[list[int]]) -> None:
        """Spawns the workers (cpu_ids: one list per rank) and the scheduler."""
        cfg, rings = self.cfg, self.rings
        for rank in range(cfg.tp):
            device = "cpu" if cfg.device_type == "cpu" else f"cuda:{self.index * cfg.tp + rank}"
            spec = dict(
                rank=rank,
                tp=cfg.tp,
                parent_pid=os.getpid(),
                runner=dict(
                    model_dir=cfg.model_dir,
                    device=device,
                    dtype=cfg.dtype,
                    block_size=cfg.block_size,
                    max_num_seqs=cfg.max_num_seqs,
                    max_model_len=cfg.max_model_len,
                    num_kv_blocks=cfg.num_kv_blocks,
                    kv_cache_bytes=cfg.kv_cache_bytes,
                    cpu_linear=cfg.cpu_linear,
                ),
                plan_ring=rings["plan"].describe(),
                result_ring=rings["result"].describe(),
                dist_init_file=self._dist_init_file,
                num_threads=threads,
                cpu_ids=cpu_ids[rank],
                profile=cfg.profile,
                force_triton=cfg.force_triton,
                collectives=self.collectives.describe() if self.collectives else None,
            )
            self._spawn(
                f"worker {rank}",
                "mi.actors.worker",
                spec,
                ["plan", "result"],
                self.collectives.fds() if self.collectives else [],
            )
        spec = dict(
            parent_pid=os.getpid(),
            request_ring=rings["request"].describe(),
            output_ring=rings["output"].describe(),
            plan_ring=rings["plan"].describe(),
            result_ring=rings["result"].describe(),
            block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.max_model_len,
            eos_token_ids=self._eos_token_ids,
            enable_prefix_caching=cfg.enable_prefix_caching,
            check_invariants=cfg.debug_invariants,
            ready_timeout=cfg.ready_timeout,
            max_queue_wait=cfg.max_queue_wait,
            sliding_window=kv_window(self._model),
        )
        self._spawn("scheduler", "mi.actors.scheduler", spec, list(rings))

    async def wait_ready(self) -> None:
        msg = await self.from_scheduler.recv_async()
        if isinstance(msg, m.ActorFailed):
            raise RuntimeError(f"replica {self.index} {msg.actor} failed to start: {msg.reason}")
        if not isinstance(msg, m.SchedulerReady):
            raise RuntimeError(f"unexpected first message from the scheduler: {type(msg).__name__}")
        self.num_kv_blocks = msg.num_kv_blocks

    def send(self, msg) -> None:
        """Queues `msg` for the scheduler without blocking the loop (messages keep their order)."""
        if not self._outbox and self.to_scheduler.try_send(msg):
            return
        if not self._outbox:
            self._outbox_since = time.monotonic()
        self._outbox.append(msg)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._outbox:
                await self.to_scheduler.send_async(self._outbox[0])
                self._outbox.popleft()
                self._outbox_since = time.monotonic()
        except Exception as exc:
            self._send_failure = (
                f"replica {self.index}: sending to the scheduler failed: {type(exc).__name__}: {exc}"
            )

    def dead_child(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return self._send_failure

    def stalled(self, step_timeout: float) -> str | None:
        """Why this replica counts as hung, or None: it has work and has sent nothing back (or
        not read its request ring) for `step_timeout` seconds. 0 turns the check off."""
        now = time.monotonic()
        if not self.num_live and not self._outbox:
            self.last_progress = now  # idle: no step is due
            return None
        if not step_timeout:
            return None
        if self._outbox and now - self._outbox_since > step_timeout:
            return f"replica {self.index}: the scheduler read no request for {step_timeout:g} s"
        if now - self.last_progress > step_timeout:
            return (
                f"replica {self.index}: no step finished for {step_timeout:g} s with "
                f"{self.num_live} requests in flight (a hung worker or collective)"
            )
        return None

    async def stop(self, grace: float, log) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for _, proc in self.procs:
            while proc.poll() is None and loop.time() < deadline:
                await asyncio.sleep(0.05)
        for name, proc in self.procs:
            if proc.poll() is None:
                if grace:
                    log.warning("%s did not stop in %.0f s; killing it", name, grace)
                proc.kill()
            proc.wait()
        if self._flusher is not None:
            self._flusher.cancel()  # and let it leave the loop before its ring closes under it
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._outbox.clear()
        for ring in self.rings.values():
            ring.close()
        if self.collectives is not None:
            self.collectives.close()
            self.collectives = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dist_init_file)
