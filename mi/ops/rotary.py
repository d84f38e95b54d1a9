"""Rotary position embedding (the half-split "rotate_half" form used by Llama-family checkpoints)."""

import math

import torch


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rotary_cos_sin(
    head_dim: int, max_len: int, theta: float, scaling: dict | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Table [max_len, 2, head_dim]: cos and sin for every position, in float32."""
    inv_freq = _inv_freq(head_dim, theta, scaling)
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [max_len, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    return torch.stack((emb.cos(), emb.sin()), dim=1).to(device)


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
