"""Unit tests for the ref-counted KV block allocator."""

import pytest

from mi.actors.scheduler.block_manager import BlockManager, InvariantError, num_blocks_for
from mi.actors.scheduler.prefix_cache import ROOT, extend_hashes


def test_num_blocks_for_rounds_up():
    assert [num_blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free_round_trip():
    bm = BlockManager(num_blocks=8, block_size=16)
    assert bm.num_free == 8 and bm.usage == 0.0
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a + b)) == 8
    assert bm.num_free == 0 and bm.num_used == 8 and bm.usage == 1.0
    assert not bm.can_allocate(1) and bm.can_allocate(0)
    assert all(bm.ref_count(x) == 1 for x in a + b)
    bm.check_invariants([a, b])
    bm.free(a)
    assert bm.num_free == 3 and bm.usage == pytest.approx(5 / 8)
    bm.check_invariants([b])
    bm.free(b)
    assert bm.num_free == 8
    bm.check_invariants([])


def test_allocate_zero_and_too_many():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.allocate(0) == []
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(3)
    with pytest.raises(ValueError):
        bm.allocate(-1)
    assert bm.num_free == 2


def test_free_list_is_lru_and_releases_tables_back_to_front():
    bm = BlockManager(num_blocks=6, block_size=4)
    first = bm.allocate(3)  # [0, 1, 2]
    second = bm.allocate(3)  # [3, 4, 5]
    bm.free(second)  # tail first: 5, 4, 3 join the free list in that order
    bm.free(first)  # then 2, 1, 0
    assert bm.allocate(6) == [5, 4, 3, 2, 1, 0]


def test_double_free_is_an_invariant_error():
    bm = BlockManager(num_blocks=2, block_size=4)
    ids = bm.allocate(1)
    bm.free(ids)
    with pytest.raises(InvariantError, match="double free"):
        bm.free(ids)


def test_check_invariants_catches_table_mismatch():
    bm = BlockManager(num_blocks=4, block_size=4)
    ids = bm.allocate(2)
    with pytest.raises(InvariantError, match="ref count 1 but 0 table references"):
        bm.check_invariants([ids[:1]])
    with pytest.raises(InvariantError, match="ref count 1 but 2 table references"):
        bm.check_invariants([ids, ids[:1]])
    with pytest.raises(InvariantError, match="unknown block"):
        bm.check_invariants([ids + [99]])
    bm.check_invariants([ids])


def test_check_invariants_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=4)
    ids = bm.allocate(2)
    bm._ref_counts[ids[0]] = 0  # leaked: neither free nor referenced
    with pytest.raises(InvariantError, match="free .* used"):
        bm.check_invariants()
    bm = BlockManager(num_blocks=4, block_size=4)
    bm._ref_counts[0] = 1  # referenced while still in the free list
    with pytest.raises(InvariantError):
        bm.check_invariants()


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)


def cache_chain(bm: BlockManager, block_ids: list[int], token_ids: list[int]) -> list[bytes]:
    """Index ``block_ids`` as the full blocks of ``token_ids``; return their keys."""
    keys: list[bytes] = []
    extend_hashes(keys, token_ids, bm.block_size, len(block_ids))
    parent = ROOT
    for i, (block_id, key) in enumerate(zip(block_ids, keys)):
        tokens = tuple(token_ids[i * bm.block_size : (i + 1) * bm.block_size])
        parent = bm.cache_block(block_id, key, tokens, parent)
    return keys


def test_cached_blocks_stay_free_and_revive_in_place():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(2)
    keys = cache_chain(bm, a, [1, 2, 3, 4])
    bm.free(a)
    assert bm.num_free == 4 and bm.num_used == 0 and bm.num_cached == 2
    assert [e.block_id for e in bm.match_prefix(keys, [1, 2, 3, 4])] == a
    assert [e.block_id for e in bm.match_prefix(keys, [1, 2, 3, 5])] == a[:1]
    assert bm.can_allocate(2, sharing=a) and not bm.can_allocate(3, sharing=a)
    bm.share(a)
    assert [bm.ref_count(b) for b in a] == [1, 1] and bm.num_free == 2
    rest = bm.allocate(2)
    assert not set(rest) & set(a)
    bm.share(a[:1])  # a second table shares the first block
    assert bm.ref_count(a[0]) == 2
    bm.check_invariants([a, a[:1] + rest])


def test_eviction_drops_the_key_in_lru_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = bm.allocate(2), bm.allocate(2)
    keys_a, keys_b = cache_chain(bm, a, [1, 2, 3, 4]), cache_chain(bm, b, [5, 6, 7, 8])
    bm.free(a)  # free list: a1 a0 b1 b0
    bm.free(b)
    assert bm.allocate(1) == [a[1]]
    assert bm.num_cached == 3 and bm.cached_block(a[1]) is None
    assert [e.block_id for e in bm.match_prefix(keys_a, [1, 2, 3, 4])] == a[:1]
    assert len(bm.match_prefix(keys_b, [5, 6, 7, 8])) == 2
    bm.check_invariants()


def test_prefix_misuse_is_caught():
    bm = BlockManager(num_blocks=4, block_size=2)
    with pytest.raises(InvariantError, match="holds no cached prefix"):
        bm.share([0])
    with pytest.raises(InvariantError, match="nobody references"):
        bm.cache_block(0, b"key", (1, 2), ROOT)
    (block_id,) = bm.allocate(1)
    with pytest.raises(ValueError, match="holds 2 tokens"):
        bm.cache_block(block_id, b"key", (1, 2, 3), ROOT)
    cache_chain(bm, [block_id], [1, 2])
    with pytest.raises(RuntimeError, match="already in the prefix index"):
        bm.cache_block(block_id, b"other key", (1, 2), ROOT)
    bm._index._by_hash.clear()  # corrupt: a block without its key
    with pytest.raises(InvariantError, match="prefix index"):
        bm.check_invariants()


def test_an_equal_entry_is_kept_and_an_unequal_one_replaced():
    bm = BlockManager(num_blocks=4, block_size=2)
    first, twin, other = bm.allocate(3)
    serial = bm.cache_block(first, b"key", (1, 2), ROOT)
    assert bm.cache_block(twin, b"key", (1, 2), ROOT) == serial  # twin stays private
    assert bm.cached_block(twin) is None
    assert bm.cache_block(other, b"key", (7, 7), ROOT) != serial  # a collision replaces
    assert bm.cached_block(first) is None and bm.cached_block(other).token_ids == (7, 7)
    bm.check_invariants()
