"""Paged attention, torch reference.

KV cache layout, per layer (one tensor for K, one for V):

    cache[num_blocks, block_size, num_kv_heads, head_dim]

A sequence's token at position p lives in block `block_table[p // block_size]`, row
`p % block_size`; `slot = block * block_size + row` indexes the cache viewed as
[num_blocks * block_size, num_kv_heads, head_dim].

The batch is "varlen": the new tokens of all sequences are packed into one [N, ...] tensor, in
sequence order; sequence b contributes `query_lens[b]` tokens whose positions end at
`seq_lens[b] - 1`. One code path covers prefill, chunked prefill with a cached prefix, and decode.

The reference (the CPU path) groups a step's sequences into a few padded boxes of similar shape
(mi/ops/attention_plan.py) and runs one SDPA call per box over keys gathered head-major, so a
step costs about sum(q_i * L_i) and not B * max q * max L. The triton kernel reads blocks in
place and ignores the plan.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mi.ops.attention_plan import AttentionPlan, plan_from_metadata


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
    # The CPU reference's grouping of this step's sequences (built once per step by the worker);
    # None: built per call. The triton kernel does not use it.
    plan: AttentionPlan | None = None
    # The CPU reference rotary's cos/sin at each token's position (mi.ops.rotary.rotary_rows),
    # gathered once per step by the worker; None: gathered per call. The triton kernel reads the table.
    rotary_rows: torch.Tensor | None = None
    # The row of the step's rotary table each token reads; None: its position. Set when the
    # table is per token (RoPE types that depend on the sequence's length, mi/ops/rope_scaling.py).
    rotary_index: torch.Tensor | None = None
    # The plan of the sliding-window layers (built with the window), when the model has any.
    window_plan: AttentionPlan | None = None


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [N, K, D] at their slots (in place)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens q [N, H, D] over each sequence's cached K/V (which
    already holds this step's keys). Returns [N, H, D].

    Runs the step's plan (mi/ops/attention_plan.py): one SDPA call per box of similar sequences,
    each reading only its own sequences' keys, so a step costs about sum(q_i * L_i). Without
    meta.plan the plan is built here, once per call. `window`: sliding-window attention (a query
    at position p sees keys in (p - window, p]), run from meta.window_plan.
    """
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    plan = meta.plan if window is None else meta.window_plan
    if plan is None:
        plan = plan_from_metadata(meta, block_size, num_kv_heads, head_dim, q.dtype, window)
    elif plan.num_kv_heads != num_kv_heads:
        raise ValueError(
            f"the attention plan is for {plan.num_kv_heads} KV heads, the cache has {num_kv_heads}"
        )
    elif plan.scratch.shape[2] != head_dim or plan.scratch.dtype != q.dtype:
        raise ValueError(
            f"the attention plan's scratch is {plan.scratch.dtype} of head_dim {plan.scratch.shape[2]}, "
            f"q is {q.dtype} of head_dim {head_dim}"
        )
    key_rows = k_cache.view(-1, head_dim)  # [num_slots * K, D]
    value_rows = v_cache.view(-1, head_dim)
    out = None if plan.is_identity else q.new_empty(plan.num_tokens + 1, num_heads, head_dim)
    for box in plan.boxes:
        n, max_q, max_l = box.num_seqs, box.max_query_len, box.max_seq_len
        num_keys = box.key_index.shape[0]
        keys, values = plan.scratch[0, :num_keys], plan.scratch[1, :num_keys]
        torch.index_select(key_rows, 0, box.key_index, out=keys)
        torch.index_select(value_rows, 0, box.key_index, out=values)
        keys, values = (
            keys.view(n, num_kv_heads, max_l, head_dim),
            values.view(n, num_kv_heads, max_l, head_dim),
        )
        # One box in packed order: its padded query rows are q's rows as they are.
        queries = q if plan.is_identity else q.index_select(0, box.query_index)
        if box.kind == "decode" and n >= DECODE_MATMUL_MIN_SEQS:
            result = _decode_by_matmul(queries, keys, values, box.mask, scale)
        else:
            result = F.scaled_dot_product_attention(
                queries.view(n, max_q, num_heads, head_dim).transpose(1, 2),  # [n, H, max q, D]
                keys,
                values,
                attn_mask=box.mask,
                is_causal=box.kind == "causal",
                scale=scale,
                enable_gqa=num_heads != num_kv_heads,
            )  # [n, H, max q, D]
            result = result.transpose(1, 2).reshape(n * max_q, num_heads, head_dim)
        if out is None:
            return result
        out.index_copy_(0, box.out_index, result)
    return out[: plan.num_tokens]


# CPU SDPA's flash kernel tiles over query rows; with one row per sequence a plain batched matmul,
# grouped by KV head, is 3-37% faster from 8 sequences up and slower below 4 (2 threads,
# `benchmarks/bench_attention.py --decode-kernels`).
DECODE_MATMUL_MIN_SEQS = 8


def _decode_by_matmul(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """queries [n, H, D] (one per sequence), keys/values [n, K, L, D], mask [n, 1, 1, L] or None
    -> [n, H, D]. Query head h reads KV head h // (H / K), as Hugging Face's repeat_kv does."""
    n, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    grouped = queries.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [n, K, G, D]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale)  # [n, K, G, L]
    if mask is not None:
        scores.add_(mask)  # [n, 1, 1, L] over every head
    return torch.matmul(scores.softmax(-1), values).view(n, num_heads, head_dim)
