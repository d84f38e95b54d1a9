"""The supervisor's loop never waits on a ring, its output reader never dies silently, and a replica
that stops making progress is failed by the watchdog.

In process, on the real Supervisor and Replica with real rings and no children: a scheduler that
is stuck is one that does not read its request ring or write its output ring, which is exactly
what a ring without a peer is. The pytest timeouts turn a loop that blocks (the bug) into a
failure instead of a hung session.
"""

import asyncio
import logging
import time
from pathlib import Path

import pytest

import mi.actors.supervisor.replica as replica_module
from mi.actors import messages as m
from mi.actors.supervisor.supervisor import Supervisor
from mi.api.backend import parse_generate_request
from mi.api.errors import ApiError
from mi.config import BackendConfig
from mi.shm import Receiver, Ring, Sender

VOCAB_SIZE = 500
PROMPT_IDS = list(range(3, 203))  # 800 bytes of ids in each AddRequest


def _config(step_timeout: float) -> BackendConfig:
    return BackendConfig(
        model_dir="unused",
        host="127.0.0.1",
        port=1,
        device_type="cpu",
        num_devices=1,
        tp=1,
        dtype="float32",
        block_size=16,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_model_len=2048,
        kv_cache_bytes=0,
        num_kv_blocks=1000,
        enable_prefix_caching=True,
        max_queued_requests=1024,
        cert_path=Path("unused"),
        socket_dir=Path("unused"),  # the supervisor alone never binds the socket
        ready_timeout=10.0,
        shutdown_grace=0.1,
        step_timeout=step_timeout,
    )


def _supervisor(step_timeout: float = 60.0) -> Supervisor:
    """A started Supervisor with one replica whose rings have no scheduler on the other end."""
    sup = Supervisor(_config(step_timeout), {"model": {"vocab_size": VOCAB_SIZE, "eos_token_ids": [2]}}, None)
    replica = replica_module.Replica(0, sup.cfg, {}, [2], sup._run_dir)
    replica.num_kv_blocks = 1000
    sup.replicas.append(replica)
    replica.phase = "serving"  # as Supervisor._serve leaves a started one
    sup.state = "ok"
    return sup


def _submit(sup: Supervisor, max_tokens: int = 4):
    body = {"prompt_ids": PROMPT_IDS, "max_tokens": max_tokens}
    return sup.submit(parse_generate_request(body, vocab_size=VOCAB_SIZE))


async def _error_of(live, timeout: float = 10.0) -> ApiError:
    event = await asyncio.wait_for(live.events.get(), timeout)
    assert isinstance(event, ApiError), event
    return event


@pytest.fixture
def small_request_ring(monkeypatch):
    """A request ring with room for a few AddRequests only."""
    monkeypatch.setitem(replica_module._RING_BYTES, "request", 4096)


# --- the request ring ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_submitting_to_a_full_request_ring_does_not_block_the_loop(small_request_ring):
    async def run():
        sup = _supervisor()
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        # Before: the fifth submit blocked in poll(-1) for good, with the loop (and /health) in it.
        lives = [_submit(sup) for _ in range(40)]
        await asyncio.sleep(0.2)
        assert ticks >= 5, "the loop did not run while the request ring was full"
        # The scheduler catches up: every request arrives, once, in submission order.
        scheduler = Receiver(sup.replicas[0].rings["request"].reader(0), m.CODEC)
        got = [await asyncio.wait_for(scheduler.recv_async(), 10) for _ in lives]
        assert [msg.req_id for msg in got] == [live.req_id for live in lives]
        assert all(msg.prompt_ids.tolist() == PROMPT_IDS for msg in got)
        # An abort queued behind them keeps its place too.
        sup.abort(lives[-1].request_id)
        assert isinstance(await asyncio.wait_for(scheduler.recv_async(), 10), m.AbortRequest)
        assert scheduler.try_recv() is None
        ticker.cancel()
        await sup.shutdown()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_a_scheduler_that_reads_no_request_fails_the_replica_after_the_step_timeout(small_request_ring):
    async def run():
        sup = _supervisor(step_timeout=0.5)
        sup._tasks.append(asyncio.create_task(sup._watch_children()))
        lives = [_submit(sup) for _ in range(10)]
        started = time.monotonic()
        errors = [await _error_of(live) for live in lives]
        assert time.monotonic() - started < 5
        assert {(e.status, e.code) for e in errors} == {(503, "backend_failed")}
        assert sup.state == "dead" and sup.failure.is_set()
        assert "the scheduler read no request for 0.5 s" in sup.failure_reason
        await sup.shutdown()

    asyncio.run(run())


# --- the watchdog ----------------------------------------------------------------------------------


def _scheduler_outputs(sup: Supervisor) -> Sender:
    return Sender(sup.replicas[0].rings["output"].writer(), m.CODEC)


def _stats() -> m.SchedulerStats:
    counters = {f: 0 for f in m.SchedulerCounters.__struct_fields__}
    return m.SchedulerStats(stats=m.SchedulerCounters(**counters))


@pytest.mark.timeout(60)
def test_a_replica_with_work_and_no_step_result_is_failed_by_the_watchdog():
    async def run():
        sup = _supervisor(step_timeout=1.0)
        replica = sup.replicas[0]
        sup._tasks += [
            asyncio.create_task(sup._watch_children()),
            asyncio.create_task(sup._pump_outputs(replica)),
        ]
        # Idle for longer than the timeout: nothing is due, nothing fails.
        await asyncio.sleep(1.5)
        assert sup.state == "ok"
        live = _submit(sup, max_tokens=100)
        # A replica that keeps sending (here its stats, as a busy scheduler does between steps)
        # is alive however long the request runs.
        outputs = _scheduler_outputs(sup)
        for _ in range(10):
            outputs.send(_stats())
            silent_at = time.monotonic()
            await asyncio.sleep(0.25)
        assert sup.state == "ok"
        # Then it stays silent, as behind a SIGSTOPped worker.
        event = await _error_of(live)
        assert 1.0 <= time.monotonic() - silent_at < 5
        assert (event.status, event.code) == (503, "backend_failed")
        assert sup.state == "dead"
        assert "no step finished for 1 s with 1 requests in flight" in sup.failure_reason
        await sup.shutdown()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_step_timeout_0_turns_the_watchdog_off():
    async def run():
        sup = _supervisor(step_timeout=0)
        sup._tasks.append(asyncio.create_task(sup._watch_children()))
        _submit(sup)
        await asyncio.sleep(1.0)
        assert sup.state == "ok" and not sup.failure.is_set()
        await sup.shutdown()

    asyncio.run(run())


def test_a_negative_step_timeout_is_refused():
    with pytest.raises(ValueError, match="--step-timeout must be >= 0"):
        _config(-1.0)


# --- the output reader -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_exception_in_the_output_reader_fails_every_request_clearly(caplog):
    async def run():
        sup = _supervisor()
        replica = sup.replicas[0]
        sup._tasks.append(asyncio.create_task(sup._pump_outputs(replica)))
        lives = [_submit(sup) for _ in range(3)]
        # A record no decoder accepts, as a corrupted or foreign writer would leave.
        replica.rings["output"].writer().write(b"\x00garbage, not a message")
        # Before: the reader task died with the exception and these waited for ever.
        errors = [await _error_of(live) for live in lives]
        assert {(e.status, e.code) for e in errors} == {(503, "backend_failed")}
        assert sup.state == "dead" and sup.failure.is_set()
        assert sup.failure_reason.startswith("replica 0: reading its outputs failed: ")
        with pytest.raises(ApiError) as refused:
            _submit(sup)
        assert refused.value.status == 503
        await sup.shutdown()

    with caplog.at_level(logging.ERROR, logger="mi.backend"):
        asyncio.run(run())
    [logged] = [r for r in caplog.records if "reading the scheduler's outputs failed" in r.getMessage()]
    assert logged.exc_info is not None


# --- the ring primitives the loop uses -------------------------------------------------------------


def test_try_write_never_waits_and_takes_a_message_whole_or_not_at_all():
    with Ring.create(1024, num_readers=1) as ring:
        writer, reader = ring.writer(), ring.reader(0)
        assert writer.try_write(b"a" * 400) and writer.try_write(b"b" * 400)
        started = time.monotonic()
        assert writer.try_write(b"c" * 400) is False
        assert time.monotonic() - started < 0.05
        with pytest.raises(ValueError, match="never fits"):
            writer.try_write(b"d" * 2000)
        assert reader.try_read() == b"a" * 400
        # A message split into frames (> capacity / 2) goes out when all of it fits.
        assert writer.try_write([b"e" * 320, b"f" * 320]) is False
        assert reader.try_read() == b"b" * 400
        assert writer.try_write([b"e" * 320, b"f" * 320])
        assert reader.try_read() == b"e" * 320 + b"f" * 320
        assert reader.try_read() is None


@pytest.mark.timeout(60)
def test_write_async_waits_for_room_on_the_loop():
    async def run():
        with Ring.create(1024, num_readers=1) as ring:
            writer, reader = ring.writer(), ring.reader(0)
            writer.write(b"a" * 800)
            pending = asyncio.create_task(writer.write_async(b"b" * 400))
            await asyncio.sleep(0.1)
            assert not pending.done()  # waiting, and the loop runs
            assert reader.try_read() == b"a" * 800
            await asyncio.wait_for(pending, 5)
            assert reader.try_read() == b"b" * 400
            # Cancelled while waiting, it leaves nothing half-written.
            writer.write(b"c" * 800)
            pending = asyncio.create_task(writer.write_async(b"d" * 400))
            await asyncio.sleep(0.05)
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
            assert reader.try_read() == b"c" * 800 and reader.try_read() is None

    asyncio.run(run())
