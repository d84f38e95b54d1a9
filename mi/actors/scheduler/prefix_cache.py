"""Prefix cache index: full KV blocks keyed by a hash chain over their token ids.

The key of a request's block i is ``hash_block(key of block i - 1, its block_size token ids)``
(``b""`` before the first block), so one key stands for the whole prefix up to that block. A key
is only a hint; a hit must also pass two exact checks:

- the entry's stored token ids equal the request's, and
- the chain matches by identity: an entry records the ``serial`` of the entry its KV was computed
  after (``ROOT`` for a first block), and the entry hit for block i must name the entry hit for
  block i - 1 as its parent. Equal tokens are not enough: after a collision of two parents, equal
  tokens behind different prefixes would share KV computed for the other prefix.

Serials are never reused, so an entry whose parent was evicted (or replaced) is unreachable and
merely waits for its own eviction. ``insert`` keeps an existing equal entry (same parent, same
tokens: a twin computed in parallel) and replaces an unequal one under the same key (a stale
chain or a collision); both are always correct, as only reachability changes.

Invariants (``check_invariants``): ``by_hash`` and ``by_block`` hold the same entries, so a block
is hashed at most once and a key names one block; an entry holds ``block_size`` token ids; a
parent serial is smaller than its child's. The block manager owns the index and keeps the rest:
an entry's block is referenced or free, and eviction from the free list drops the entry.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

ROOT = 0  # parent serial of a sequence's first block


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of a full block: a digest of its parent's key and its token ids (int64 bytes)."""
    digest = hashlib.blake2b(parent_hash, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int, num_blocks: int) -> None:
    """Grow ``hashes``, the chain of keys of the leading full blocks of ``token_ids``, to
    ``num_blocks`` keys (tokens are only ever appended, so existing keys stay valid)."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[-1] if hashes else b""
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))


@dataclass(frozen=True, slots=True)
class CachedBlock:
    block_id: int
    block_hash: bytes
    token_ids: tuple[int, ...]
    parent: int  # serial of the entry computed before it, or ROOT
    serial: int  # unique over the index's lifetime, > ROOT


class PrefixIndex:
    def __init__(self) -> None:
        self._by_hash: dict[bytes, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._next_serial = ROOT + 1

    def __len__(self) -> int:
        return len(self._by_block)

    def __iter__(self) -> Iterator[CachedBlock]:
        return iter(self._by_block.values())

    def get(self, block_id: int) -> CachedBlock | None:
        return self._by_block.get(block_id)

    def match(self, hashes: Sequence[bytes], token_ids: Sequence[int], block_size: int) -> list[CachedBlock]:
        """The entries of the longest cached prefix: one per key of ``hashes`` until a miss."""
        hits: list[CachedBlock] = []
        parent = ROOT
        for i, block_hash in enumerate(hashes):
            entry = self._by_hash.get(block_hash)
            if (
                entry is None
                or entry.parent != parent
                or entry.token_ids != tuple(token_ids[i * block_size : (i + 1) * block_size])
            ):
                break
            hits.append(entry)
            parent = entry.serial
        return hits

    def insert(self, block_id: int, block_hash: bytes, token_ids: tuple[int, ...], parent: int) -> int:
        """Index a fully computed block; return the serial its successor names as parent."""
        if block_id in self._by_block:
            raise RuntimeError(f"block {block_id} is already in the prefix index")
        old = self._by_hash.get(block_hash)
        if old is not None:
            if old.parent == parent and old.token_ids == token_ids:
                return old.serial  # a twin is cached already; this block stays private
            del self._by_block[old.block_id]
        entry = CachedBlock(block_id, block_hash, token_ids, parent, self._next_serial)
        self._next_serial += 1
        self._by_hash[block_hash] = self._by_block[block_id] = entry
        return entry.serial

    def evict(self, block_id: int) -> None:
        """Forget ``block_id``'s content (its block is about to be overwritten), if indexed."""
        entry = self._by_block.pop(block_id, None)
        if entry is not None:
            del self._by_hash[entry.block_hash]

    def check_invariants(self, block_size: int) -> list[str]:
        """Descriptions of broken invariants (see the module docstring); empty when sound."""
        problems = []
        if len(self._by_hash) != len(self._by_block):
            problems.append(f"{len(self._by_hash)} keys but {len(self._by_block)} hashed blocks")
        for block_id, entry in self._by_block.items():
            if entry.block_id != block_id or self._by_hash.get(entry.block_hash) is not entry:
                problems.append(f"block {block_id}: index maps disagree")
            if len(entry.token_ids) != block_size:
                problems.append(f"block {block_id}: {len(entry.token_ids)} cached tokens")
            if not ROOT <= entry.parent < entry.serial < self._next_serial:
                problems.append(f"block {block_id}: serial {entry.serial}, parent {entry.parent}")
        return problems
