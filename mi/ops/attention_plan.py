"""The per-step grouping plan of the CPU paged attention (mi/ops/attention.py).

One padded [B, max q, max L] box for a whole step costs B * max q * max L: a 256-token chunk
beside 31 decodes pays 256 query rows for every decode. The plan instead splits the step's
sequences into a few boxes of similar shape, so that a step costs about sum(q_i * L_i):

    kind     rows                          SDPA call per box [n, H, max q, D] x [n, K, max L, D]
    decode   q = 1                         a key mask [n, 1, 1, max L] only when lengths differ
    causal   q = L > 1 (no cached prefix)  is_causal (top-left aligned: right for every row,
                                           since each starts at position 0), no mask
    masked   1 < q < L (cached prefix)     additive mask [n, 1, max q, max L], built here

Sequences of one kind go to the same box when their lengths fall in the same octave,
(2^(c-1), 2^c] (for boxes with q > 1, the same octave of q too; lengths up to MIN_LEN share one
octave), so that padding at most doubles a row's L (and its q): a handful of boxes a step,
whatever the batch size.

Each box's tensors, built once per step (numpy, then one copy each to the device) and reused by
every layer:

    query_index  [n * max q]        row of q [N, H, D] for each padded query row; a padding row
                                    repeats its sequence's last token, so it is never fully masked
    key_index    [n * K * max L]    row of the cache viewed as [num_slots * K, D] for each
                                    (sequence, KV head, key); keys past a sequence's length repeat
                                    its last key (finite data, whatever the block table padding
                                    points at). Gathered with one index_select, the keys arrive
                                    head-major [n, K, max L, D], the layout CPU SDPA reads fastest
    out_index    [n * max q]        row of the output for each padded query row; padding rows go
                                    to a spare row N that the caller drops
    mask         additive (0 or -inf) in the compute dtype, or None

Invariants assumed, not checked: every sequence has 1 <= q <= L, its block table covers L keys,
and its new tokens are packed in sequence order.
"""

from dataclasses import dataclass

import numpy as np
import torch

# Lengths up to this share one octave: 16 decodes at L=16 beside 16 at L=32 cost the same as one
# box or two (measured), shorter ones cost more apart than padded.
MIN_LEN = 32


@dataclass(frozen=True)
class AttentionBox:
    """One padded group of sequences, attended with one SDPA call."""

    kind: str  # "decode" | "causal" | "masked"
    num_seqs: int
    max_query_len: int
    max_seq_len: int  # keys per sequence in the box (with a window, from its first visible key)
    query_index: torch.Tensor  # [n * max q] int64
    key_index: torch.Tensor  # [n * K * max L] int64
    out_index: torch.Tensor  # [n * max q] int64
    mask: torch.Tensor | None  # decode [n, 1, 1, max L]; masked [n, 1, max q, max L]; causal None


@dataclass(frozen=True)
class AttentionPlan:
    """The boxes of one step; `is_identity` when one box covers every token in packed order
    (its output is the result, no scatter). `scratch` [2, max over boxes of n * K * max L, D]
    receives each box's gathered keys and values in turn (boxes and layers run one at a time)."""

    num_tokens: int
    num_kv_heads: int
    boxes: tuple[AttentionBox, ...]
    is_identity: bool
    scratch: torch.Tensor


class ScratchBuffer:
    """Memory for the gathered keys and values, kept from step to step by its owner (the worker).

    A fresh tensor of tens of MB per layer costs a page fault per 4 KiB page whenever glibc has
    handed the previous one back to the kernel, as often as the gather itself (measured: 16 MB
    in 6 ms of faults against 4.5 ms of copying). Grows to the largest step seen and stays there.
    NOTE: one plan at a time: a plan built from it overwrites the memory of the previous one."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        flat = self._flat
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != torch.device(device):
            self._flat = flat = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel]


def _octave(lengths: np.ndarray) -> np.ndarray:
    return np.ceil(np.log2(np.maximum(lengths, MIN_LEN))).astype(np.int64)


def build_plan(
    query_lens: np.ndarray,
    seq_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    scratch: ScratchBuffer | None = None,
    window: int | None = None,
) -> AttentionPlan:
    """The plan for sequences with `query_lens` new tokens each (packed in this order) and
    `seq_lens` keys after this step; block_tables [B, >= max blocks] int64. The gathered keys go
    to `scratch` (a fresh one when None). `window`: sliding-window attention, a query at position
    p sees keys in (p - window, p] (Hugging Face's rule); a causal box longer than the window
    becomes a masked one."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    num_tokens = int(query_lens.sum())
    query_starts = np.cumsum(query_lens) - query_lens
    # A window hides every key before (first query position - window + 1): the box starts there,
    # so a step costs about sum(q_i * min(L_i, window + q_i)), and the scheduler may free those blocks.
    key_starts = (
        np.zeros_like(seq_lens) if window is None else np.maximum(seq_lens - query_lens - window + 1, 0)
    )
    key_lens = seq_lens - key_starts
    is_causal = (query_lens == seq_lens) & (seq_lens <= (window or np.iinfo(np.int64).max))
    kind = np.where(query_lens == 1, 0, np.where(is_causal, 1, 2))
    query_octave = np.where(kind == 0, 0, _octave(query_lens))
    group_key = (kind * 64 + query_octave) * 64 + _octave(key_lens)  # octaves of int64 lengths are < 64
    _, group_of_seq = np.unique(group_key, return_inverse=True)
    order = np.argsort(group_of_seq, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(group_of_seq[order]) != 0, True]) if len(order) else []

    boxes = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        seqs = order[start:stop]
        box_kind = ("decode", "causal", "masked")[kind[seqs[0]]]
        boxes.append(
            _box(
                box_kind,
                query_lens[seqs],
                seq_lens[seqs],
                key_starts[seqs],
                query_starts[seqs],
                block_tables[seqs],
                block_size,
                num_kv_heads,
                num_tokens,
                dtype,
                device,
                window,
            )
        )
    is_identity = len(boxes) == 1 and (len(query_lens) == 1 or bool((query_lens == 1).all()))
    max_keys = max((box.key_index.numel() for box in boxes), default=0)
    scratch = scratch if scratch is not None else ScratchBuffer()
    flat = scratch.take(2 * max_keys * head_dim, dtype, device)
    return AttentionPlan(
        num_tokens, num_kv_heads, tuple(boxes), is_identity, flat.view(2, max_keys, head_dim)
    )


def _box(
    kind,
    query_lens,
    seq_lens,
    key_starts,
    query_starts,
    tables,
    block_size,
    num_kv_heads,
    num_tokens,
    dtype,
    device,
    window,
) -> AttentionBox:
    """One box's index tensors and mask (layout in the module docstring); arrays are per sequence.
    Column j of sequence s is the key at position key_starts[s] + j."""
    num_seqs = len(seq_lens)
    key_lens = seq_lens - key_starts
    max_query_len, max_key_len = int(query_lens.max()), int(key_lens.max())
    query_offset = np.minimum(np.arange(max_query_len), query_lens[:, None] - 1)  # [n, max q]
    query_index = query_starts[:, None] + query_offset
    out_index = np.where(np.arange(max_query_len) < query_lens[:, None], query_index, num_tokens)

    columns = np.arange(max_key_len)
    keys = key_starts[:, None] + np.minimum(columns, key_lens[:, None] - 1)  # [n, max L] positions
    slots = np.take_along_axis(tables, keys // block_size, axis=1) * block_size + keys % block_size
    key_index = slots[:, None, :] * num_kv_heads + np.arange(num_kv_heads)[None, :, None]  # [n, K, max L]

    mask = None
    if kind == "decode" and (key_lens != max_key_len).any():
        # A decode's window is exactly its columns (key_starts cut the rest): only padding to hide.
        mask = _additive((columns < key_lens[:, None])[:, None, None, :], dtype, device)
    elif kind == "masked":
        query_pos = (seq_lens - query_lens)[:, None] + query_offset  # [n, max q]
        key_pos = key_starts[:, None, None] + columns[None, None, :]  # [n, 1, max L]
        visible = key_pos <= query_pos[:, :, None]  # [n, max q, max L]
        if window is not None:
            visible &= key_pos > query_pos[:, :, None] - window
        mask = _additive(visible[:, None], dtype, device)

    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a.reshape(-1))).to(device)  # noqa: E731
    return AttentionBox(
        kind=kind,
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        max_seq_len=max_key_len,
        query_index=dev(query_index),
        key_index=dev(key_index),
        out_index=dev(out_index),
        mask=mask,
    )


def _additive(visible: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(torch.from_numpy(~visible).to(device), float("-inf"))


def plan_from_metadata(
    meta, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, window: int | None = None
) -> AttentionPlan:
    """The plan for a metadata built without one (tests, benchmarks): the same build, from the
    metadata's tensors."""
    num_seqs = meta.seq_lens.shape[0]
    query_lens = torch.bincount(meta.token_seq_idx, minlength=num_seqs).cpu().numpy()
    return build_plan(
        query_lens,
        meta.seq_lens.cpu().numpy(),
        meta.block_tables.cpu().numpy(),
        block_size,
        num_kv_heads,
        head_dim,
        dtype,
        meta.seq_lens.device,
        window=window,
    )
