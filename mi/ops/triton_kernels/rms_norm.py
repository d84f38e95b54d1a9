"""RMSNorm over the last dim, one program per row.

Same arithmetic as the reference (mi/ops/norm.py): sum of squares and rsqrt in float32, the
normalized row cast to the input dtype, then multiplied by the weight. The final multiply is done
in float32 and rounded once, which equals a multiply in the input dtype because the product of
two float16/bfloat16 numbers is exact in float32.

Input layout: up to 3 dims with any strides except a unit last-dim stride, so a [N, H, D] view
split off a fused qkv projection (q/k norm) is read in place; more dims must be contiguous.
The output is always a new (or the given) contiguous tensor.
"""

import torch
import triton
import triton.language as tl

from mi.ops.triton_kernels import _guard

MAX_HIDDEN = 1 << 16  # one row must fit one program


@triton.jit
def _rms_norm_kernel(
    x_ptr, weight_ptr, out_ptr, inner_size, stride_outer, stride_inner, hidden, eps, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // inner_size) * stride_outer + (row % inner_size) * stride_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden
    normed = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., hidden], weight [hidden] (same dtype) -> [..., hidden] contiguous, x's dtype."""
    op = "rms_norm"
    _guard.check_dtype(op, "x", x, _guard.FLOAT_DTYPES)
    _guard.check_dtype(op, "weight", weight, _guard.FLOAT_DTYPES)
    _guard.check_same_dtype(op, "x", x, weight=weight)
    if x.ndim == 0:
        _guard.fail(op, "x must have at least 1 dim")
    hidden = x.shape[-1]
    if tuple(weight.shape) != (hidden,):
        _guard.fail(op, f"weight must be ({hidden},), got {tuple(weight.shape)}")
    if not 1 <= hidden <= MAX_HIDDEN:
        _guard.fail(op, f"hidden size must be in 1..{MAX_HIDDEN}, got {hidden}")
    _guard.check_contiguous(op, "weight", weight)
    _guard.check_unit_stride(op, "x", x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _guard.check_out(op, out, tuple(x.shape), x.dtype)
    _guard.check_device(op, _rms_norm_kernel, x=x, weight=weight, out=out)

    if x.ndim == 1:
        x3 = x[None, None]
    elif x.ndim == 2:
        x3 = x[:, None]
    elif x.ndim == 3:
        x3 = x
    elif x.is_contiguous():
        x3 = x.view(-1, 1, hidden)
    else:
        _guard.fail(op, f"x with {x.ndim} dims must be contiguous, got strides {x.stride()}")
    num_rows = x3.shape[0] * x3.shape[1]
    if num_rows == 0:
        return out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x3,
        weight,
        out,
        x3.shape[1],
        x3.stride(0),
        x3.stride(1),
        hidden,
        float(eps),
        BLOCK=block,
        num_warps=_guard.num_warps_for(block),
    )
    return out
