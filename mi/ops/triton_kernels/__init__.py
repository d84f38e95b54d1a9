"""Triton versions of the ops in mi/ops, each behind a guard that checks dtypes, shapes, strides
and device before launch (ValueError on a mismatch) and tested against the torch reference.

Importing this package imports triton and decorates the kernels: under TRITON_INTERPRET=1 (read
by triton at that moment) they run on CPU tensors through the interpreter, otherwise they are
compiled for CUDA. mi.ops.dispatch imports it lazily, on the first call that uses triton.
"""

from mi.ops.triton_kernels.kv_cache import write_kv_cache
from mi.ops.triton_kernels.paged_attention import paged_attention
from mi.ops.triton_kernels.rms_norm import rms_norm
from mi.ops.triton_kernels.rotary import apply_rotary
from mi.ops.triton_kernels.silu_and_mul import silu_and_mul

__all__ = ["apply_rotary", "paged_attention", "rms_norm", "silu_and_mul", "write_kv_cache"]
