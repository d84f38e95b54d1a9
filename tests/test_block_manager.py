"""Unit tests for the ref-counted KV block allocator."""
import pytest

from mi.actors.block_manager import BlockManager, InvariantError, num_blocks_for


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
    first = bm.allocate(3)          # [0, 1, 2]
    second = bm.allocate(3)         # [3, 4, 5]
    bm.free(second)                 # tail first: 5, 4, 3 join the free list in that order
    bm.free(first)                  # then 2, 1, 0
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
    bm._ref_counts[ids[0]] = 0      # leaked: neither free nor referenced
    with pytest.raises(InvariantError, match="free .* used"):
        bm.check_invariants()
    bm = BlockManager(num_blocks=4, block_size=4)
    bm._ref_counts[0] = 1           # referenced while still in the free list
    with pytest.raises(InvariantError):
        bm.check_invariants()


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
