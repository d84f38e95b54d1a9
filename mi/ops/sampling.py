"""Vectorized token sampling for a batch of requests with per-row parameters.

Randomness is counter-based: the noise for row r is a hash of (seed_r, position_r, token id),
so a request's tokens depend only on its own seed and position — never on what else is in the
batch, on the batch order, or on a preemption that recomputes it.
"""
import torch

_MASK64 = (1 << 64) - 1


def _to_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_int64(0x9E3779B97F4A7C15)
_MIX1 = _to_int64(0xBF58476D1CE4E5B9)
_MIX2 = _to_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, which is what the mixer needs.
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seed, position, token id)."""
    row = _splitmix64(_splitmix64(seeds) ^ positions)  # [B]
    token = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    bits = _splitmix64(row[:, None] ^ token[None, :])
    mantissa = _shift_right(bits, 40)  # 24 random bits
    return (mantissa.float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           top_k: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float; per-row temperature (0 = greedy), top_p (1 = off), top_k (<= 0 = off),
    seeds and positions (int64). Returns token ids [B] int64."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    is_greedy = temperature <= 0
    if bool(is_greedy.all()):
        return greedy

    scaled = logits / torch.where(is_greedy, 1.0, temperature)[:, None]
    vocab_size = scaled.shape[-1]
    needs_filter = bool(((top_k > 0) & (top_k < vocab_size)).any()) or bool((top_p < 1).any())
    if needs_filter:
        sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab_size, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
        drop = rank >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, sorted_ids, sorted_logits)

    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
    probs = scaled.softmax(dim=-1)
    exp_noise = -torch.log(uniform_noise(seeds, positions, vocab_size))
    sampled = (probs / exp_noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy, sampled)
