"""The reference paged attention (mi/ops/attention.py), split into groups or as one box, against
plain causal attention computed one sequence at a time from unpaged K/V."""

import numpy as np
import pytest
import torch

from mi.ops.attention import AttentionMetadata, paged_attention, plan_attention_groups, write_kv_cache


def _naive(q, keys, values, query_lens, seq_lens, scale):
    """Per sequence: its queries (the last query_len positions) over its first seq_len keys."""
    num_heads, num_kv_heads = q.shape[1], keys[0].shape[1]
    outs, start = [], 0
    for k, v, q_len, s_len in zip(keys, values, query_lens, seq_lens):
        qs = q[start : start + q_len]  # [q, H, D]
        start += q_len
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [L, H, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        query_pos = torch.arange(s_len - q_len, s_len)
        scores = scores.masked_fill(
            torch.arange(s_len)[None, None, :] > query_pos[None, :, None], float("-inf")
        )
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(outs)


def _case(query_lens, seq_lens, num_heads, num_kv_heads, block_size, seed=0):
    """A step: random K/V for each sequence's whole context written into a shuffled paged cache."""
    gen = torch.Generator().manual_seed(seed)
    query_lens, seq_lens = np.asarray(query_lens, np.int64), np.asarray(seq_lens, np.int64)
    head_dim = 16
    blocks_per_seq = -(-seq_lens // block_size)
    max_blocks = int(blocks_per_seq.max())
    num_blocks = int(blocks_per_seq.sum()) + 3
    perm = torch.randperm(num_blocks, generator=gen).numpy()
    tables = np.zeros((len(seq_lens), max_blocks + 2), np.int64)  # wider than needed, as the worker's
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[used : used + n]
        used += n
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)  # garbage past ends
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    keys = [torch.randn(int(s), num_kv_heads, head_dim, generator=gen) for s in seq_lens]
    values = [torch.randn(int(s), num_kv_heads, head_dim, generator=gen) for s in seq_lens]
    for b, s in enumerate(seq_lens):
        pos = np.arange(s)
        slots = torch.from_numpy(tables[b, pos // block_size] * block_size + pos % block_size)
        write_kv_cache(keys[b], values[b], k_cache, v_cache, slots)
    num_tokens = int(query_lens.sum())
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    token_seq_idx = np.repeat(np.arange(len(seq_lens)), query_lens)
    token_query_idx = np.arange(num_tokens) - (np.cumsum(query_lens) - query_lens)[token_seq_idx]
    positions = (seq_lens - query_lens)[token_seq_idx] + token_query_idx
    t = torch.from_numpy
    base = dict(
        slot_mapping=t(tables[token_seq_idx, positions // block_size] * block_size + positions % block_size),
        block_tables=t(tables),
        seq_lens=t(seq_lens),
        token_seq_idx=t(token_seq_idx),
        token_query_idx=t(token_query_idx),
        positions=t(positions),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )
    groups, order = plan_attention_groups(query_lens, seq_lens, tables, block_size, torch.device("cpu"))
    planned = AttentionMetadata(**base, groups=groups, group_order=order)
    expected = _naive(q, keys, values, query_lens, seq_lens, 0.25)
    return q, k_cache, v_cache, planned, AttentionMetadata(**base), expected


CASES = {
    "decode": ([1] * 6, [5, 17, 16, 1, 40, 33]),
    "prefill from zero": ([7, 3, 12], [7, 3, 12]),
    "chunk over a cached prefix": ([5, 9], [21, 9]),
    "mixed chunk and decodes": ([64, 1, 1, 1, 1], [96, 80, 81, 17, 3]),
    "one long beside short": ([1] * 9, [700] + [9] * 8),
    "block boundaries": ([1, 1, 4, 16], [16, 32, 16, 48]),
    "single token": ([1], [1]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("block_size", [16, 1, 4])
def test_paged_attention_matches_plain_attention(case, heads, block_size):
    q, k_cache, v_cache, planned, unplanned, expected = _case(*CASES[case], *heads, block_size)
    torch.testing.assert_close(
        paged_attention(q, k_cache, v_cache, planned, 0.25), expected, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        paged_attention(q, k_cache, v_cache, unplanned, 0.25), expected, rtol=1e-5, atol=1e-5
    )


def test_random_steps_match_plain_attention():
    rng = np.random.default_rng(0)
    for seed in range(30):
        num_seqs = int(rng.integers(1, 12))
        query_lens = np.where(rng.random(num_seqs) < 0.7, 1, rng.integers(1, 40, num_seqs))
        seq_lens = query_lens + rng.integers(0, 120, num_seqs) * (rng.random(num_seqs) < 0.8)
        q, k_cache, v_cache, planned, _, expected = _case(query_lens, seq_lens, 4, 2, 8, seed)
        torch.testing.assert_close(
            paged_attention(q, k_cache, v_cache, planned, 0.25), expected, rtol=1e-5, atol=1e-5
        )


def _box_cost(groups, block_size):
    return sum(
        g.block_tables.shape[0] * g.max_query_len * g.block_tables.shape[1] * block_size for g in groups
    )


@pytest.mark.parametrize(
    "query_lens, seq_lens, one_box_waste",
    [
        ([256] + [1] * 31, [768] + [512] * 31, 8),
        ([1] * 32, [2048] + [64] * 31, 15),
        ([1] * 32, list(range(16, 528, 16)), 1.9),
    ],
    ids=["chunk beside decodes", "one long beside short", "spread lengths"],
)
def test_plan_costs_in_proportion_to_the_work(query_lens, seq_lens, one_box_waste):
    """The boxes' total size stays within a small factor of sum(q_i * L_i), where one box for the
    whole step costs B * max q * max L."""
    query_lens, seq_lens = np.asarray(query_lens), np.asarray(seq_lens)
    tables = np.zeros((len(seq_lens), 2048 // 16), np.int64)
    groups, _ = plan_attention_groups(query_lens, seq_lens, tables, 16, torch.device("cpu"))
    work = int((query_lens * seq_lens).sum())
    one_box = len(seq_lens) * query_lens.max() * seq_lens.max()
    assert one_box > one_box_waste * work
    assert _box_cost(groups, 16) <= 1.5 * work + 1024 * len(groups)
    assert len(groups) <= 8


def test_uniform_decode_is_one_unmasked_box_in_token_order():
    seq_lens = np.full(8, 32)
    groups, order = plan_attention_groups(
        np.ones(8, np.int64), seq_lens, np.zeros((8, 4), np.int64), 16, "cpu"
    )
    assert len(groups) == 1 and groups[0].mask is None and groups[0].real_rows is None and order is None
