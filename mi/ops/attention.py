"""Paged attention, torch reference (the CPU path).

KV cache layout, per layer (one tensor for K, one for V):

    cache[num_blocks, block_size, num_kv_heads, head_dim]

A sequence's token at position p lives in block `block_table[p // block_size]`, row
`p % block_size`; `slot = block * block_size + row` indexes the cache viewed as
[num_blocks * block_size, num_kv_heads, head_dim].

The batch is "varlen": the new tokens of all sequences are packed into one [N, ...] tensor, in
sequence order; sequence b contributes `query_lens[b]` tokens whose positions end at
`seq_lens[b] - 1`. One code path covers prefill, chunked prefill with a cached prefix, and decode.

Cost. SDPA wants a dense box [G, max q, max L] per call; one box for the whole step pads every
sequence to the longest query and the longest context, so a 256-token prefill chunk beside 31
decodes costs 256 query rows for each of them, and one long context makes every short one as
long. So the step's sequences are split once per step (`plan_attention_groups`, in the worker's
metadata) into a few groups of similar shape, each one padded box; a group is kept only while
its box costs at most `_WASTE` times its real work (the sum over its sequences of query length x
context length) plus `_SLACK` units, which stands for the fixed cost of one more SDPA call. The
plan (token order, block tables, masks) serves every layer of the step.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# A group's padded box may cost _WASTE x its real work + _SLACK (query x key positions) before
# a sequence goes to a new group: one more SDPA call costs about as much as attending ~1k
# extra positions (benchmarks/bench_attention.py).
_WASTE = 1.25
_SLACK = 1024


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together in one padded box [G, max_q, L]."""

    box_tokens: torch.Tensor  # [G * max_q] int64: token filling each box row (padding repeats one)
    block_tables: torch.Tensor  # [G, L / block_size] int64
    mask: torch.Tensor | None  # [G, 1, max_q, L] bool, None when every key is visible
    real_rows: torch.Tensor | None  # [n] int64: box rows holding real tokens; None = all of them
    max_query_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs for exactly one forward pass."""

    slot_mapping: torch.Tensor  # [N] int64: cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64: padded with 0 past each sequence's blocks
    seq_lens: torch.Tensor  # [B] int64: context length after this step (cached + new)
    token_seq_idx: torch.Tensor  # [N] int64: which sequence each new token belongs to
    token_query_idx: torch.Tensor  # [N] int64: index of the token among its sequence's new tokens
    positions: torch.Tensor  # [N] int64: absolute position of each new token
    max_query_len: int
    max_seq_len: int
    # The reference's split of the step (plan_attention_groups); None: one box for everything.
    groups: tuple[AttentionGroup, ...] | None = None
    # [N] int64: where each token's output is in the concatenated groups' outputs; None: in order.
    group_order: torch.Tensor | None = None


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [N, K, D] at their slots (in place)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v


def _split(query_lens: np.ndarray, seq_lens: np.ndarray) -> list[np.ndarray]:
    """Sequence indices of each group: longest queries first, then longest contexts, a new group
    whenever the box would cost more than _WASTE x the work plus _SLACK."""
    order = np.lexsort((-seq_lens, -query_lens))
    groups, current, work = [], [], 0
    max_q = max_l = 0
    for seq in order.tolist():  # over sequences, once per step, not per layer
        q, length = int(query_lens[seq]), int(seq_lens[seq])
        new_q, new_l = max(max_q, q), max(max_l, length)
        if current and (len(current) + 1) * new_q * new_l > _WASTE * (work + q * length) + _SLACK:
            groups.append(np.asarray(current))
            current, work, new_q, new_l = [], 0, q, length
        current.append(seq)
        work += q * length
        max_q, max_l = new_q, new_l
    groups.append(np.asarray(current))
    return groups


def plan_attention_groups(
    query_lens: np.ndarray,
    seq_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    device: torch.device,
) -> tuple[tuple[AttentionGroup, ...], torch.Tensor | None]:
    """The groups of one step and the output order (AttentionMetadata.groups / group_order).

    query_lens, seq_lens [B] int64; block_tables [B, >= max blocks] int64 (numpy, host side)."""
    query_starts = np.cumsum(query_lens) - query_lens
    groups, token_order = [], []
    for seqs in _split(query_lens, seq_lens):
        q_lens, s_lens = query_lens[seqs], seq_lens[seqs]
        max_q, num_blocks = int(q_lens.max()), -(-int(s_lens.max()) // block_size)
        key_len = num_blocks * block_size
        # Box row (g, i) holds query i of sequence g; padding rows repeat its last query.
        query_idx = np.minimum(np.arange(max_q)[None, :], q_lens[:, None] - 1)  # [G, max_q]
        box_tokens = query_starts[seqs][:, None] + query_idx
        is_real = np.arange(max_q)[None, :] < q_lens[:, None]
        query_pos = s_lens[:, None] - q_lens[:, None] + query_idx  # [G, max_q]
        mask = None
        if not (max_q == 1 and (s_lens == key_len).all()):
            mask = np.arange(key_len)[None, None, :] <= query_pos[:, :, None]  # causal, within the context
            mask = torch.from_numpy(mask[:, None]).to(device)
        real_rows = None if is_real.all() else torch.from_numpy(np.flatnonzero(is_real)).to(device)
        groups.append(
            AttentionGroup(
                box_tokens=torch.from_numpy(box_tokens.reshape(-1)).to(device),
                block_tables=torch.from_numpy(np.ascontiguousarray(block_tables[seqs, :num_blocks])).to(
                    device
                ),
                mask=mask,
                real_rows=real_rows,
                max_query_len=max_q,
            )
        )
        token_order.append(box_tokens[is_real])
    order = np.concatenate(token_order)
    if (order == np.arange(len(order))).all():
        return tuple(groups), None
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return tuple(groups), torch.from_numpy(inverse).to(device)


def _group_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """Outputs [n, H, D] of the group's real tokens, in box order."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    num_seqs, num_blocks = group.block_tables.shape
    key_len = num_blocks * block_size
    keys = k_cache[group.block_tables].view(num_seqs, key_len, num_kv_heads, head_dim)
    values = v_cache[group.block_tables].view(num_seqs, key_len, num_kv_heads, head_dim)
    box_q = q[group.box_tokens].view(num_seqs, group.max_query_len, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        box_q.transpose(1, 2),  # [G, H, max_q, D]
        keys.transpose(1, 2),  # [G, K, L, D]
        values.transpose(1, 2),
        attn_mask=group.mask,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [G, H, max_q, D]
    out = out.transpose(1, 2).reshape(num_seqs * group.max_query_len, num_heads, head_dim)
    return out if group.real_rows is None else out[group.real_rows]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of the new tokens q [N, H, D] over each sequence's cached K/V (which
    already holds this step's keys). Returns [N, H, D].

    Gathers each group's blocks into a padded copy, so it costs O(sum of G x L) memory per group;
    the triton kernel reads blocks in place."""
    groups, order = meta.groups, meta.group_order
    if groups is None:
        groups, order = _one_group(meta, k_cache.shape[1])
    outs = [_group_attention(q, k_cache, v_cache, group, scale) for group in groups]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if order is None else out[order]


def _one_group(meta: AttentionMetadata, block_size: int) -> tuple[tuple[AttentionGroup, ...], None]:
    """The whole step as one box (metadata built without a plan, e.g. by tests)."""
    num_seqs = meta.seq_lens.shape[0]
    num_blocks = -(-meta.max_seq_len // block_size)
    key_len = num_blocks * block_size
    device = meta.positions.device
    box_row = meta.token_seq_idx * meta.max_query_len + meta.token_query_idx
    box_tokens = torch.zeros(num_seqs * meta.max_query_len, dtype=torch.int64, device=device)
    box_tokens[box_row] = torch.arange(box_row.shape[0], device=device)
    query_pos = torch.full((num_seqs * meta.max_query_len,), -1, dtype=torch.int64, device=device)
    query_pos[box_row] = meta.positions
    # Padding rows see key 0 only (a fully masked row would be NaN) and are dropped.
    mask = torch.arange(key_len, device=device)[None, :] <= query_pos.clamp(min=0)[:, None]
    group = AttentionGroup(
        box_tokens=box_tokens,
        block_tables=meta.block_tables[:, :num_blocks],
        mask=mask.view(num_seqs, 1, meta.max_query_len, key_len),
        real_rows=box_row,
        max_query_len=meta.max_query_len,
    )
    return (group,), None
