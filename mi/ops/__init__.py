"""Kernels used by the models.

Each op has a plain-torch reference here; triton versions of the same ops (used on CUDA) are
tested against these references.
"""
from mi.ops.activation import silu_and_mul
from mi.ops.attention import AttentionMetadata, paged_attention, write_kv_cache
from mi.ops.norm import rms_norm
from mi.ops.rotary import apply_rotary, rotary_cos_sin
from mi.ops.sampling import sample

__all__ = [
    "AttentionMetadata", "apply_rotary", "paged_attention", "rms_norm", "rotary_cos_sin",
    "sample", "silu_and_mul", "write_kv_cache",
]
