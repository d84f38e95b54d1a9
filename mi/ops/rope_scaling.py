"""RoPE frequency variants: the inverse frequencies and the cos/sin scale of each `rope_scaling`
type that transformers' Llama family accepts (its `modeling_rope_utils`, our reference).

    type      inverse frequencies                                  depends on the sequence's length
    default   theta^(-2i/D)                                        no
    linear    default / factor                                     no
    llama3    long wavelengths / factor, a smooth ramp between     no
    yarn      a ramp between default and default / factor;         no
              cos and sin scaled by the attention factor
    longrope  default / short_factor[i], or / long_factor[i] once  yes: the sequence's length
              the sequence is past original_max_position_embeddings;
              cos and sin scaled by the attention factor
    dynamic   default with theta grown for lengths past            yes: the sequence's length
              max_position_embeddings (NTK-aware)

For the length-dependent types, "the sequence's length" of a token is what Hugging Face uses
when it generates one sequence: the prompt's length for prompt tokens, position + 1 for the
tokens after it. Tokens keep the rotation they were cached with, as in HF.
"""

import math

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
LENGTH_DEPENDENT = ("longrope", "dynamic")
_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "dynamic": ("factor",),
}


def rope_type(scaling: dict | None) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type")) or "default"


def check_rope_scaling(scaling: dict | None, head_dim: int) -> None:
    """Raises ValueError (naming the type or the field) for a `rope_scaling` we cannot serve."""
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    missing = [name for name in _REQUIRED.get(kind, ()) if scaling.get(name) is None]
    if kind == "yarn" and scaling.get("factor") is None:
        missing.append("factor")  # HF derives it from max/original only for DeepSeek-style configs
    if missing:
        raise ValueError(f"rope_scaling type {kind!r} needs {', '.join(missing)}")
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            if len(scaling[name]) != head_dim // 2:
                have, need = len(scaling[name]), head_dim // 2
                raise ValueError(f"rope_scaling {name} has {have} values, head_dim {head_dim} needs {need}")
    if scaling and scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_scaling partial_rotary_factor other than 1 is not supported")


def _default(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(num_rotations: float) -> float:
        # The dimension whose wavelength turns `num_rotations` times over the original context.
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a width
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def _longrope_attention_factor(scaling: dict, max_position_embeddings: int) -> float:
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return float(attention_factor)


def _longrope(head_dim: int, theta: float, scaling: dict, long: bool) -> torch.Tensor:
    factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (factors * theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def inv_freq_and_scale(
    head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """The position-independent part: inverse frequencies [D/2] (float32) and the cos/sin scale.
    For the length-dependent types, those of sequences within the original context."""
    kind = rope_type(scaling)
    check_rope_scaling(scaling, head_dim)
    inv_freq = _default(head_dim, theta)
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    if kind == "longrope":
        return _longrope(head_dim, theta, scaling, long=False), _longrope_attention_factor(
            scaling, max_position_embeddings
        )
    return inv_freq, 1.0  # default; dynamic below its threshold


def inv_freq_for_lengths(
    head_dim: int, theta: float, scaling: dict, max_position_embeddings: int, lengths: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The length-dependent types: inverse frequencies [N, D/2] for sequences of `lengths` [N],
    and the cos/sin scale. Runs per step on the worker: no validation (mi-convert did it)."""
    kind = rope_type(scaling)
    if kind == "longrope":
        is_long = (lengths > scaling["original_max_position_embeddings"])[:, None]
        inv_freq = torch.where(
            is_long, _longrope(head_dim, theta, scaling, True), _longrope(head_dim, theta, scaling, False)
        )
        return inv_freq, _longrope_attention_factor(scaling, max_position_embeddings)
    if kind != "dynamic":
        raise ValueError(f"rope_scaling type {kind!r} does not depend on the sequence's length")
    # NTK-aware: theta grows with the length past max_position_embeddings (in float64 as HF's
    # Python floats, then float32 for the power as HF's tensor op).
    factor = float(scaling["factor"])
    length = lengths.to(torch.float64).clamp(min=max_position_embeddings)
    grown = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [D/2]
    return 1.0 / torch.pow(grown.to(torch.float32)[:, None], exponent[None, :]), 1.0
