"""Kernels used by the models.

Each op has a plain-torch reference (attention.py, norm.py, rotary.py, activation.py); the
dispatching versions exported here run the triton kernels (mi/ops/triton_kernels/) on CUDA and
the references elsewhere.
"""

from mi.ops.attention import AttentionMetadata
from mi.ops.dispatch import apply_rotary, paged_attention, rms_norm, silu_and_mul, write_kv_cache
from mi.ops.rotary import rotary_cos_sin, rotary_rows
from mi.ops.sampling import sample

__all__ = [
    "AttentionMetadata",
    "apply_rotary",
    "paged_attention",
    "rms_norm",
    "rotary_cos_sin",
    "rotary_rows",
    "sample",
    "silu_and_mul",
    "write_kv_cache",
]
