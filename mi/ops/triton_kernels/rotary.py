"""Rotary embedding, half-split ("rotate_half") form, one program per token for q and k both.

Out of place: returns new contiguous q, k (or writes the given outputs); the inputs are read
through their strides (only a unit last-dim stride is required), so q/k views split off a fused
qkv projection are read without a copy and never modified.

Table layout (from mi.ops.rotary.rotary_cos_sin), float32, contiguous:

    cos_sin[max_len, 2, D]:  [p, 0, :] = cos,  [p, 1, :] = sin  at position p

With x = [x1 | x2] (halves of D), out = [x1 * cos1 - x2 * sin1 | x2 * cos2 + x1 * sin2].
cos/sin are rounded to the input dtype first, as the reference does; the products and the sum
are in float32 with one rounding at the end.
"""

import torch
import triton
import triton.language as tl

from mi.ops.triton_kernels import _guard


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    token,
    stride_n,
    stride_h,
    num_heads,
    cos1,
    cos2,
    sin1,
    sin2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    src = x_ptr + token * stride_n + heads * stride_h + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * num_heads * (2 * HALF) + heads * (2 * HALF) + cols
    dtype = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos1 - x2 * sin1).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos2 + x1 * sin2).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    col_mask = cols < HALF
    row = cos_sin_ptr + position * (4 * HALF)  # [2, D] per position
    dtype = q_out_ptr.dtype.element_ty
    cos1 = tl.load(row + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    cos2 = tl.load(row + HALF + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    sin1 = tl.load(row + 2 * HALF + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    sin2 = tl.load(row + 3 * HALF + cols, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        token,
        stride_qn,
        stride_qh,
        num_q_heads,
        cos1,
        cos2,
        sin1,
        sin2,
        HALF,
        BLOCK_QH,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        token,
        stride_kn,
        stride_kh,
        num_k_heads,
        cos1,
        cos2,
        sin1,
        sin2,
        HALF,
        BLOCK_KH,
        BLOCK_HALF,
    )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, K, D], positions [N] (int32/int64, each < max_len), cos_sin
    [max_len, 2, D] float32 -> new rotated (q, k), contiguous, in q's dtype.

    Positions are not range-checked (that would need a device sync)."""
    op = "apply_rotary"
    _guard.check_dtype(op, "q", q, _guard.FLOAT_DTYPES)
    _guard.check_dtype(op, "k", k, _guard.FLOAT_DTYPES)
    _guard.check_same_dtype(op, "q", q, k=k)
    _guard.check_dtype(op, "positions", positions, _guard.INDEX_DTYPES)
    _guard.check_dtype(op, "cos_sin", cos_sin, (torch.float32,))
    _guard.check_ndim(op, "q", q, 3)
    _guard.check_ndim(op, "k", k, 3)
    _guard.check_ndim(op, "positions", positions, 1)
    _guard.check_ndim(op, "cos_sin", cos_sin, 3)
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        _guard.fail(op, f"k must be ({num_tokens}, K, {head_dim}), got {tuple(k.shape)}")
    if positions.shape[0] != num_tokens:
        _guard.fail(op, f"positions must be ({num_tokens},), got {tuple(positions.shape)}")
    if head_dim % 2:
        _guard.fail(op, f"head_dim must be even, got {head_dim}")
    if cos_sin.shape[1:] != (2, head_dim):
        _guard.fail(op, f"cos_sin must be (max_len, 2, {head_dim}), got {tuple(cos_sin.shape)}")
    _guard.check_unit_stride(op, "q", q)
    _guard.check_unit_stride(op, "k", k)
    _guard.check_contiguous(op, "positions", positions)
    _guard.check_contiguous(op, "cos_sin", cos_sin)
    if out is None:
        out = (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
        )
    q_out, k_out = out
    _guard.check_out(op, q_out, tuple(q.shape), q.dtype)
    _guard.check_out(op, k_out, tuple(k.shape), k.dtype)
    _guard.check_device(
        op, _rotary_kernel, q=q, k=k, positions=positions, cos_sin=cos_sin, q_out=q_out, k_out=k_out
    )
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        q_out,
        k_out,
        positions,
        cos_sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        num_q_heads,
        num_k_heads,
        HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
    )
    return q_out, k_out
