"""KV-cache block allocator: ref-counted blocks and a free list in eviction order.

The KV cache is ``num_blocks`` pages ("blocks") of ``block_size`` token slots each. A request's
block table is the list of block ids that holds its tokens in order; the scheduler owns the
tables, this module owns the ref counts, the free list and the prefix index of cached blocks.

Invariants (checked by ``check_invariants``):

- every block is either free (ref count 0, in the free list) or used (ref count > 0), never both;
- the free list holds no duplicates, and ``num_free + num_used == num_blocks``;
- when the live block tables are given, each block's ref count equals the number of times it
  appears in them (a block may appear in several tables once blocks are shared);
- every block in the prefix index (``prefix_cache.PrefixIndex``) is referenced or free; the
  index itself is consistent (see its module).

Free list order is eviction order: ``allocate`` takes from the head, ``free`` appends at the
tail, so the block that has been free longest is reused first (LRU). ``free`` releases a table
back to front, so the tail of a sequence is reused before its head.

Prefix caching hooks in at three places. A fully computed block is indexed (``cache_block``) and
keeps its entry when freed: it stays in the free list, unreferenced but revivable. ``share`` takes
another reference to a cached block; one with no reference left leaves the middle of the free
list (an ``OrderedDict``: O(1) removal anywhere, no duplicates by construction). ``_take_free``,
the only place a free block is handed out for new content, evicts its entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from mi.actors.scheduler.prefix_cache import CachedBlock, PrefixIndex


class InvariantError(AssertionError):
    """A block manager or scheduler invariant is broken (a bug, never a user error)."""


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def peak_blocks(num_tokens: int, block_size: int, window: int | None, max_num_batched_tokens: int) -> int:
    """The most blocks a request of ``num_tokens`` computed tokens holds at once. With a sliding
    window it holds, during a step, the keys its queries can see and that step's chunk: tokens
    [s - window + 1, s + chunk), at most ``window - 1 + max_num_batched_tokens`` of them, which
    may straddle one more block boundary than they fill."""
    whole = num_blocks_for(num_tokens, block_size)
    if window is None:
        return whole
    return min(whole, num_blocks_for(window - 1 + max_num_batched_tokens, block_size) + 1)


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
        self._index = PrefixIndex()

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

    @property
    def num_cached(self) -> int:
        """Blocks whose content is indexed for prefix reuse (referenced or not)."""
        return len(self._index)

    def cached_block(self, block_id: int) -> CachedBlock | None:
        return self._index.get(block_id)

    def can_allocate(self, num_blocks: int, sharing: Sequence[int] = ()) -> bool:
        """Whether ``num_blocks`` new blocks fit after ``share(sharing)``, which revives any of
        those blocks that are free."""
        num_revived = sum(1 for b in sharing if self._ref_counts[b] == 0)
        return num_blocks + num_revived <= len(self._free)

    def match_prefix(self, block_hashes: Sequence[bytes], token_ids: Sequence[int]) -> list[CachedBlock]:
        """Cached blocks holding the longest prefix of ``token_ids`` among the keyed blocks."""
        return self._index.match(block_hashes, token_ids, self.block_size)

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

    def share(self, block_ids: Sequence[int]) -> None:
        """Take one more reference to each (cached) block, reviving the free ones in place."""
        for block_id in block_ids:
            if self._index.get(block_id) is None:
                raise InvariantError(f"sharing block {block_id}, which holds no cached prefix")
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def cache_block(self, block_id: int, block_hash: bytes, token_ids: tuple[int, ...], parent: int) -> int:
        """Index a referenced, fully computed block under ``block_hash``; returns the serial its
        successor's ``parent`` is (see ``PrefixIndex.insert``)."""
        if self._ref_counts[block_id] <= 0:
            raise InvariantError(f"caching block {block_id}, which nobody references")
        if len(token_ids) != self.block_size:
            raise ValueError(f"a cached block holds {self.block_size} tokens, got {len(token_ids)}")
        return self._index.insert(block_id, block_hash, token_ids, parent)

    def _take_free(self) -> int:
        # NOTE: the single exit from the free list for new content: the old content is evicted.
        block_id, _ = self._free.popitem(last=False)
        self._index.evict(block_id)
        return block_id

    # -- self-check ------------------------------------------------------------------------------

    def check_invariants(self, block_tables: Iterable[Sequence[int]] | None = None) -> None:
        """Raise ``InvariantError`` if the state is inconsistent.

        ``block_tables``: every live block table; when given, ref counts must equal the number of
        references in them.
        """
        if len(self._free) + sum(1 for c in self._ref_counts if c > 0) != self.num_blocks:
            raise InvariantError(f"free ({len(self._free)}) + used != num_blocks ({self.num_blocks})")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise InvariantError(f"block {block_id} has ref count {count}")
            if count > 0 and block_id in self._free:
                raise InvariantError(f"block {block_id} is free and referenced ({count})")
        for block_id in self._free:
            if not 0 <= block_id < self.num_blocks:
                raise InvariantError(f"free list holds unknown block {block_id}")
        for problem in self._index.check_invariants(self.block_size):
            raise InvariantError(f"prefix index: {problem}")
        for entry in self._index:
            if not 0 <= entry.block_id < self.num_blocks:
                raise InvariantError(f"prefix index holds unknown block {entry.block_id}")
            if self._ref_counts[entry.block_id] == 0 and entry.block_id not in self._free:
                raise InvariantError(f"cached block {entry.block_id} is neither used nor free")
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
                    f"block {block_id} has ref count {count} but {expected} table references"
                )
