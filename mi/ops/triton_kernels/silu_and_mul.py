"""SiLU-and-mul: [N, 2I] (gate then up, as mi-convert fuses them) -> silu(gate) * up, [N, I].

Grid: (rows, column tiles). silu is computed in float32 and rounded to the input dtype, then
multiplied by `up` in float32 and rounded once: the same values as the reference's
`F.silu(gate) * up` in the input dtype (a float16/bfloat16 product is exact in float32).
A 2-D input may have any row stride; more dims must be contiguous. The output is contiguous.
"""

import torch
import triton
import triton.language as tl

from mi.ops.triton_kernels import _guard

MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_row, inner_size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner_size
    gate = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_row + inner_size + cols, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inner_size + cols, (act * up.to(tl.float32)).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] -> [..., I] contiguous, same dtype."""
    op = "silu_and_mul"
    _guard.check_dtype(op, "gate_up", gate_up, _guard.FLOAT_DTYPES)
    if gate_up.ndim == 0 or gate_up.shape[-1] % 2:
        _guard.fail(op, f"gate_up's last dim must be even, got shape {tuple(gate_up.shape)}")
    _guard.check_unit_stride(op, "gate_up", gate_up)
    if gate_up.ndim == 2:
        rows = gate_up
    elif gate_up.is_contiguous():
        rows = gate_up.view(-1, gate_up.shape[-1])
    else:
        _guard.fail(
            op, f"gate_up with {gate_up.ndim} dims must be contiguous, got strides {gate_up.stride()}"
        )
    inner_size = gate_up.shape[-1] // 2
    out_shape = (*gate_up.shape[:-1], inner_size)
    if out is None:
        out = torch.empty(out_shape, dtype=gate_up.dtype, device=gate_up.device)
    _guard.check_out(op, out, out_shape, gate_up.dtype)
    _guard.check_device(op, _silu_and_mul_kernel, gate_up=gate_up, out=out)
    if rows.shape[0] == 0 or inner_size == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(inner_size))
    grid = (rows.shape[0], triton.cdiv(inner_size, block))
    _silu_and_mul_kernel[grid](
        rows, out, rows.stride(0), inner_size, BLOCK=block, num_warps=_guard.num_warps_for(block)
    )
    return out
