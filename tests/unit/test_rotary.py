"""The reference rotary against Hugging Face's formula, and the per-step rows the worker shares."""

import pytest
import torch

from mi.ops import rotary


def _hf_rotary(q, k, positions, cos_sin):
    # transformers' apply_rotary_pos_emb with its rotate_half, written out.
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    table = cos_sin[positions]
    cos, sin = table[:, 0, None, :].to(q.dtype), table[:, 1, None, :].to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "scaling", [None, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}]
)
def test_equals_hugging_face_bit_for_bit(dtype, scaling):
    gen = torch.Generator().manual_seed(0)
    num_tokens, head_dim = 37, 64
    cos_sin = rotary.rotary_cos_sin(head_dim, 512, 10000.0, scaling)
    # q and k as the model makes them: strided views into one fused projection output.
    qkv = torch.randn(num_tokens, (8 + 2 * 2) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : 8 * head_dim].view(num_tokens, 8, head_dim)
    k = qkv[:, 8 * head_dim : 10 * head_dim].view(num_tokens, 2, head_dim)
    positions = torch.randint(0, 512, (num_tokens,), generator=gen)
    want_q, want_k = _hf_rotary(q, k, positions, cos_sin)
    rows = rotary.rotary_rows(cos_sin, positions, dtype)
    for got_q, got_k in (
        rotary.apply_rotary(q, k, positions, cos_sin),
        rotary.apply_rotary(q, k, None, None, rows),
    ):
        assert got_q.dtype == got_k.dtype == dtype
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_rows_leave_the_table_untouched():
    cos_sin = rotary.rotary_cos_sin(8, 16, 10000.0)
    before = cos_sin.clone()
    rows = rotary.rotary_rows(cos_sin, torch.tensor([3, 3, 5]), torch.float32)
    assert torch.equal(cos_sin, before)
    assert rows.shape == (3, 2, 1, 8)
    assert torch.equal(rows[:, 0, 0], cos_sin[[3, 3, 5], 0])
    assert torch.equal(rows[:, 1, 0, :4], -cos_sin[[3, 3, 5], 1, :4])
    assert torch.equal(rows[:, 1, 0, 4:], cos_sin[[3, 3, 5], 1, 4:])
