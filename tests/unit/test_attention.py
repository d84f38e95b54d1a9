"""The CPU paged attention (mi/ops/attention.py and its plan, mi/ops/attention_plan.py) against
a naive per-sequence causal attention written out here, on random mixed batches.

Inputs are fresh per test from a generator seeded per test; the seed is printed (shown on
failure) and MI_TEST_SEED reruns one. Every cache block that no sequence owns is NaN, block 0
included, so reading a key outside a sequence's blocks fails the comparison; outputs are
compared in float32 to 1e-5 against a float64 reference.
"""

import math
import os
import random

import numpy as np
import pytest
import torch

from mi.ops import attention_plan
from mi.ops.attention import AttentionMetadata, paged_attention
from mi.ops.attention_plan import ScratchBuffer, build_plan

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture
def gen():
    seed = int(os.environ.get("MI_TEST_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with MI_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def make_step(gen, specs, block_size, num_heads, num_kv_heads, head_dim, dtype=torch.float32):
    """specs [(cached_len, query_len)] per sequence -> q, k_cache, v_cache, meta, tables.

    Blocks are handed to sequences in a random order and never block 0; each sequence's table is
    padded with block 0 up to the widest table."""
    blocks_per_seq = [-(-(cached + new) // block_size) for cached, new in specs]
    num_blocks = 1 + sum(blocks_per_seq) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = []
    for count in blocks_per_seq:
        tables.append(order[:count])
        order = order[count:]
        for block in tables[-1]:
            k_cache[block] = torch.randn(shape[1:], generator=gen).to(dtype)
            v_cache[block] = torch.randn(shape[1:], generator=gen).to(dtype)

    seq_lens = [cached + new for cached, new in specs]
    query_lens = [new for _, new in specs]
    seq_idx = np.repeat(np.arange(len(specs)), query_lens)
    query_idx = np.concatenate([np.arange(new) for new in query_lens])
    positions = np.array([cached for cached, _ in specs])[seq_idx] + query_idx
    width = max(blocks_per_seq)
    padded = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64)
    slots = padded[seq_idx, positions // block_size] * block_size + positions % block_size
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=t(slots),
        block_tables=t(padded),
        seq_lens=t(seq_lens),
        token_seq_idx=t(seq_idx),
        token_query_idx=t(query_idx),
        positions=t(positions),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    q = torch.randn(len(positions), num_heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, meta, tables


def naive_attention(q, k_cache, v_cache, specs, tables, scale, window=None):
    """Sequence by sequence, head by head, in float64: softmax(q K^T * scale + causal) V; with a
    window, the query at position p sees only keys in (p - window, p]."""
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = q.shape[1] // num_kv_heads
    outputs = []
    token = 0
    for (cached, new), blocks in zip(specs, tables, strict=True):
        seq_len = cached + new
        slots = [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        keys = k_cache.flatten(0, 1)[slots].double()  # [L, K, D]
        values = v_cache.flatten(0, 1)[slots].double()
        out = torch.empty(new, q.shape[1], q.shape[2], dtype=torch.float64)
        for i in range(new):
            visible = cached + i + 1  # keys at positions <= this token's
            first = 0 if window is None else max(0, visible - window)
            for head in range(q.shape[1]):
                scores = keys[first:visible, head // group] @ q[token + i, head].double() * scale
                out[i, head] = torch.softmax(scores, dim=0) @ values[first:visible, head // group]
        outputs.append(out)
        token += new
    return torch.cat(outputs)


def check(
    gen, specs, block_size=16, num_heads=6, num_kv_heads=2, head_dim=16, dtype=torch.float32, window=None
):
    q, k_cache, v_cache, meta, tables = make_step(
        gen, specs, block_size, num_heads, num_kv_heads, head_dim, dtype
    )
    scale = head_dim**-0.5
    out = paged_attention(q, k_cache, v_cache, meta, scale, window)
    assert out.shape == q.shape and out.dtype == dtype
    expected = naive_attention(q, k_cache, v_cache, specs, tables, scale, window)
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])
    return meta


CASES = {
    # name: (specs [(cached_len, query_len)], block_size, H, K)
    "prefill_from_zero": ([(0, 37)], 16, 6, 2),
    "prefill_batch_causal_box": ([(0, 20), (0, 31), (0, 17), (0, 2)], 16, 6, 2),
    "chunk_with_prefix": ([(40, 25)], 16, 6, 2),
    "decode_equal_lengths": ([(99, 1)] * 5, 16, 6, 2),
    "decode_mixed_lengths": ([(3, 1), (40, 1), (100, 1), (15, 1), (0, 1), (130, 1), (70, 1)], 16, 6, 2),
    "decode_batch_one": ([(127, 1)], 16, 6, 2),
    "mixed_step": ([(0, 30), (50, 1), (60, 1), (33, 12), (16, 1), (0, 1), (5, 9)], 16, 6, 2),
    "chunk_beside_decodes": ([(80, 40)] + [(90 + i, 1) for i in range(9)], 16, 6, 2),
    "skewed_lengths": ([(0, 300)] + [(20 + i, 1) for i in range(7)], 16, 6, 2),
    "skewed_decode": ([(700, 1)] + [(20 + i, 1) for i in range(7)], 16, 6, 2),
    "mha": ([(0, 9), (21, 1), (7, 9), (64, 1)], 16, 4, 4),
    "gqa_one_kv_head": ([(0, 9), (21, 1), (7, 9), (64, 1)], 16, 8, 1),
    "block_size_1": ([(0, 9), (21, 1), (7, 9), (64, 1)], 1, 6, 2),
    "block_boundaries": ([(31, 1), (0, 32), (16, 16), (47, 1), (32, 32)], 16, 6, 2),
    "block_size_8_odd_lengths": ([(0, 3), (21, 1), (7, 9), (129, 1)], 8, 3, 3),
    "block_size_4_mqa": ([(0, 3), (21, 1), (7, 9), (4, 1), (0, 1)], 4, 6, 1),
    "single_token": ([(0, 1)], 16, 6, 2),
    # decode boxes large enough for the batched-matmul path (DECODE_MATMUL_MIN_SEQS)
    "many_decodes_masked": ([(33 + 3 * i, 1) for i in range(12)], 16, 6, 2),
    "many_decodes_equal": ([(40, 1)] * 9, 16, 6, 3),
    "many_decodes_mqa_mixed": ([(5 + 2 * i, 1) for i in range(10)] + [(0, 7)], 4, 4, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_attention(gen, case):
    specs, block_size, num_heads, num_kv_heads = CASES[case]
    check(gen, specs, block_size, num_heads, num_kv_heads)


@pytest.mark.parametrize("window", [1, 7, 16, 40])
@pytest.mark.parametrize(
    "case", ["mixed_step", "chunk_beside_decodes", "skewed_lengths", "many_decodes_masked"]
)
def test_sliding_window_matches_naive_attention(gen, case, window):
    specs, block_size, num_heads, num_kv_heads = CASES[case]
    check(gen, specs, block_size, num_heads, num_kv_heads, window=window)


@pytest.mark.parametrize("window", [1, 7, 16, 40])
@pytest.mark.parametrize("case", ["mixed_step", "skewed_decode", "many_decodes_masked", "block_size_1"])
def test_sliding_window_never_reads_blocks_before_the_window(gen, case, window):
    """The scheduler frees the blocks that fall out of every window (and they are reused for
    other sequences) while the tables still name them: NaN in them must not reach the output,
    and a box is no wider than the keys its queries can see."""
    specs, block_size, num_heads, num_kv_heads = CASES[case]
    head_dim, scale = 16, 16**-0.5
    q, k_cache, v_cache, meta, tables = make_step(gen, specs, block_size, num_heads, num_kv_heads, head_dim)
    expected = naive_attention(q, k_cache, v_cache, specs, tables, scale, window)
    for (cached, _), blocks in zip(specs, tables):
        first_visible = max(0, cached - window + 1)
        for block in blocks[: first_visible // block_size]:
            k_cache[block] = float("nan")
            v_cache[block] = float("nan")
    out = paged_attention(q, k_cache, v_cache, meta, scale, window)
    torch.testing.assert_close(out.double(), expected, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    plan = attention_plan.plan_from_metadata(meta, block_size, num_kv_heads, head_dim, torch.float32, window)
    widest_view = max(min(cached + new, window + new - 1) for cached, new in specs)
    assert max(box.max_seq_len for box in plan.boxes) <= widest_view


def test_random_mixed_batches(gen):
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    for _ in range(6):
        specs = []
        for _ in range(int(rng.integers(1, 12))):
            kind = rng.integers(3)
            cached = 0 if kind == 0 else int(rng.integers(0, 300))
            new = 1 if kind == 1 else int(rng.integers(1, 70))
            specs.append((cached, new))
        num_kv_heads = int(rng.choice([1, 2, 4]))
        block_size = int(rng.choice([1, 16]))
        check(gen, specs, block_size, num_kv_heads * int(rng.choice([1, 3])), num_kv_heads)


def test_bfloat16(gen):
    check(gen, [(0, 20), (40, 1), (33, 12), (70, 1)], dtype=torch.bfloat16)


def planned(meta, plan):
    return AttentionMetadata(**{**meta.__dict__, "plan": plan})


def test_worker_plan_reused_by_layers(gen):
    """The plan the worker builds from numpy (into its kept scratch) serves every layer: two
    layers' caches through one plan, each equal to its own naive attention."""
    specs = [(0, 30), (50, 1), (33, 12), (200, 1)]
    scratch = ScratchBuffer()
    q, k_cache, v_cache, meta, tables = make_step(gen, specs, 16, 6, 2, 16)
    query_lens = np.array([new for _, new in specs])
    plan = build_plan(
        query_lens, meta.seq_lens.numpy(), meta.block_tables.numpy(), 16, 2, 16, torch.float32, "cpu", scratch
    )
    layers = [(q, k_cache, v_cache), (torch.randn(q.shape, generator=gen), k_cache * 2, v_cache.flip(-1))]
    for layer_q, layer_k, layer_v in layers:
        out = paged_attention(layer_q, layer_k, layer_v, planned(meta, plan), 0.25)
        expected = naive_attention(layer_q, layer_k, layer_v, specs, tables, 0.25)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # A later, larger step grows the same scratch; a smaller one reuses it.
    bigger = build_plan(np.array([1]), np.array([900]), np.zeros((1, 57), np.int64), 16, 2, 16, torch.float32)
    assert bigger.scratch.numel() == 2 * 2 * 900 * 16
    grown = build_plan(
        np.array([1]), np.array([900]), np.zeros((1, 57), np.int64), 16, 2, 16, torch.float32, "cpu", scratch
    )
    again = build_plan(
        query_lens, meta.seq_lens.numpy(), meta.block_tables.numpy(), 16, 2, 16, torch.float32, "cpu", scratch
    )
    assert again.scratch.data_ptr() == grown.scratch.data_ptr()


@pytest.mark.parametrize(
    "kv_heads, head_dim, dtype, message",
    [
        (3, 16, torch.float32, "plan is for 3 KV heads, the cache has 2"),
        (2, 8, torch.float32, "scratch is torch.float32 of head_dim 8, q is torch.float32 of head_dim 16"),
        (2, 16, torch.bfloat16, "scratch is torch.bfloat16 of head_dim 16, q is torch.float32"),
    ],
)
def test_plan_for_another_cache_is_rejected(gen, kv_heads, head_dim, dtype, message):
    q, k_cache, v_cache, meta, _ = make_step(gen, [(5, 1)], 16, 6, 2, 16)
    plan = build_plan(np.array([1]), np.array([6]), meta.block_tables.numpy(), 16, kv_heads, head_dim, dtype)
    with pytest.raises(ValueError, match=message):
        paged_attention(q, k_cache, v_cache, planned(meta, plan), 0.25)


def box_shapes(plan):
    shapes = [(box.kind, box.num_seqs, box.max_query_len, box.max_seq_len) for box in plan.boxes]
    return sorted(shapes, key=lambda shape: (shape[0], shape[3], shape[2]))


def test_plan_groups_by_kind_and_octave():
    decode_lens = [65, 100, 128, 129, 250, 256, 300, 10, 32, 3]
    query_lens = [256, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 40, 50, 20, 200, 10]
    seq_lens = [512, *decode_lens, 40, 50, 100, 400, 400]
    tables = np.zeros((len(seq_lens), 32), dtype=np.int64)
    plan = build_plan(np.array(query_lens), np.array(seq_lens), tables, 16, 2, 4, torch.float32)
    assert box_shapes(plan) == [
        ("causal", 2, 50, 50),  # q = L: 40, 50
        ("decode", 3, 1, 32),  # lengths up to MIN_LEN: 10, 32, 3
        ("decode", 3, 1, 128),  # (64, 128]: 65, 100, 128
        ("decode", 3, 1, 256),  # (128, 256]: 129, 250, 256
        ("decode", 1, 1, 300),
        ("masked", 1, 20, 100),
        ("masked", 1, 10, 400),  # L in the octave of the next box, q not
        ("masked", 2, 256, 512),  # q in (128, 256] and L in (256, 512]: 256/512 and 200/400
    ]
    assert not plan.is_identity
    assert attention_plan.MIN_LEN == 32
    boxes = {(box.kind, box.max_seq_len): box for box in plan.boxes}
    # Padding never doubles a decode's keys past MIN_LEN: max L <= 2 * min L in each box.
    assert boxes["decode", 128].mask.isinf().sum() == (128 - 65) + (128 - 100)
    assert boxes["decode", 300].mask is None  # one length: no mask
    assert boxes["causal", 50].mask is None
    assert boxes["masked", 100].mask.shape == (1, 1, 20, 100)


def box_cost(plan) -> int:
    return sum(box.num_seqs * box.max_query_len * box.max_seq_len for box in plan.boxes)


@pytest.mark.parametrize(
    "specs, one_box_waste",
    [
        ([(256, 256)] + [(511, 1)] * 31, 8),
        ([(0, 2048)] + [(63, 1)] * 31, 30),
        ([(2047, 1)] + [(63, 1)] * 31, 15),
        ([(n - 1, 1) for n in range(16, 528, 16)], 1.9),
    ],
    ids=["chunk beside decodes", "long prefill beside decodes", "long beside short", "spread lengths"],
)
def test_plan_costs_in_proportion_to_the_work(specs, one_box_waste):
    """The boxes' total size stays within a small factor of sum(q_i * L_i), where one box for the
    whole step costs B * max q * max L."""
    query_lens = np.array([new for _, new in specs])
    seq_lens = np.array([cached + new for cached, new in specs])
    tables = np.zeros((len(specs), 2048 // 16), np.int64)
    plan = build_plan(query_lens, seq_lens, tables, 16, 2, 4, torch.float32)
    work = int((query_lens * seq_lens).sum())
    assert len(specs) * query_lens.max() * seq_lens.max() > one_box_waste * work
    assert box_cost(plan) <= 1.5 * work
    assert len(plan.boxes) <= 8


def test_plan_index_layout():
    """Keys head-major, clamped to the last key; padding query rows go to the spare row N."""
    tables = np.array([[7, 3, 0], [5, 0, 0]])
    plan = build_plan(np.array([3, 2]), np.array([3, 2]), tables, 2, 2, 4, torch.float32)
    (box,) = plan.boxes
    assert (box.kind, box.max_query_len, box.max_seq_len) == ("causal", 3, 3)
    # Sequence 0 keys 0, 1, 2 -> slots 14, 15, 6; sequence 1 keys 0, 1, (1) -> slots 10, 11, 11.
    slots = np.array([[14, 15, 6], [10, 11, 11]])
    expected_keys = (slots[:, None, :] * 2 + np.arange(2)[None, :, None]).reshape(-1)
    assert box.key_index.tolist() == expected_keys.tolist()
    assert box.query_index.tolist() == [0, 1, 2, 3, 4, 4]
    assert box.out_index.tolist() == [0, 1, 2, 3, 4, 5]  # row 5 = N: padding
    assert plan.num_tokens == 5


def test_single_box_in_packed_order_is_identity():
    tables = np.zeros((3, 4), dtype=np.int64)
    assert build_plan(np.array([1, 1, 1]), np.array([5, 9, 20]), tables, 16, 2, 4, torch.float32).is_identity
    assert build_plan(np.array([7]), np.array([20]), tables[:1], 16, 2, 4, torch.float32).is_identity
    assert not build_plan(np.array([7, 7]), np.array([7, 7]), tables[:2], 16, 2, 4, torch.float32).is_identity


def test_no_fully_masked_rows():
    """Every padded query row of a masked box sees at least one key (a fully masked row is NaN)."""
    tables = np.zeros((3, 8), dtype=np.int64)
    plan = build_plan(np.array([5, 2, 9]), np.array([40, 35, 50]), tables, 16, 1, 4, torch.float32)
    (box,) = plan.boxes
    assert box.kind == "masked"
    assert (box.mask == 0).any(dim=-1).all()
    # Sequence 1 (positions 33, 34): its padding rows repeat position 34.
    assert box.mask[1, 0, 4, 34].item() == 0.0
    assert math.isinf(box.mask[1, 0, 4, 35].item())


def test_empty_step():
    q = torch.empty(0, 6, 16)
    cache = torch.zeros(2, 16, 2, 16)
    empty = torch.zeros(0, dtype=torch.int64)
    meta = AttentionMetadata(empty, torch.zeros(0, 1, dtype=torch.int64), empty, empty, empty, empty, 0, 0)
    assert paged_attention(q, cache, cache, meta, 0.25).shape == (0, 6, 16)
