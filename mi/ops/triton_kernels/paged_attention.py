"""Paged attention over a varlen batch: prefill, chunked prefill with a cached prefix and decode
in one kernel, reading K/V blocks in place through the block table.

Grid: (sequence, query tile, KV head). One program takes BLOCK_M consecutive new tokens of one
sequence and, for one KV head, all G = H / K query heads that share it (GQA), as one tile of
BLOCK_M * BLOCK_G rows:

    row r -> token  q_start[seq] + tile * BLOCK_M + r // BLOCK_G
          -> head   kv_head * G + r % BLOCK_G          (rows past the sequence or G are masked)

It walks the sequence's keys 0 .. min(seq_len, max position in the tile + 1) in tiles of BLOCK_N
keys (with a sliding window, from the tile's first visible key, min position - window + 1: it
then costs about the window, and never reads a block the scheduler freed behind it); key j
lives at cache[block_table[seq, j // block_size], j % block_size, kv_head, :], so a key tile may
span several blocks and any block size works. Scores and the online softmax
(running max m, running sum l) are float32; key j is visible to a row at position p iff
j <= p and j < seq_len (and p - window < j with a window), the reference's mask.

Both products use tl.dot (float32 inputs at IEEE precision, not TF32), so every tile dim is
>= 16: BLOCK_D pads the head dim, and a tile has at least 16 rows (masked padding where a decode
tile has fewer than 16 heads). NOTE: the triton interpreter multiplies bfloat16 dot operands as
their raw uint16 bits, so under TRITON_INTERPRET bfloat16 dots are done in float32 (DOT_FP32);
compiled, they run natively in bfloat16.

Invariants assumed, not checked (checking needs a device sync): new tokens are packed in
sequence order (token_seq_idx non-decreasing), meta.max_query_len >= every sequence's new-token
count, every sequence has seq_len >= 1 and its block table covers seq_len keys, positions are
< seq_len.
"""

import math

import torch
import triton
import triton.language as tl

from mi.ops.attention import AttentionMetadata
from mi.ops.triton_kernels import _guard

BLOCK_N = 32  # keys per inner-loop step; a key tile may span several KV blocks
_NO_WINDOW = 1 << 62  # int64 in the kernel, past any position


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    positions_ptr,
    scale_log2,
    stride_qn,
    stride_qh,
    stride_cache_block,
    stride_cache_row,
    stride_cache_head,
    stride_table,
    block_size,
    num_queries_per_kv,
    num_heads,
    window,  # sliding window; no window is one longer than any sequence (no branch in the kernel)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    query_len = tl.load(query_start_ptr + seq + 1).to(tl.int64) - q_start
    if tile * BLOCK_M < query_len:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
        rows = tl.arange(0, BLOCK_M * BLOCK_G)
        token_in_seq = tile * BLOCK_M + rows // BLOCK_G
        group = rows % BLOCK_G
        row_valid = (token_in_seq < query_len) & (group < num_queries_per_kv)
        token = q_start + token_in_seq
        head = kv_head * num_queries_per_kv + group
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < HEAD_DIM

        q_mask = row_valid[:, None] & dim_valid[None, :]
        q = tl.load(
            q_ptr + token[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :],
            mask=q_mask,
            other=0.0,
        )  # [R, BLOCK_D]
        q_pos = tl.load(positions_ptr + token, mask=row_valid, other=-1).to(tl.int64)  # [R]
        kv_len = tl.minimum(seq_len, tl.max(q_pos, axis=0) + 1)
        first_pos = tl.min(tl.where(row_valid, q_pos, seq_len), axis=0)
        kv_begin = tl.maximum(first_pos - window + 1, 0)

        m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M * BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], dtype=tl.float32)
        table = block_tables_ptr + seq * stride_table
        for key_start in range(kv_begin, kv_len, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)
            key_valid = keys < kv_len
            block_ids = tl.load(table + keys // block_size, mask=key_valid, other=0).to(tl.int64)
            key_offsets = (
                block_ids * stride_cache_block
                + (keys % block_size) * stride_cache_row
                + kv_head * stride_cache_head
            )  # [BLOCK_N]
            kv_mask = key_valid[:, None] & dim_valid[None, :]
            k = tl.load(
                k_cache_ptr + key_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0
            )  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_cache_ptr + key_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            if DOT_FP32:
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            visible = (keys[None, :] <= q_pos[:, None]) & key_valid[None, :]  # [R, BLOCK_N]
            visible &= keys[None, :] > q_pos[:, None] - window
            scores = tl.where(visible, scores * scale_log2, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # A row with nothing visible yet (only masked rows) keeps m = -inf; shift by 0 there
            # so that exp2 sees -inf - 0 = -inf and not -inf - -inf = NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - shift)
            p = tl.exp2(scores - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DOT_FP32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_rows = token * (num_heads * HEAD_DIM) + head * HEAD_DIM  # out is contiguous [N, H, D]
        tl.store(out_ptr + out_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


def query_start_loc(meta: AttentionMetadata) -> torch.Tensor:
    """[B + 1] int64: first packed token of each sequence, then N (token_seq_idx is sorted)."""
    bounds = torch.arange(
        meta.seq_lens.shape[0] + 1, dtype=meta.token_seq_idx.dtype, device=meta.token_seq_idx.device
    )
    return torch.searchsorted(meta.token_seq_idx, bounds)


def _tile_sizes(max_query_len: int, num_queries_per_kv: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_G): up to 64 rows for prefill and at least 16 (tl.dot's minimum), so a
    decode tile (one token) of G < 16 heads is padded with masked rows: decode is bound by
    reading K/V, which the padding does not add to."""
    block_g = triton.next_power_of_2(num_queries_per_kv)
    block_m = min(triton.next_power_of_2(max(max_query_len, 1)), max(1, 64 // block_g))
    return max(block_m, 16 // block_g, 1), block_g


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens q [N, H, D] over each sequence's cached K/V
    [num_blocks, block_size, K, D] (already holding this step's keys). Returns [N, H, D]
    contiguous in q's dtype (or writes `out`). `window`: sliding-window attention, a query at
    position p sees keys in (p - window, p]."""
    op = "paged_attention"
    _guard.check_dtype(op, "q", q, _guard.FLOAT_DTYPES)
    _guard.check_dtype(op, "k_cache", k_cache, _guard.FLOAT_DTYPES)
    _guard.check_dtype(op, "v_cache", v_cache, _guard.FLOAT_DTYPES)
    _guard.check_same_dtype(op, "q", q, k_cache=k_cache, v_cache=v_cache)
    _guard.check_ndim(op, "q", q, 3)
    _guard.check_ndim(op, "k_cache", k_cache, 4)
    index_tensors = {
        "block_tables": (meta.block_tables, 2),
        "seq_lens": (meta.seq_lens, 1),
        "token_seq_idx": (meta.token_seq_idx, 1),
        "positions": (meta.positions, 1),
    }
    for name, (t, ndim) in index_tensors.items():
        _guard.check_dtype(op, f"meta.{name}", t, _guard.INDEX_DTYPES)
        _guard.check_ndim(op, f"meta.{name}", t, ndim)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        _guard.fail(op, f"v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    if cache_head_dim != head_dim:
        _guard.fail(op, f"cache head_dim {cache_head_dim} != q head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        _guard.fail(op, f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    num_seqs = meta.seq_lens.shape[0]
    if meta.block_tables.shape[0] != num_seqs:
        _guard.fail(op, f"block_tables has {meta.block_tables.shape[0]} rows for {num_seqs} seqs")
    for name in ("token_seq_idx", "positions"):
        if getattr(meta, name).shape[0] != num_tokens:
            _guard.fail(op, f"meta.{name} must have {num_tokens} entries like q")
    if not math.isfinite(scale):
        _guard.fail(op, f"scale must be finite, got {scale}")
    if window is not None and window < 1:
        _guard.fail(op, f"window must be >= 1, got {window}")
    _guard.check_unit_stride(op, "q", q)
    _guard.check_contiguous(op, "k_cache", k_cache)
    _guard.check_contiguous(op, "v_cache", v_cache)
    _guard.check_unit_stride(op, "meta.block_tables", meta.block_tables)
    for name in ("seq_lens", "token_seq_idx", "positions"):
        _guard.check_contiguous(op, f"meta.{name}", getattr(meta, name))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _guard.check_out(op, out, tuple(q.shape), q.dtype)
    _guard.check_device(
        op,
        _paged_attention_kernel,
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        out=out,
        **{f"meta.{name}": t for name, (t, _) in index_tensors.items()},
    )
    if num_tokens == 0 or num_seqs == 0:
        return out

    num_queries_per_kv = num_heads // num_kv_heads
    block_m, block_g = _tile_sizes(meta.max_query_len, num_queries_per_kv)
    grid = (num_seqs, triton.cdiv(max(meta.max_query_len, 1), block_m), num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.seq_lens,
        query_start_loc(meta),
        meta.positions,
        float(scale) * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        block_size,
        num_queries_per_kv,
        num_heads,
        window or _NO_WINDOW,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_G=block_g,
        BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_FP32=q.dtype == torch.float32
        or (q.dtype == torch.bfloat16 and not _guard.is_compiled(_paged_attention_kernel)),
    )
    return out
