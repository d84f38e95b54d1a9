"""Paged attention, torch reference.

KV cache layout, per layer (one tensor for K, one for V):

    cache[num_blocks, block_size, num_kv_heads, head_dim]

A sequence's token at position p lives in block `block_table[p // block_size]`, row
`p % block_size`; `slot = block * block_size + row` indexes the cache viewed as
[num_blocks * block_size, num_kv_heads, head_dim].

The batch is "varlen": the new tokens of all sequences are packed into one [N, ...] tensor, in
sequence order; sequence b contributes `query_lens[b]` tokens whose positions end at
`seq_lens[b] - 1`. One code path covers prefill, chunked prefill with a cached prefix, and decode.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [N, K, D] at their slots (in place)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of the new tokens q [N, H, D] over each sequence's cached K/V (which
    already holds this step's keys). Returns [N, H, D].

    Reference version: gathers each sequence's blocks into a padded [B, L] view and masks, so it
    costs O(B * max_seq_len) memory; the triton kernel reads blocks in place.
    """
    num_seqs = meta.seq_lens.shape[0]
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    num_blocks = -(-meta.max_seq_len // block_size)
    key_len = num_blocks * block_size

    tables = meta.block_tables[:, :num_blocks]
    keys = k_cache[tables].view(num_seqs, key_len, num_kv_heads, head_dim)
    values = v_cache[tables].view(num_seqs, key_len, num_kv_heads, head_dim)

    # Scatter packed queries into [B, max_q, H, D]; padding rows attend to key 0 only and are
    # dropped on the way out (a fully masked row would give NaN).
    padded_q = q.new_zeros(num_seqs, meta.max_query_len, num_heads, head_dim)
    padded_q[meta.token_seq_idx, meta.token_query_idx] = q
    query_pos = torch.zeros(num_seqs, meta.max_query_len, dtype=torch.int64, device=q.device)
    query_pos[meta.token_seq_idx, meta.token_query_idx] = meta.positions

    key_pos = torch.arange(key_len, device=q.device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (
        key_pos[None, None, :] < meta.seq_lens[:, None, None]
    )  # [B, max_q, L]

    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),  # [B, H, max_q, D]
        keys.transpose(1, 2),  # [B, K, L, D]
        values.transpose(1, 2),
        attn_mask=mask[:, None, :, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, H, max_q, D]
    return out.transpose(1, 2)[meta.token_seq_idx, meta.token_query_idx]  # [N, H, D]
