"""Per-call choice between the triton kernels and the torch references, same signatures as the
references.

A call goes to triton when its first tensor is on CUDA and mi.ops.triton_kernels imports, or
always after `force_triton(True)` (the workers of a backend started with MI_FORCE_TRITON=1, and
tests; with TRITON_INTERPRET=1 on CPU); otherwise to the reference. The kernels are imported on
the first triton call, so a CPU-only process never imports triton. A triton call whose
arguments the kernel does not take (dtype, strides) raises the guard's ValueError rather than
falling back silently.
"""

from functools import cache
from types import ModuleType

import torch

from mi.ops import activation, attention, norm, rotary
from mi.ops.attention import AttentionMetadata

FORCE_TRITON = False  # set once per process by force_triton (tests may set it directly)


def force_triton(enabled: bool) -> None:
    """Run every dispatched op in triton, whatever the device (the worker's MI_FORCE_TRITON)."""
    global FORCE_TRITON
    FORCE_TRITON = enabled


@cache
def _triton_kernels() -> ModuleType | None:
    try:
        import mi.ops.triton_kernels as kernels
    except ImportError as exc:
        if not (exc.name or "").startswith("triton"):
            raise
        return None
    return kernels


def kernels_for(t: torch.Tensor) -> ModuleType | None:
    """The triton kernel module when a call on `t` should use it, else None (use the reference)."""
    if FORCE_TRITON:
        kernels = _triton_kernels()
        if kernels is None:
            raise RuntimeError("triton is forced (MI_FORCE_TRITON=1) but cannot be imported")
        return kernels
    return _triton_kernels() if t.is_cuda else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernels = kernels_for(x)
    return kernels.rms_norm(x, weight, eps) if kernels else norm.rms_norm(x, weight, eps)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` (the step's rotary.rotary_rows) only serve the reference; the kernel reads the table."""
    kernels = kernels_for(q)
    if kernels:
        return kernels.apply_rotary(q, k, positions, cos_sin)
    return rotary.apply_rotary(q, k, positions, cos_sin, rows)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    kernels = kernels_for(gate_up)
    return kernels.silu_and_mul(gate_up) if kernels else activation.silu_and_mul(gate_up)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    kernels = kernels_for(q)
    if kernels:
        return kernels.paged_attention(q, k_cache, v_cache, meta, scale, window=window)
    return attention.paged_attention(q, k_cache, v_cache, meta, scale, window)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    kernels = kernels_for(k)
    impl = kernels.write_kv_cache if kernels else attention.write_kv_cache
    impl(k, v, k_cache, v_cache, slot_mapping)
