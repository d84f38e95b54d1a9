"""Sum all-reduce and all-gather among the ranks of one host, through one shared segment.

For CPU tensor parallelism this replaces gloo's TCP-over-loopback collectives: every rank copies
its array into its own slot, publishes a generation number, waits until every rank has published
the same generation, and reads all slots.

Layout (one anonymous memfd, sealed against resizing):

    [gen rank 0][gen rank 1]...      u64 each, one 64-byte line per rank
    buffer 0: [slot rank 0][slot rank 1]...    slot_bytes each
    buffer 1: [slot rank 0][slot rank 1]...

Collective number g uses buffer g % 2. Double buffering is enough: a rank can only start
collective g + 2 (overwriting buffer g % 2) after every rank published g + 1, which each does only
after it finished reading g. Every rank sums the slots in rank order, so all ranks get bitwise
identical results (tensor-parallel ranks must never drift apart).

Publishing relies on x86 store order (data before the generation word), like the rings.
"""

import fcntl
import mmap
import os

import numpy as np

_LINE = 64
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_SPINS_BEFORE_YIELD = 2000


class ShmCollectives:
    def __init__(self, mem_fd: int, num_ranks: int, slot_bytes: int, rank: int | None = None):
        self.num_ranks = num_ranks
        self.slot_bytes = slot_bytes
        self.rank = rank
        self._mem_fd = mem_fd
        header = _LINE * num_ranks
        self._mmap = mmap.mmap(mem_fd, header + 2 * num_ranks * slot_bytes)
        self._gens = np.frombuffer(self._mmap, dtype=np.uint64, count=num_ranks * _LINE // 8)[:: _LINE // 8]
        self._buffers = np.frombuffer(self._mmap, dtype=np.uint8, offset=header).reshape(
            2, num_ranks, slot_bytes
        )
        self._gen = 0

    @classmethod
    def create(cls, num_ranks: int, slot_bytes: int) -> "ShmCollectives":
        if num_ranks < 1 or slot_bytes < 1:
            raise ValueError("num_ranks and slot_bytes must be >= 1")
        slot_bytes = -(-slot_bytes // _LINE) * _LINE
        fd = os.memfd_create("mi-collectives", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, _LINE * num_ranks + 2 * num_ranks * slot_bytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd, num_ranks, slot_bytes)
        except BaseException:
            os.close(fd)
            raise

    def describe(self) -> dict:
        return {"mem_fd": self._mem_fd, "num_ranks": self.num_ranks, "slot_bytes": self.slot_bytes}

    def fds(self) -> list[int]:
        return [self._mem_fd]

    @classmethod
    def attach(cls, desc: dict, rank: int) -> "ShmCollectives":
        """Map the segment of describe() (its fd inherited through pass_fds) as `rank`."""
        try:
            mem_fd, num_ranks, slot_bytes = desc["mem_fd"], desc["num_ranks"], desc["slot_bytes"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad collectives description: {desc!r}") from exc
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} not in 0..{num_ranks - 1}")
        if os.fstat(mem_fd).st_size != _LINE * num_ranks + 2 * num_ranks * slot_bytes:
            raise ValueError("collectives segment size does not match its description")
        return cls(mem_fd, num_ranks, slot_bytes, rank)

    def fits(self, array: np.ndarray) -> bool:
        return array.nbytes <= self.slot_bytes

    def _exchange(self, array: np.ndarray) -> np.ndarray:
        """Publishes `array`, waits for every rank, returns the [num_ranks, n] slots."""
        self._gen += 1
        buffer = self._buffers[self._gen % 2]
        flat = array.reshape(-1)
        mine = buffer[self.rank, : array.nbytes].view(array.dtype)
        mine[:] = flat
        self._gens[self.rank] = self._gen  # NOTE: after the data (x86 keeps store order)
        spins = 0
        while (self._gens < self._gen).any():
            spins += 1
            if spins > _SPINS_BEFORE_YIELD:
                os.sched_yield()
        return buffer[:, : array.nbytes].view(array.dtype)

    def all_reduce(self, array: np.ndarray) -> None:
        """In-place sum over ranks of a C-contiguous array."""
        slots = self._exchange(array)
        np.sum(slots, axis=0, out=array.reshape(-1))

    def all_gather(self, array: np.ndarray) -> np.ndarray:
        """[..., n] on each rank -> [..., n * num_ranks] in rank order (a new array)."""
        slots = self._exchange(array).reshape(self.num_ranks, *array.shape)
        return np.concatenate(list(slots), axis=-1)

    def close(self) -> None:
        del self._gens, self._buffers
        self._mmap.close()
        os.close(self._mem_fd)
