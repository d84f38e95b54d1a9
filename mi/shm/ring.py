"""Single-writer, N-reader broadcast ring of variable-length messages in shared memory.

Every reader sees every message, in order. The memory is an anonymous memfd segment (sealed
against shrink/grow, so no peer can truncate it under another and cause SIGBUS), mapped by each
process; nothing is ever named in /dev/shm, so a crash cannot leak it. Wake-ups use eventfds:
one per reader ("data available"), one for the writer ("space available"). Children receive the
fds through ``subprocess.Popen(pass_fds=ring.fds())`` and ``Ring.attach(ring.describe())``.

Segment layout (integers little-endian; each position on its own 64-byte cache line):

    offset          size  field
    0               8     magic b"MIRING\\x00\\x01"
    8               4     version
    12              4     num_readers
    16              8     capacity (bytes of data area, multiple of 64)
    64              8     write_pos                      stored only by the writer
    128 + 64*i      8     read_pos[i]                    stored only by reader i
    data_off        cap   data area, circular; data_off = 128 + 64*num_readers

Frame (starts at a multiple of 8, so its header never straddles the end of the data area):

    u32 payload_len | u32 flags (0x5A000000 marker | FIRST=1 | LAST=2) | payload | pad to 8

A message is one frame (FIRST|LAST), or, past ``max_frame_len`` (capacity/2), a run of frames
FIRST, ..., LAST that the reader re-assembles. A FIRST frame drops any unfinished run (a writer
timed out mid-message).

Invariants:
- positions are monotonic u64 byte counters; data offset = pos % capacity.
- 0 <= write_pos - read_pos[i] <= capacity for every reader; the writer never overwrites bytes
  a reader has not released. Free space = capacity - (write_pos - min(read_pos)).
- every length/offset read from the segment is checked; a bad one raises RingCorrupt.
- wake-ups cannot be lost: the writer signals every reader's eventfd after each frame, and a
  reader clears its eventfd and re-checks the ring before it sleeps (counter semantics). The
  same holds for readers signalling the writer's eventfd after each consumed frame.

Memory ordering relies on x86-64 TSO: stores become visible in program order and a load is not
reordered with a later store. CPython issues each memoryview store as a separate C call, in
program order.
"""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
import select
import struct
import time
from collections.abc import Sequence

MAGIC = b"MIRING\x00\x01"
VERSION = 1

_LINE = 64
_WRITE_POS_OFF = 64
_READ_POS_OFF = 128
_HEADER = struct.Struct("<8sII Q")  # magic, version, num_readers, capacity
_FRAME = struct.Struct("<II")  # payload_len, flags
_FRAME_LEN = _FRAME.size

_FIRST = 1
_LAST = 2
_MARKER = 0x5A000000
_FLAG_MASK = _FIRST | _LAST

_SPIN_S = 100e-6  # busy-check this long before sleeping on the eventfd
_MIN_CAPACITY = 256
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class RingError(Exception):
    """Base class of ring errors."""


class RingTimeout(RingError, TimeoutError):
    """A blocking read or write ran past its timeout."""


class RingCorrupt(RingError, ValueError):
    """A length, offset, position or flag read from the segment is out of bounds."""


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _drain(efd: int) -> None:
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass


def _byte_view(buf) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")  # TypeError for non-contiguous buffers
    return mv


def _views(payload) -> tuple[list, int]:
    """The pieces of a message (bytes or byte views) and their total length."""
    views = list(payload) if isinstance(payload, (list, tuple)) else [payload]
    total = 0
    for i, v in enumerate(views):
        if type(v) is not bytes:
            views[i] = v = _byte_view(v)
        total += len(v)
    return views, total


def _poll_ms(deadline: float | None) -> int:
    """Milliseconds until deadline for poll(): -1 forever, at least 1 to avoid a spin."""
    if deadline is None:
        return -1
    return max(1, int((deadline - time.monotonic()) * 1000.0 + 0.999))


class Ring:
    """Owns the mapping and the fds of one ring; hands out its writer and readers."""

    def __init__(self, mem_fd: int, data_fds: list[int], space_fd: int, capacity: int, num_readers: int):
        self.capacity = capacity
        self.num_readers = num_readers
        self.max_frame_len = (capacity // 2) - _FRAME_LEN
        self._mem_fd = mem_fd
        self._data_fds = data_fds
        self._space_fd = space_fd
        self._data_off = _READ_POS_OFF + _LINE * num_readers
        self._mmap = mmap.mmap(mem_fd, self._data_off + capacity)
        self._whole = memoryview(self._mmap)
        self._words = self._whole[: self._data_off].cast("Q")  # header as u64 words
        self._data = self._whole[self._data_off :]
        self._is_closed = False

    @classmethod
    def create(cls, capacity_bytes: int, num_readers: int) -> Ring:
        """A fresh ring; capacity is rounded up to a multiple of 64 bytes."""
        if not isinstance(capacity_bytes, int) or capacity_bytes < _MIN_CAPACITY:
            raise ValueError(f"capacity_bytes must be an int >= {_MIN_CAPACITY}")
        if not isinstance(num_readers, int) or not 1 <= num_readers <= 1024:
            raise ValueError("num_readers must be an int in 1..1024")
        capacity = (capacity_bytes + _LINE - 1) // _LINE * _LINE
        size = _READ_POS_OFF + _LINE * num_readers + capacity
        fds: list[int] = []
        try:
            fds.append(os.memfd_create("mi-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
            os.ftruncate(fds[0], size)
            fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, _SEALS)
            for _ in range(num_readers + 1):
                fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            ring = cls(fds[0], fds[1:-1], fds[-1], capacity, num_readers)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        _HEADER.pack_into(ring._whole, 0, MAGIC, VERSION, num_readers, capacity)
        return ring

    def describe(self) -> dict:
        """JSON-able description for attach() in a process that inherited fds()."""
        return {
            "version": VERSION,
            "mem_fd": self._mem_fd,
            "data_fds": list(self._data_fds),
            "space_fd": self._space_fd,
            "capacity": self.capacity,
            "num_readers": self.num_readers,
        }

    def fds(self) -> list[int]:
        """The fds a child needs, for Popen(pass_fds=...)."""
        return [self._mem_fd, *self._data_fds, self._space_fd]

    @classmethod
    def attach(cls, desc: dict) -> Ring:
        """Map a ring described by describe(); the fds must be open in this process (inherited
        through pass_fds) and belong to the returned Ring from then on: close() closes them."""
        try:
            version, mem_fd, data_fds = desc["version"], desc["mem_fd"], desc["data_fds"]
            space_fd, capacity = desc["space_fd"], desc["capacity"]
            num_readers = desc["num_readers"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad ring description: {desc!r}") from e
        ints = [mem_fd, space_fd, capacity, num_readers]
        if (
            version != VERSION
            or not isinstance(data_fds, list)
            or not all(type(x) is int and x >= 0 for x in ints + data_fds)
            or len(data_fds) != num_readers
            or capacity < _MIN_CAPACITY
            or capacity % _LINE
        ):
            raise ValueError(f"bad ring description: {desc!r}")
        size = _READ_POS_OFF + _LINE * num_readers + capacity
        if os.fstat(mem_fd).st_size != size:
            raise RingCorrupt("ring segment size does not match its description")
        if fcntl.fcntl(mem_fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise RingCorrupt("ring segment is not sealed against resizing")
        ring = cls(mem_fd, list(data_fds), space_fd, capacity, num_readers)
        magic, ver, n, cap = _HEADER.unpack_from(ring._whole, 0)
        if (magic, ver, n, cap) != (MAGIC, VERSION, num_readers, capacity):
            ring.close()
            raise RingCorrupt("ring header does not match its description")
        return ring

    def writer(self) -> RingWriter:
        """The writer endpoint; at most one may be used at a time across all processes."""
        return RingWriter(self)

    def reader(self, index: int) -> RingReader:
        """Reader endpoint `index`; each index is used by exactly one consumer."""
        if not 0 <= index < self.num_readers:
            raise ValueError(f"reader index {index} not in 0..{self.num_readers - 1}")
        return RingReader(self, index)

    def close(self) -> None:
        """Unmap and close this process's fds. Endpoints must not be used afterwards."""
        if self._is_closed:
            return
        self._is_closed = True
        for mv in (self._words, self._data, self._whole):
            mv.release()
        self._mmap.close()
        for fd in self.fds():
            os.close(fd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RingWriter:
    """Appends frames; blocks (spin, then eventfd) while the slowest reader holds the space."""

    def __init__(self, ring: Ring):
        self._ring = ring
        self._cap = ring.capacity
        self._max_frame_len = ring.max_frame_len
        self._data = ring._data
        self._words = ring._words
        self._write_idx = _WRITE_POS_OFF // 8
        self._read_idxs = [(_READ_POS_OFF + _LINE * i) // 8 for i in range(ring.num_readers)]
        self._data_fds = ring._data_fds
        self._space_fd = ring._space_fd
        self._poll = select.poll()
        self._poll.register(ring._space_fd, select.POLLIN)
        self._pos = self._words[self._write_idx]
        self._min_read = self._scan_min_read()

    def write(self, payload, timeout: float | None = None) -> None:
        """Publish one message: a bytes-like object (C-contiguous), or a list/tuple of them
        sent back to back as one message.

        Raises RingTimeout if readers do not free enough space in time; a message split into
        several frames is then dropped (readers discard the unfinished run).
        """
        views, total = _views(payload)
        self._write_views(views, total, None if timeout is None else time.monotonic() + timeout)

    def try_write(self, payload) -> bool:
        """Publish one message (as write) if the ring has room for all of it now, else False.
        Never blocks; ValueError for a message that could never fit the ring at once."""
        views, total = _views(payload)
        need = self._bytes_needed(total)
        if need > self._cap:
            raise ValueError(f"a {total}-byte message never fits a {self._cap}-byte ring at once")
        if self._cap - (self._pos - self._min_read) < need and not self._has_space(need):
            return False
        self._write_views(views, total, None)  # readers only free space: no frame waits
        return True

    async def write_async(self, payload) -> None:
        """Publish one message, waiting for room with the running loop's add_reader (the loop
        never blocks). Cancelled while waiting, it has written nothing."""
        if self.try_write(payload):
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def on_space() -> None:
            if fut.done():
                return
            _drain(self._space_fd)
            try:
                if self.try_write(payload):
                    fut.set_result(None)
            except (RingError, ValueError) as e:
                fut.set_exception(e)

        # A reader that freed space after the try_write above left the eventfd counter
        # non-zero, so the fd is readable and on_space runs.
        loop.add_reader(self._space_fd, on_space)
        try:
            await fut
        finally:
            loop.remove_reader(self._space_fd)

    def _bytes_needed(self, total: int) -> int:
        """Ring bytes of a `total`-byte message: its frames, headers and padding."""
        max_len = self._max_frame_len
        num_full, last = divmod(total, max_len)
        if last == 0 and num_full:
            num_full, last = num_full - 1, max_len
        return num_full * (_FRAME_LEN + _pad8(max_len)) + _FRAME_LEN + _pad8(last)

    def _write_views(self, views: list, total: int, deadline: float | None) -> None:
        if total <= self._max_frame_len:
            self._write_frame(views, total, _FIRST | _LAST, deadline)
            return
        for pieces, frame_len, flags in self._split(views, total):
            self._write_frame(pieces, frame_len, flags, deadline)

    def _split(self, views: list, total: int):
        max_len = self._max_frame_len
        pieces, frame_len, flags, left = [], 0, _FIRST, total
        for v in views:
            v = memoryview(v) if type(v) is bytes else v
            start = 0
            while start < len(v):
                take = min(len(v) - start, max_len - frame_len)
                pieces.append(v[start : start + take])
                start += take
                frame_len += take
                left -= take
                if frame_len == max_len and left:
                    yield pieces, frame_len, flags
                    pieces, frame_len, flags = [], 0, 0
        yield pieces, frame_len, flags | _LAST

    def _write_frame(self, pieces: Sequence, frame_len: int, flags: int, deadline: float | None) -> None:
        need = _FRAME_LEN + _pad8(frame_len)
        if self._cap - (self._pos - self._min_read) < need:
            self._wait_space(need, deadline)
        cap, data = self._cap, self._data
        off = self._pos % cap
        p = off + _FRAME_LEN
        if p == cap:
            p = 0
        for piece in pieces:
            n = len(piece)
            end = p + n
            if end < cap:
                data[p:end] = piece
                p = end
            else:
                k = cap - p
                data[p:cap] = piece[:k]
                data[0 : n - k] = piece[k:]
                p = n - k
        _FRAME.pack_into(data, off, frame_len, _MARKER | flags)
        # NOTE: payload and frame header are stored before write_pos is advanced (x86 TSO keeps
        # the order), so a reader that sees the new write_pos sees the whole frame.
        self._pos += need
        self._words[self._write_idx] = self._pos
        for efd in self._data_fds:
            os.eventfd_write(efd, 1)

    def _scan_min_read(self) -> int:
        words, pos, cap = self._words, self._pos, self._cap
        low = pos
        for idx in self._read_idxs:
            rp = words[idx]
            if rp > pos or pos - rp > cap:
                raise RingCorrupt(f"read position {rp} incompatible with write position {pos}")
            if rp < low:
                low = rp
        return low

    def _has_space(self, need: int) -> bool:
        self._min_read = self._scan_min_read()
        return self._cap - (self._pos - self._min_read) >= need

    def _wait_space(self, need: int, deadline: float | None) -> None:
        spin_end = time.perf_counter() + _SPIN_S
        while time.perf_counter() < spin_end:
            if self._has_space(need):
                return
        while True:
            _drain(self._space_fd)
            # NOTE: re-check after clearing the eventfd; a reader's later signal wakes the poll.
            if self._has_space(need):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeout("ring full: readers did not free space in time")
            self._poll.poll(_poll_ms(deadline))


class RingReader:
    """Consumes frames for one reader index and re-assembles split messages."""

    def __init__(self, ring: Ring, index: int):
        self._ring = ring
        self._cap = ring.capacity
        self._max_frame_len = ring.max_frame_len
        self._data = ring._data
        self._words = ring._words
        self._write_idx = _WRITE_POS_OFF // 8
        self._read_idx = (_READ_POS_OFF + _LINE * index) // 8
        self._data_fd = ring._data_fds[index]
        self._space_fd = ring._space_fd
        self._poll = select.poll()
        self._poll.register(self._data_fd, select.POLLIN)
        self._pos = self._words[self._read_idx]
        self._parts: list[bytes] | None = None  # frames of an unfinished split message

    def fileno(self) -> int:
        """The data eventfd: readable when a frame may have arrived (for loop.add_reader)."""
        return self._data_fd

    def try_read(self) -> bytes | None:
        """The next whole message, or None if none is complete yet. Never blocks."""
        while True:
            frame = self._next_frame()
            if frame is None:
                return None
            payload, flags = frame
            if flags & _FIRST:
                if flags & _LAST:
                    self._parts = None
                    return payload
                self._parts = [payload]
            elif self._parts is None:
                raise RingCorrupt("continuation frame without a first frame")
            else:
                self._parts.append(payload)
                if flags & _LAST:
                    parts, self._parts = self._parts, None
                    return b"".join(parts)

    def _next_frame(self) -> tuple[bytes, int] | None:
        pos = self._pos
        avail = self._words[self._write_idx] - pos
        if avail == 0:
            return None
        cap = self._cap
        if avail < _FRAME_LEN or avail > cap or avail & 7:
            raise RingCorrupt(f"write position is {avail} bytes past read position {pos}")
        off = pos % cap
        data = self._data
        frame_len, flags = _FRAME.unpack_from(data, off)
        need = _FRAME_LEN + _pad8(frame_len)
        if flags & ~_FLAG_MASK != _MARKER or frame_len > self._max_frame_len or need > avail:
            raise RingCorrupt(f"bad frame header at {pos}: len={frame_len} flags={flags:#x}")
        p = off + _FRAME_LEN
        if p == cap:
            p = 0
        end = p + frame_len
        if end <= cap:
            payload = bytes(data[p:end])
        else:
            payload = b"".join((data[p:cap], data[0 : end - cap]))
        # NOTE: the payload is copied out before read_pos releases its space to the writer.
        self._pos = pos + need
        self._words[self._read_idx] = self._pos
        os.eventfd_write(self._space_fd, 1)
        return payload, flags

    def read(self, timeout: float | None = None) -> bytes:
        """The next message; spins ~100 µs, then sleeps on the eventfd. RingTimeout on timeout."""
        msg = self.try_read()
        if msg is not None:
            return msg
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_end = time.perf_counter() + min(_SPIN_S, timeout if timeout is not None else _SPIN_S)
        while time.perf_counter() < spin_end:
            msg = self.try_read()
            if msg is not None:
                return msg
        while True:
            _drain(self._data_fd)
            # NOTE: re-check after clearing the eventfd; the writer's later signal wakes the poll.
            msg = self.try_read()
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeout("no message before the timeout")
            self._poll.poll(_poll_ms(deadline))

    async def read_async(self) -> bytes:
        """The next message, waiting with the running loop's add_reader (no busy loop)."""
        msg = self.try_read()
        if msg is not None:
            return msg
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def on_readable() -> None:
            if fut.done():  # cancelled: leave the message in the ring
                return
            _drain(self._data_fd)
            try:
                got = self.try_read()
            except RingError as e:
                fut.set_exception(e)
                return
            if got is not None:
                fut.set_result(got)

        # A frame published after the try_read above left the eventfd counter non-zero, so
        # the fd is readable and on_readable runs.
        loop.add_reader(self._data_fd, on_readable)
        try:
            return await fut
        finally:
            loop.remove_reader(self._data_fd)
