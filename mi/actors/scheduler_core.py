"""Synchronous scheduler core: request lifecycle, queues, worker slots and KV block tables.

One formula: a request has ``num_tokens`` (prompt + generated) and ``num_computed_tokens`` (KV
cached); each step closes that gap for running requests (arrival order), then waiting ones (FCFS),
within ``max_num_batched_tokens`` and ``max_num_seqs`` — chunked prefill beside running decodes,
continuous batching. A sampled token is not cached yet: the next step computes it.

    add_request ──► waiting ──admit──► running ──update: stop / length──► gone
                       ▲                  │
                       └─────preempt──────┘      abort: from either queue, at once

Invariants (``check_invariants``): a waiting request holds no slot, blocks or cached tokens; a
running one holds a unique slot in [0, max_num_seqs), exactly ``ceil(num_computed_tokens /
block_size)`` blocks and, between steps, a token left to compute; ``running`` is in arrival order;
``num_computed_tokens <= num_tokens <= max_model_len``; ref counts match the block tables.
A plan is a diff for the workers' mirrors, applied in order: ``freed_slots``, ``new_reqs`` (reset
the slot's table), ``block_appends``. ``schedule`` and ``update`` alternate (one plan in flight);
``abort`` is legal only between them.
"""
from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mi.actors.block_manager import BlockManager, InvariantError, num_blocks_for


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 = disabled
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0              # EOS / stop ids end the request only after this many tokens

    def __post_init__(self) -> None:
        if not (self.max_tokens >= 1 and self.temperature >= 0 and 0 < self.top_p <= 1
                and self.top_k >= 0 and 0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"invalid {self}: need max_tokens >= 1, temperature >= 0, 0 < top_p "
                             "<= 1, top_k >= 0 and 0 <= min_tokens <= max_tokens")


@dataclass(frozen=True)
class NewSlot:
    """A request (re)admitted into a worker slot: the worker resets the slot's block table."""
    slot: int
    req_id: int
    temperature: float
    top_p: float
    top_k: int
    seed: int


@dataclass
class StepPlan:
    """One iteration, as diffs. Per-request arrays have length B, in plan order."""
    new_reqs: list[NewSlot]
    freed_slots: np.ndarray          # int32[K] slots released since the previous plan
    slots: np.ndarray                # int32[B]
    num_new_tokens: np.ndarray       # int32[B] tokens computed this step
    num_computed_tokens: np.ndarray  # int32[B] tokens already cached = position of first new one
    input_ids: np.ndarray            # int32[sum(num_new_tokens)]
    do_sample: np.ndarray            # bool[B] this step reaches the request's last known token
    block_appends: np.ndarray        # int32[M, 2] (slot, block_id) in append order
    req_ids: list[int]               # kept for ``update``; the workers do not need it


@dataclass(frozen=True)
class RequestOutput:
    req_id: int
    token_id: int
    finish_reason: str | None        # None, "stop" or "length"


@dataclass(eq=False)                 # identity, so list.remove finds this very request
class _Request:
    req_id: int
    arrival: int
    prompt_len: int
    token_ids: list[int]             # prompt + generated
    params: SamplingParams
    num_computed_tokens: int = 0
    slot: int = -1                   # -1 while waiting
    block_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class SchedulerCore:
    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...]) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.blocks = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.num_preemptions = 0
        self._reqs: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []            # sorted by arrival
        self._free_slots = list(range(max_num_seqs))  # min-heap: lowest slot first
        self._freed_slots: list[int] = []             # released since the last plan
        self._next_arrival = 0
        self._in_flight: StepPlan | None = None

    def add_request(self, req_id: int, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if req_id in self._reqs:
            raise ValueError(f"request {req_id}: id already in use")
        if len(prompt_ids) == 0:
            raise ValueError(f"request {req_id}: empty prompt")
        total_len = len(prompt_ids) + params.max_tokens
        if total_len > self.max_model_len:
            raise ValueError(f"request {req_id}: prompt ({len(prompt_ids)}) + max_tokens "
                             f"({params.max_tokens}) exceeds max_model_len ({self.max_model_len})")
        # The last sampled token is never computed, so at most total_len - 1 tokens are cached.
        needed = num_blocks_for(total_len - 1, self.block_size)
        if needed > self.blocks.num_blocks:
            raise ValueError(f"request {req_id}: needs {needed} KV blocks even alone, the cache "
                             f"has {self.blocks.num_blocks}")
        req = _Request(req_id, self._next_arrival, len(prompt_ids), [int(t) for t in prompt_ids],
                       params)
        self._next_arrival += 1
        self._reqs[req_id] = req
        self._waiting.append(req)

    def abort(self, req_id: int) -> bool:
        """Drop a request, freeing its blocks and slot. False if it is unknown or finished."""
        if self._in_flight is not None:
            raise RuntimeError("abort while a step is in flight; call it between steps")
        req = self._reqs.get(req_id)
        if req is not None:
            self._drop(req)
        return req is not None

    def has_unfinished(self) -> bool:
        return bool(self._reqs)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def block_tables(self) -> dict[int, list[int]]:
        """slot -> block ids, for every running request (a copy)."""
        return {req.slot: list(req.block_ids) for req in self._running}

    def schedule(self) -> StepPlan | None:
        """Plan one step, or None when there is nothing to compute."""
        if self._in_flight is not None:
            raise RuntimeError("schedule called before update of the previous plan")
        budget, i, preempted = self.max_num_batched_tokens, 0, False
        scheduled: list[tuple[_Request, int, int]] = []  # (req, num_computed before, num_new)
        new_reqs: list[NewSlot] = []
        appends: list[tuple[int, int]] = []              # (slot, block_id)
        while i < len(self._running) and budget > 0:
            req = self._running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            needed = self._blocks_needed(req, num_new)
            while req.slot >= 0 and not self.blocks.can_allocate(needed):
                self._preempt(self._running[-1])  # the youngest, at index >= i; maybe req itself
                preempted = True
            if req.slot < 0:
                break                             # req was the youngest left: nothing follows
            self._grant(req, num_new, needed, scheduled, appends)
            budget -= num_new
            i += 1
        # NOTE: no admissions after a preemption this step; blocks are too tight to grow the batch.
        while (self._waiting and not preempted and budget > 0
               and len(self._running) < self.max_num_seqs):
            req = self._waiting[0]
            num_new = min(req.num_tokens, budget)
            needed = self._blocks_needed(req, num_new)
            if not self.blocks.can_allocate(needed):
                break                             # FCFS: the head waits, nobody jumps it
            self._waiting.popleft()
            req.slot = heapq.heappop(self._free_slots)
            bisect.insort(self._running, req, key=lambda r: r.arrival)
            p = req.params
            new_reqs.append(NewSlot(req.slot, req.req_id, p.temperature, p.top_p, p.top_k, p.seed))
            self._grant(req, num_new, needed, scheduled, appends)
            budget -= num_new
        if not scheduled:
            return None
        self._in_flight = self._build_plan(scheduled, new_reqs, appends)
        return self._in_flight

    def update(self, plan: StepPlan, sampled_token_ids: Sequence[int]) -> list[RequestOutput]:
        """Apply the tokens sampled for ``plan`` (one per request with ``do_sample``, in order)."""
        if plan is not self._in_flight:
            raise RuntimeError("update for a plan that is not the one in flight")
        sample_req_ids = [r for r, s in zip(plan.req_ids, plan.do_sample) if s]
        if len(sampled_token_ids) != len(sample_req_ids):
            raise ValueError(
                f"expected {len(sample_req_ids)} sampled tokens, got {len(sampled_token_ids)}")
        self._in_flight = None
        outputs = []
        for req_id, token_id in zip(sample_req_ids, map(int, sampled_token_ids)):
            req = self._reqs[req_id]
            req.token_ids.append(token_id)
            reason = self._finish_reason(req, token_id)
            if reason is not None:
                self._drop(req)
            outputs.append(RequestOutput(req_id, token_id, reason))
        return outputs

    def _blocks_needed(self, req: _Request, num_new: int) -> int:
        num_total = num_blocks_for(req.num_computed_tokens + num_new, self.block_size)
        return num_total - len(req.block_ids)

    def _grant(self, req: _Request, num_new: int, needed: int,
               scheduled: list[tuple[_Request, int, int]], appends: list[tuple[int, int]]) -> None:
        new_block_ids = self.blocks.allocate(needed)
        req.block_ids.extend(new_block_ids)
        appends.extend((req.slot, b) for b in new_block_ids)
        scheduled.append((req, req.num_computed_tokens, num_new))
        req.num_computed_tokens += num_new

    def _build_plan(self, scheduled: list[tuple[_Request, int, int]], new_reqs: list[NewSlot],
                    appends: list[tuple[int, int]]) -> StepPlan:
        freed, self._freed_slots = self._freed_slots, []
        return StepPlan(
            new_reqs=new_reqs,
            freed_slots=np.array(freed, dtype=np.int32),
            slots=np.array([r.slot for r, _, _ in scheduled], dtype=np.int32),
            num_new_tokens=np.array([n for _, _, n in scheduled], dtype=np.int32),
            num_computed_tokens=np.array([start for _, start, _ in scheduled], dtype=np.int32),
            input_ids=np.array([t for r, start, n in scheduled
                                for t in r.token_ids[start:start + n]], dtype=np.int32),
            do_sample=np.array([r.num_computed_tokens == r.num_tokens for r, _, _ in scheduled],
                               dtype=np.bool_),
            block_appends=np.array(appends, dtype=np.int32).reshape(-1, 2),
            req_ids=[r.req_id for r, _, _ in scheduled],
        )

    def _finish_reason(self, req: _Request, token_id: int) -> str | None:
        p, num_generated = req.params, req.num_tokens - req.prompt_len
        is_eos = not p.ignore_eos and token_id in self.eos_token_ids
        if num_generated > p.min_tokens and (is_eos or token_id in p.stop_token_ids):
            return "stop"
        if num_generated >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _release(self, req: _Request) -> None:
        self.blocks.free(req.block_ids)
        req.block_ids = []
        heapq.heappush(self._free_slots, req.slot)
        self._freed_slots.append(req.slot)
        req.slot = -1

    def _drop(self, req: _Request) -> None:
        del self._reqs[req.req_id]
        if req.slot >= 0:
            self._running.remove(req)
            self._release(req)
        else:
            self._waiting.remove(req)

    def _preempt(self, req: _Request) -> None:
        """Preempt by recompute: keep the tokens, drop the KV, go to the front of the queue."""
        self._running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        self._waiting.appendleft(req)
        self.num_preemptions += 1

    def check_invariants(self) -> None:
        """Raise ``InvariantError`` naming the first broken invariant (see the module docstring)."""
        running, waiting = self._running, self._waiting
        slots, arrivals = [r.slot for r in running], [r.arrival for r in running]
        _require(len(running) + len(waiting) == len(self._reqs)
                 and set(self._reqs) == {r.req_id for r in (*running, *waiting)},
                 "request table differs from running + waiting")
        _require(arrivals == sorted(arrivals), f"running not in arrival order: {arrivals}")
        _require(sorted(slots + self._free_slots) == list(range(self.max_num_seqs)),
                 f"slots leaked or shared: running {slots}, free {sorted(self._free_slots)}")
        _require(all(r.slot < 0 and r.num_computed_tokens == 0 for r in waiting),
                 "a waiting request holds a slot or cached tokens")
        for req in (*running, *waiting):
            _require(req.num_computed_tokens <= req.num_tokens <= self.max_model_len,
                     f"request {req.req_id}: {req.num_computed_tokens} computed of "
                     f"{req.num_tokens} tokens, max_model_len {self.max_model_len}")
            num_blocks = num_blocks_for(req.num_computed_tokens, self.block_size)
            _require(len(req.block_ids) == num_blocks,
                     f"request {req.req_id}: {len(req.block_ids)} blocks, expected {num_blocks}")
            _require(self._in_flight is not None or req.num_computed_tokens < req.num_tokens,
                     f"request {req.req_id} is fully computed but unfinished: it would stall")
        self.blocks.check_invariants(r.block_ids for r in running)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise InvariantError(msg)
