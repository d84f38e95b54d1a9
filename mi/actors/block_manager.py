"""KV-cache block allocator: ref-counted blocks and a free list in eviction order.

The KV cache is ``num_blocks`` pages ("blocks") of ``block_size`` token slots each. A request's
block table is the list of block ids that holds its tokens in order; the scheduler owns the
tables, this module owns only the ref counts and the free list.

Invariants (checked by ``check_invariants``):

- every block is either free (ref count 0, in the free list) or used (ref count > 0), never both;
- the free list holds no duplicates, and ``num_free + num_used == num_blocks``;
- when the live block tables are given, each block's ref count equals the number of times it
  appears in them (a block may appear in several tables once blocks are shared).

Free list order is eviction order: ``allocate`` takes from the head, ``free`` appends at the
tail, so the block that has been free longest is reused first (LRU). ``free`` releases a table
back to front, so the tail of a sequence is reused before its head.

Prefix caching (a later change) plugs into exactly two places without reshaping this class: a
block freed with a content hash stays in the free list and in a hash index, ``_take_free``
(the only place a free block leaves the list) drops its hash when it is evicted, and a prefix
hit revives a cached free block by removing it from the middle of the list — which is why the
free list is an ``OrderedDict`` (O(1) removal anywhere, no duplicates by construction) rather
than a plain deque.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class InvariantError(AssertionError):
    """A block manager or scheduler invariant is broken (a bug, never a user error)."""


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        # block_id -> None, in eviction order (head = next to reuse).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    # -- queries ---------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    # -- mutations -------------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head of the free list, each with ref count 1."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            raise RuntimeError(f"out of KV blocks: asked {num_blocks}, {len(self._free)} free")
        block_ids = [self._take_free() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; a block reaching 0 goes to the free list tail.

        Released back to front so that a sequence's last block is evicted before its first.
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count <= 0:
                raise InvariantError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    def _take_free(self) -> int:
        # NOTE: the single exit from the free list; eviction of cached content hooks in here.
        block_id, _ = self._free.popitem(last=False)
        return block_id

    # -- self-check ------------------------------------------------------------------------------

    def check_invariants(self, block_tables: Iterable[Sequence[int]] | None = None) -> None:
        """Raise ``InvariantError`` if the state is inconsistent.

        ``block_tables``: every live block table; when given, ref counts must equal the number of
        references in them.
        """
        if len(self._free) + sum(1 for c in self._ref_counts if c > 0) != self.num_blocks:
            raise InvariantError(
                f"free ({len(self._free)}) + used != num_blocks ({self.num_blocks})")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise InvariantError(f"block {block_id} has ref count {count}")
            if count > 0 and block_id in self._free:
                raise InvariantError(f"block {block_id} is free and referenced ({count})")
        for block_id in self._free:
            if not 0 <= block_id < self.num_blocks:
                raise InvariantError(f"free list holds unknown block {block_id}")
        if block_tables is None:
            return
        refs = [0] * self.num_blocks
        for table in block_tables:
            for block_id in table:
                if not 0 <= block_id < self.num_blocks:
                    raise InvariantError(f"block table holds unknown block {block_id}")
                refs[block_id] += 1
        for block_id, (count, expected) in enumerate(zip(self._ref_counts, refs)):
            if count != expected:
                raise InvariantError(
                    f"block {block_id} has ref count {count} but {expected} table references")
