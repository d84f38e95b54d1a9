"""Rotary position embedding (the half-split "rotate_half" form used by Llama-family checkpoints)."""

import torch

from mi.ops.rope_scaling import LENGTH_DEPENDENT, inv_freq_and_scale, inv_freq_for_lengths, rope_type


def _cos_sin(freqs: torch.Tensor, scale: float) -> torch.Tensor:
    """freqs [N, D/2] (position x inverse frequency, float32) -> [N, 2, D]: cos, sin (x scale)."""
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return torch.stack((cos, sin), dim=1)


def rotary_cos_sin(
    head_dim: int,
    max_len: int,
    theta: float,
    scaling: dict | None = None,
    device: torch.device | str = "cpu",
    max_position_embeddings: int | None = None,
) -> torch.Tensor:
    """Table [max_len, 2, head_dim]: cos and sin for every position, in float32. For the
    length-dependent types (mi/ops/rope_scaling.py) the table of sequences within the original
    context; longer ones take `token_cos_sin`."""
    inv_freq, scale = inv_freq_and_scale(head_dim, theta, scaling, max_position_embeddings or max_len)
    positions = torch.arange(max_len, dtype=torch.float32)
    return _cos_sin(positions[:, None] * inv_freq[None, :], scale).to(device)


def is_length_dependent(scaling: dict | None) -> bool:
    return rope_type(scaling) in LENGTH_DEPENDENT


def token_cos_sin(
    head_dim: int,
    theta: float,
    scaling: dict,
    max_position_embeddings: int,
    positions: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """[N, 2, head_dim] float32 for the length-dependent types: token i at positions[i] of a
    sequence whose length is lengths[i] (prompt length for prompt tokens, else position + 1)."""
    inv_freq, scale = inv_freq_for_lengths(head_dim, theta, scaling, max_position_embeddings, lengths.cpu())
    return _cos_sin(positions.cpu().float()[:, None] * inv_freq, scale).to(positions.device)


def rotary_rows(cos_sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, 2, 1, D] in `dtype`: cos, and sin with its first half negated, at each token's position.

    What the reference `apply_rotary` reads. The worker gathers it once per step (every layer
    rotates at the same positions); folding the sign of rotate_half into sin lets a rotation
    be a roll, 4 ops instead of 7 plus the gather."""
    rows = cos_sin[positions].to(dtype)  # a fresh copy: safe to negate in place
    rows[:, 1, : rows.shape[-1] // 2].neg_()
    return rows[:, :, None, :]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # rotate_half(x) * sin == roll(x, D/2) * signed_sin, value for value (a negation is exact),
    # so the result equals Hugging Face's bit for bit.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, K, D], positions [N] -> rotated q, k (same shapes and dtypes).
    `rows`: the step's `rotary_rows` when the caller has them (else gathered here)."""
    if rows is None:
        rows = rotary_rows(cos_sin, positions, q.dtype)
    cos, signed_sin = rows[:, 0], rows[:, 1]  # [N, 1, D]
    return _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin)
