"""`--on-failure restart`: the budget and backoff of replica restarts, and the restart itself.

    replica fails ─► its requests get 503 backend_failed ─► kill + reap its children, free rings
        ─► wait 1 s, 2 s, 4 s (doubling with each restart in the window) ─► a fresh replica
        (new rings, new processes, loading watched for a dead child) ─► serving again

At most `MAX_RESTARTS` restarts in `WINDOW_S` seconds, counted over the whole backend: the
failure after that is the backend's (exit 1), so a crash loop ends instead of spinning. A restart
whose new replica fails to load counts as a failure too. Other replicas serve on meanwhile.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from mi.actors.supervisor.replica import Replica

log = logging.getLogger("mi.backend")

MAX_RESTARTS = 3
WINDOW_S = 600.0
FIRST_DELAY_S = 1.0


class RestartBudget:
    """How long to wait before the next restart, or None once the budget is spent."""

    def __init__(self, max_restarts: int = MAX_RESTARTS, window_s: float = WINDOW_S, clock=time.monotonic):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.num_restarts = 0  # over the backend's life, for /v1/stats
        self._clock = clock
        self._recent: deque[float] = deque()

    def next_delay(self) -> float | None:
        now = self._clock()
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            return None
        return FIRST_DELAY_S * 2 ** len(self._recent)

    def record(self) -> None:
        self._recent.append(self._clock())
        self.num_restarts += 1


async def replace_replica(
    old: Replica, delay: float, make: Callable[[], Replica], ready_timeout: float
) -> tuple[Replica, str | None]:
    """Stops `old` (no grace: its children may be blocked on the dead one), waits `delay`, and
    starts `make()`: (the new replica, None) once it is ready, or (it, why it failed to load).
    The caller owns the new replica from the moment `make` returns (it must stop it on failure
    or at shutdown)."""
    await old.stop(0.0, log)
    await asyncio.sleep(delay)
    new = make()
    ready = asyncio.ensure_future(asyncio.wait_for(new.wait_ready(), ready_timeout))
    try:
        while not ready.done():
            reason = new.dead_child()
            if reason is not None:
                return new, reason
            await asyncio.wait({ready}, timeout=0.2)
        exc = ready.exception()
        if isinstance(exc, asyncio.TimeoutError):
            return new, f"replica {new.index} not ready after {ready_timeout:.0f} s"
        return new, None if exc is None else str(exc)
    finally:
        ready.cancel()
