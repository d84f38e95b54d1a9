"""Synchronous scheduler core: request lifecycle, queues, worker slots and KV block tables.

One formula: a request has ``num_tokens`` (prompt + generated) and ``num_computed_tokens`` (KV
cached); each step closes that gap for running requests (arrival order), then waiting ones (FCFS),
within ``max_num_batched_tokens`` and ``max_num_seqs`` — chunked prefill beside running decodes,
continuous batching. A sampled token is not cached yet: the next step computes it.

    add_request ──► waiting ──admit──► running ──update: stop / length──► gone
                       ▲                  │
                       └─────preempt──────┘      abort: from either queue, at once

Prefix caching: an admitted request starts from its longest prefix of cached full blocks (shared,
ref count + 1), keeping at least its last token to compute, so ``num_computed_tokens`` starts at
``hits * block_size``. A block is indexed in ``update``, once the step that filled it has run: a
request admitted in the same step cannot read KV that is still being written. A request asking
for prompt logprobs never looks up (every prompt position needs its logits) but is indexed.

Sliding window (``sliding_window``, given when every layer of the model has one): a query at
position p reads keys in (p - window, p] only, so once a request has computed ``c`` tokens its
blocks wholly before position c - window + 1 are never read again. They are freed after each
step (and at admission, for prefix-cache hits) and their table entries become ``FREED``; the
workers' mirrors keep the old ids, which their attention never reads (mi/ops/attention_plan.py
starts each box at the first visible key). A freed block keeps its prefix-cache entry like any
free block. A request then holds about ``window + max_num_batched_tokens`` tokens of blocks,
whatever its length, and one that fits that is admitted however long it is.

Invariants (``check_invariants``): a waiting request holds no slot, blocks or cached tokens; a
running one holds a unique slot in [0, max_num_seqs), exactly ``ceil(num_computed_tokens /
block_size)`` table entries (with a window, exactly the leading ones wholly before it
``FREED``) and, between steps, a token left to compute; ``running`` is in arrival order;
``num_computed_tokens <= num_tokens <= max_model_len``; ref counts match the block tables; an
indexed block of a request stores that request's tokens and lies among its first
``num_hashed_blocks`` blocks (so a partly computed block is never indexed).
A plan is a diff for the workers' mirrors, applied in order: ``freed_slots``, ``new_reqs`` (reset
the slot's table), ``block_appends``. ``schedule`` and ``update`` alternate (one plan in flight);
``abort`` is legal only between them.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from mi.actors.scheduler.block_manager import BlockManager, InvariantError, num_blocks_for, peak_blocks
from mi.actors.scheduler.plan import NewSlot, RequestOutput, SamplingParams, StepPlan
from mi.actors.scheduler.prefix_cache import ROOT, CachedBlock, extend_hashes

__all__ = ["FREED", "NewSlot", "RequestOutput", "SamplingParams", "SchedulerCore", "StepPlan"]

FREED = -1  # a table entry whose block fell out of the sliding window and went back to the pool


@dataclass(eq=False)  # identity, so list.remove finds this very request
class _Request:
    req_id: int
    arrival: int
    prompt_len: int
    token_ids: list[int]  # prompt + generated
    params: SamplingParams
    num_computed_tokens: int = 0
    slot: int = -1  # -1 while waiting
    block_ids: list[int] = field(default_factory=list)  # by position; FREED before the window
    num_freed_blocks: int = 0  # leading entries FREED (sliding window)
    block_hashes: list[bytes] = field(default_factory=list)  # keys of its leading full blocks
    num_hashed_blocks: int = 0  # leading blocks hit or offered to the index since admission
    cache_parent: int = ROOT  # serial of the entry for block num_hashed_blocks - 1
    num_cached_tokens: int = 0  # prompt tokens from the cache at its first admission
    is_admitted: bool = False  # once admitted (num_cached_tokens is then final)
    queued_at: float = 0.0  # add_request's `now`: when the queue wait began

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Row:  # one request's share of the step being planned
    req: _Request
    start: int  # num_computed_tokens before this step
    num_new: int


class SchedulerCore:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_model_len", max_model_len),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.blocks = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.enable_prefix_caching = enable_prefix_caching
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.num_preemptions = 0
        self.prefix_cache_queried_tokens = 0  # num_tokens of each admission that looked up
        self.prefix_cache_hit_tokens = 0  # tokens those admissions found cached
        self._reqs: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # sorted by arrival
        self._free_slots = list(range(max_num_seqs))  # min-heap: lowest slot first
        self._freed_slots: list[int] = []  # released since the last plan
        self._next_arrival = 0
        self._in_flight: StepPlan | None = None

    def add_request(
        self, req_id: int, prompt_ids: Sequence[int], params: SamplingParams, now: float = 0.0
    ) -> None:
        if req_id in self._reqs:
            raise ValueError(f"request {req_id}: id already in use")
        if len(prompt_ids) == 0:
            raise ValueError(f"request {req_id}: empty prompt")
        total_len = len(prompt_ids) + params.max_tokens
        if total_len > self.max_model_len:
            raise ValueError(
                f"request {req_id}: prompt ({len(prompt_ids)}) + max_tokens "
                f"({params.max_tokens}) exceeds max_model_len ({self.max_model_len})"
            )
        # The last sampled token is never computed; a scoring request (max_tokens 0) computes all.
        needed = peak_blocks(
            max(total_len - 1, len(prompt_ids)),
            self.block_size,
            self.sliding_window,
            self.max_num_batched_tokens,
        )
        if needed > self.blocks.num_blocks:
            raise ValueError(
                f"request {req_id}: needs {needed} KV blocks even alone, the cache "
                f"has {self.blocks.num_blocks}"
            )
        req = _Request(req_id, self._next_arrival, len(prompt_ids), [int(t) for t in prompt_ids], params)
        req.queued_at = now
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

    def expire_waiting(self, oldest_allowed: float) -> list[tuple[int, float]]:
        """Drops the waiting requests never admitted that were queued before `oldest_allowed`;
        returns (req_id, queued_at) of each. Preempted requests (admitted once) stay: their
        wait is not a queue wait. Only legal between steps, like `abort`.

        The waiting queue is the preempted requests (pushed to its front) followed by the never
        admitted in arrival order, so the scan stops at the first one queued late enough."""
        expired = []
        for req in self._waiting:
            if req.is_admitted:
                continue
            if req.queued_at >= oldest_allowed:
                break
            expired.append(req)
        for req in expired:
            self._drop(req)
        return [(req.req_id, req.queued_at) for req in expired]

    def has_unfinished(self) -> bool:
        return bool(self._reqs)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict[str, int]:
        """Gauges and counters for /v1/stats. Used blocks are those running requests reference;
        unreferenced cached blocks count as free (they are evicted on demand)."""
        return {
            "num_requests_running": len(self._running),
            "num_requests_waiting": len(self._waiting),
            "num_kv_blocks": self.blocks.num_blocks,
            "num_kv_blocks_used": self.blocks.num_used,
            "num_preemptions": self.num_preemptions,
            "prefix_cache_queried_tokens": self.prefix_cache_queried_tokens,
            "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
        }

    def block_tables(self) -> dict[int, list[int]]:
        """slot -> block ids, for every running request (a copy)."""
        return {req.slot: list(req.block_ids) for req in self._running}

    def schedule(self) -> StepPlan | None:
        """Plan one step, or None when there is nothing to compute."""
        if self._in_flight is not None:
            raise RuntimeError("schedule called before update of the previous plan")
        budget, i, preempted = self.max_num_batched_tokens, 0, False
        rows: list[_Row] = []
        new_reqs: list[NewSlot] = []
        appends: list[tuple[int, int]] = []  # (slot, block_id)
        while i < len(self._running) and budget > 0:
            req = self._running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            needed = self._blocks_needed(req, num_new)
            while req.slot >= 0 and not self.blocks.can_allocate(needed):
                self._preempt(self._running[-1])  # the youngest, at index >= i; maybe req itself
                preempted = True
            if req.slot < 0:
                break  # req was the youngest left: nothing follows
            self._grant(req, num_new, needed, rows, appends)
            budget -= num_new
            i += 1
        # NOTE: no admissions after a preemption this step; blocks are too tight to grow the batch.
        while self._waiting and not preempted and budget > 0 and len(self._running) < self.max_num_seqs:
            req = self._waiting[0]
            hits = self._match_prefix(req)
            if hits is not None and self._next_block_in_progress(req, len(hits)):
                break  # wait a step or two and share it instead
            hit_ids = [entry.block_id for entry in hits or ()]
            num_cached = len(hit_ids) * self.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            needed = num_blocks_for(num_cached + num_new, self.block_size) - len(hit_ids)
            if not self.blocks.can_allocate(needed, sharing=hit_ids):
                break  # FCFS: the head waits, nobody jumps it
            self._waiting.popleft()
            new_reqs.append(self._admit(req, hits, appends))
            self._grant(req, num_new, needed, rows, appends)
            budget -= num_new
        if not rows:
            return None
        self._in_flight = self._build_plan(rows, new_reqs, appends)
        return self._in_flight

    def update(
        self, plan: StepPlan, sampled_token_ids: Sequence[int], failed_rows: Collection[int] = ()
    ) -> list[RequestOutput]:
        """Apply the tokens sampled for ``plan`` (one per request with ``do_sample``, in order).

        A max_tokens=0 request whose prompt is now computed finishes with ``token_id`` -1 and
        ``finish_reason`` "length". The requests of ``failed_rows`` (plan rows) are dropped
        without an output (the caller reports them) and their blocks are not indexed: a step
        that failed may have written NaN into their KV."""
        if plan is not self._in_flight:
            raise RuntimeError("update for a plan that is not the one in flight")
        num_sampled = int(np.count_nonzero(plan.do_sample))
        if len(sampled_token_ids) != num_sampled:
            raise ValueError(f"expected {num_sampled} sampled tokens, got {len(sampled_token_ids)}")
        self._in_flight = None
        sampled = iter(map(int, sampled_token_ids))
        outputs = []
        for row, (req_id, do_sample) in enumerate(zip(plan.req_ids, plan.do_sample.tolist())):
            req = self._reqs[req_id]
            token_id = next(sampled) if do_sample else -1
            if row in failed_rows:
                self._drop(req)
                continue
            self._cache_computed_blocks(req)  # before freeing: a freed block keeps its entry
            self._free_out_of_window(req)
            if do_sample:
                req.token_ids.append(token_id)
                reason = self._finish_reason(req, token_id)
            elif req.num_computed_tokens == req.num_tokens:  # max_tokens 0: prompt scored
                token_id, reason = -1, "length"
            else:
                continue
            if reason is not None:
                self._drop(req)
            outputs.append(RequestOutput(req_id, token_id, reason, req.num_cached_tokens))
        return outputs

    def _match_prefix(self, req: _Request) -> list[CachedBlock] | None:
        """Cached blocks for ``req``'s leading full blocks, at most all but its last token; None
        when it may not look up (caching off, or prompt logprobs asked)."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return None
        max_blocks = (req.num_tokens - 1) // self.block_size
        extend_hashes(req.block_hashes, req.token_ids, self.block_size, max_blocks)
        return self.blocks.match_prefix(req.block_hashes[:max_blocks], req.token_ids)

    def _next_block_in_progress(self, req: _Request, num_hits: int) -> bool:
        """True when a running request is about to compute (and then index) the full block that
        would extend ``req``'s cache hit: identical prompts sent together (n > 1, a shared
        system prompt) then share their blocks instead of each computing its own."""
        if num_hits >= (req.num_tokens - 1) // self.block_size:
            return False
        wanted = req.block_hashes[num_hits]
        return any(
            other.num_hashed_blocks <= num_hits < len(other.block_hashes)
            and other.block_hashes[num_hits] == wanted
            for other in self._running
        )

    def _admit(
        self, req: _Request, hits: list[CachedBlock] | None, appends: list[tuple[int, int]]
    ) -> NewSlot:
        req.slot = heapq.heappop(self._free_slots)
        bisect.insort(self._running, req, key=lambda r: r.arrival)
        if hits is not None:
            self.prefix_cache_queried_tokens += req.num_tokens
            self.prefix_cache_hit_tokens += len(hits) * self.block_size
        hits = hits or []
        req.block_ids = [entry.block_id for entry in hits]
        self.blocks.share(req.block_ids)
        appends.extend((req.slot, b) for b in req.block_ids)
        req.num_computed_tokens = len(hits) * self.block_size
        self._free_out_of_window(req)
        req.num_hashed_blocks = len(hits)
        req.cache_parent = hits[-1].serial if hits else ROOT
        if not req.is_admitted:
            req.is_admitted, req.num_cached_tokens = True, req.num_computed_tokens
        return NewSlot(
            req.slot,
            req.req_id,
            req.prompt_len,
            req.params,
            np.array(req.token_ids[: req.num_computed_tokens], dtype=np.int32),
        )

    def _blocks_needed(self, req: _Request, num_new: int) -> int:
        num_total = num_blocks_for(req.num_computed_tokens + num_new, self.block_size)
        return num_total - len(req.block_ids)

    def _grant(
        self, req: _Request, num_new: int, needed: int, rows: list[_Row], appends: list[tuple[int, int]]
    ) -> None:
        new_block_ids = self.blocks.allocate(needed)
        req.block_ids.extend(new_block_ids)
        appends.extend((req.slot, b) for b in new_block_ids)
        rows.append(_Row(req, req.num_computed_tokens, num_new))
        req.num_computed_tokens += num_new

    def _cache_computed_blocks(self, req: _Request) -> None:
        """Offer the index every block of ``req`` whose tokens have all been computed."""
        num_full = req.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= req.num_hashed_blocks:
            return
        bs = self.block_size
        extend_hashes(req.block_hashes, req.token_ids, bs, num_full)
        for i in range(req.num_hashed_blocks, num_full):
            req.cache_parent = self.blocks.cache_block(
                req.block_ids[i],
                req.block_hashes[i],
                tuple(req.token_ids[i * bs : (i + 1) * bs]),
                req.cache_parent,
            )
        req.num_hashed_blocks = num_full

    def _free_out_of_window(self, req: _Request) -> None:
        """Frees ``req``'s blocks that no query from its next token on can see."""
        if self.sliding_window is None:
            return
        first_visible = req.num_computed_tokens - self.sliding_window + 1
        num_dead = max(0, first_visible // self.block_size)
        if num_dead <= req.num_freed_blocks:
            return
        dead = req.block_ids[req.num_freed_blocks : num_dead]
        self.blocks.free(dead)
        req.block_ids[req.num_freed_blocks : num_dead] = [FREED] * len(dead)
        req.num_freed_blocks = num_dead

    def _build_plan(
        self, rows: list[_Row], new_reqs: list[NewSlot], appends: list[tuple[int, int]]
    ) -> StepPlan:
        freed, self._freed_slots = self._freed_slots, []
        prompt_rows = [r.req.params.prompt_logprobs is not None and r.start < r.req.prompt_len for r in rows]
        prompt_targets = [
            _prompt_target(r.req, pos)
            for r, wanted in zip(rows, prompt_rows)
            if wanted
            for pos in range(r.start, r.start + r.num_new)
        ]
        return StepPlan(
            new_reqs=new_reqs,
            freed_slots=np.array(freed, dtype=np.int32),
            slots=np.array([r.req.slot for r in rows], dtype=np.int32),
            num_new_tokens=np.array([r.num_new for r in rows], dtype=np.int32),
            num_computed_tokens=np.array([r.start for r in rows], dtype=np.int32),
            input_ids=np.array(
                [t for r in rows for t in r.req.token_ids[r.start : r.start + r.num_new]], dtype=np.int32
            ),
            do_sample=np.array(
                [r.req.num_computed_tokens == r.req.num_tokens and r.req.params.max_tokens > 0 for r in rows],
                dtype=np.bool_,
            ),
            block_appends=np.array(appends, dtype=np.int32).reshape(-1, 2),
            prompt_logprobs_rows=np.array(prompt_rows, dtype=np.bool_),
            prompt_targets=np.array(prompt_targets, dtype=np.int32),
            req_ids=[r.req.req_id for r in rows],
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
        self.blocks.free(req.block_ids[req.num_freed_blocks :])
        req.block_ids, req.num_freed_blocks = [], 0
        req.num_hashed_blocks, req.cache_parent = 0, ROOT
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
        """Preempt by recompute: keep the tokens, drop the KV, go to the front of the queue.
        Its indexed blocks stay cached while free, so re-admission may hit them."""
        self._running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        self._waiting.appendleft(req)
        self.num_preemptions += 1

    def check_invariants(self) -> None:
        """Raise ``InvariantError`` naming the first broken invariant (see the module docstring)."""
        running, waiting = self._running, self._waiting
        slots, arrivals = [r.slot for r in running], [r.arrival for r in running]
        _require(
            len(running) + len(waiting) == len(self._reqs)
            and set(self._reqs) == {r.req_id for r in (*running, *waiting)},
            "request table differs from running + waiting",
        )
        _require(arrivals == sorted(arrivals), f"running not in arrival order: {arrivals}")
        _require(
            sorted(slots + self._free_slots) == list(range(self.max_num_seqs)),
            f"slots leaked or shared: running {slots}, free {sorted(self._free_slots)}",
        )
        _require(
            all(r.slot < 0 and r.num_computed_tokens == 0 and r.num_hashed_blocks == 0 for r in waiting),
            "a waiting request holds a slot or cached tokens",
        )
        for req in (*running, *waiting):
            _require(
                req.num_computed_tokens <= req.num_tokens <= self.max_model_len,
                f"request {req.req_id}: {req.num_computed_tokens} computed of "
                f"{req.num_tokens} tokens, max_model_len {self.max_model_len}",
            )
            num_blocks = num_blocks_for(req.num_computed_tokens, self.block_size)
            _require(
                len(req.block_ids) == num_blocks,
                f"request {req.req_id}: {len(req.block_ids)} blocks, expected {num_blocks}",
            )
            num_freed = req.num_freed_blocks
            _require(
                all(b == FREED for b in req.block_ids[:num_freed]) and FREED not in req.block_ids[num_freed:],
                f"request {req.req_id}: FREED entries are not exactly its first {num_freed}",
            )
            if self.sliding_window is not None and self._in_flight is None:
                first_visible = req.num_computed_tokens - self.sliding_window + 1
                _require(
                    num_freed == max(0, first_visible // self.block_size) or req.slot < 0,
                    f"request {req.req_id}: holds blocks no query can see ({num_freed} freed, "
                    f"{req.num_computed_tokens} computed, window {self.sliding_window})",
                )
            _require(
                self._in_flight is not None or req.num_computed_tokens < req.num_tokens,
                f"request {req.req_id} is fully computed but unfinished: it would stall",
            )
            self._check_cached_blocks(req)
        self.blocks.check_invariants(r.block_ids[r.num_freed_blocks :] for r in running)

    def _check_cached_blocks(self, req: _Request) -> None:
        bs = self.block_size
        _require(
            req.num_hashed_blocks <= req.num_computed_tokens // bs,
            f"request {req.req_id}: {req.num_hashed_blocks} blocks offered to the index, "
            f"only {req.num_computed_tokens} tokens computed",
        )
        for i, block_id in enumerate(req.block_ids):
            if block_id == FREED:
                continue
            entry = self.blocks.cached_block(block_id)
            if entry is None:
                continue
            _require(
                i < req.num_hashed_blocks,
                f"request {req.req_id}: block {block_id} (#{i}) indexed before it was offered",
            )
            _require(
                entry.token_ids == tuple(req.token_ids[i * bs : (i + 1) * bs]),
                f"request {req.req_id}: cached block {block_id} (#{i}) stores other tokens",
            )


def _prompt_target(req: _Request, pos: int) -> int:
    """The prompt token whose logprob the logits at ``pos`` give, or -1 past the prompt."""
    return req.token_ids[pos + 1] if pos + 1 < req.prompt_len else -1


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise InvariantError(msg)
