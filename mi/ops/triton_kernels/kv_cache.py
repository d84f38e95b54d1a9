"""Store this step's keys and values into the paged KV cache, one program per new token.

Token n's K/V heads [K, D] go to cache row `slot_mapping[n]` of the cache viewed as
[num_blocks * block_size, K, D] (see mi/ops/attention.py for the layout). In place. k and v are
read through their strides (unit last-dim stride), so views split off a fused qkv projection are
stored without a copy. Slots are not range-checked (that would need a device sync).
"""

import torch
import triton
import triton.language as tl

from mi.ops.triton_kernels import _guard


@triton.jit
def _write_kv_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_K)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM)
    dst = slot * (num_kv_heads * HEAD_DIM) + heads * HEAD_DIM + dims
    k = tl.load(k_ptr + token * stride_kn + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vn + heads * stride_vh + dims, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [N, K, D] -> k_cache, v_cache [num_blocks, block_size, K, D] at slot_mapping [N]."""
    op = "write_kv_cache"
    tensors = {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache}
    for name, t in tensors.items():
        _guard.check_dtype(op, name, t, _guard.FLOAT_DTYPES)
    _guard.check_same_dtype(op, "k", k, v=v, k_cache=k_cache, v_cache=v_cache)
    _guard.check_dtype(op, "slot_mapping", slot_mapping, _guard.INDEX_DTYPES)
    _guard.check_ndim(op, "k", k, 3)
    _guard.check_ndim(op, "k_cache", k_cache, 4)
    _guard.check_ndim(op, "slot_mapping", slot_mapping, 1)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape:
        _guard.fail(op, f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if v_cache.shape != k_cache.shape or k_cache.shape[2:] != (num_kv_heads, head_dim):
        _guard.fail(
            op,
            f"caches must both be (num_blocks, block_size, {num_kv_heads}, {head_dim}),"
            f" got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}",
        )
    if slot_mapping.shape[0] != num_tokens:
        _guard.fail(op, f"slot_mapping must be ({num_tokens},), got {tuple(slot_mapping.shape)}")
    _guard.check_unit_stride(op, "k", k)
    _guard.check_unit_stride(op, "v", v)
    _guard.check_contiguous(op, "k_cache", k_cache)
    _guard.check_contiguous(op, "v_cache", v_cache)
    _guard.check_contiguous(op, "slot_mapping", slot_mapping)
    _guard.check_device(op, _write_kv_cache_kernel, slot_mapping=slot_mapping, **tensors)
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_K=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
