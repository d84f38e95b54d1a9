"""Launch guards shared by the kernel wrappers.

Every check runs on tensor metadata only (dtype, shape, stride, device), never on values, so a
guard costs no device sync. A failed check raises ValueError naming the op and the argument.
"""

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = "/".join(str(d).removeprefix("torch.") for d in allowed)
        fail(op, f"{name} must be {names}, got {t.dtype}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if t.ndim != ndim:
        fail(op, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            fail(op, f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_unit_stride(op: str, name: str, t: torch.Tensor) -> None:
    if t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(op, f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        fail(op, f"{name} must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")


def check_out(op: str, out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        fail(op, f"out must be {tuple(shape)} {dtype}, got {tuple(out.shape)} {out.dtype}")
    check_contiguous(op, "out", out)


def is_compiled(kernel) -> bool:
    """False when the kernel was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return isinstance(kernel, triton.runtime.JITFunction)


def check_device(op: str, kernel, **tensors: torch.Tensor) -> None:
    """All tensors on one device; a compiled kernel also needs that device to be a GPU."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            fail(op, f"{name} is on {device} but {first_name} is on {first}")
    if is_compiled(kernel) and first.type != "cuda":
        fail(
            op,
            f"tensors are on {first}; the compiled kernel needs CUDA "
            "(set TRITON_INTERPRET=1 before importing mi.ops.triton_kernels to run on CPU)",
        )


def num_warps_for(block: int) -> int:
    """Warps for a 1-D row kernel over `block` elements."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
