"""A frozen copy of the sampler as it was before it sampled on candidates (mi/ops/sampling.py
and mi/ops/penalties.py at 4395500, plus the fix that keeps the noise below 1): the oracle that
tests/unit/test_sampling_candidates.py holds the sampler to, token for token, and the "old" side
of benchmarks/bench_sampling.py.

Do not edit: it is the reference. Only the dataclasses, the constants and the logprobs module are
shared with the live sampler.
"""

import torch

from mi.ops.logprobs import token_logprobs
from mi.ops.sampling import (
    GREEDY_TEMPERATURE,
    MODEL_NOT_FINITE,
    PARAMS_NOT_FINITE,
    SamplerOutput,
    SamplingTensors,
)

_TOP_P_WINDOW = 256
_FAILURE_REASONS = (None, MODEL_NOT_FINITE, PARAMS_NOT_FINITE)

_MASK64 = (1 << 64) - 1


def _to_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_int64(0x9E3779B97F4A7C15)
_MIX1 = _to_int64(0xBF58476D1CE4E5B9)
_MIX2 = _to_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits).bitwise_and_((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser, elementwise; returns a new tensor."""
    # int64 multiplication wraps modulo 2**64, which is what the mixer needs.
    # NOTE: `x + _GOLDEN` makes the copy that the in-place steps below then own ([B, V] passes
    # dominate sampling on CPU; in place they run about twice as fast).
    x = x + _GOLDEN
    x ^= _shift_right(x, 30)
    x *= _MIX1
    x ^= _shift_right(x, 27)
    x *= _MIX2
    x ^= _shift_right(x, 31)
    return x


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seed, position, token id)."""
    row = _splitmix64(_splitmix64(seeds) ^ positions)  # [B]
    token = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    bits = _splitmix64(row[:, None] ^ token[None, :])
    mantissa = _shift_right(bits, 40)  # 24 random bits
    return mantissa.float().add_(0.5).mul_(1.0 / (1 << 24)).clamp_max_(1.0 - 2.0**-24)


def sample(logits: torch.Tensor, st: SamplingTensors) -> SamplerOutput:
    """logits [B, V] (float32, bf16 or fp16) -> one token per row, plus raw logprobs if asked."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:  # a step whose rows all prefill without sampling
        return _empty_output(logits, st.num_top_logprobs)
    processed = apply_penalties(logits, st)  # [B, V] float32

    do_sample = st.temperature >= GREEDY_TEMPERATURE
    use_top_k = do_sample & (st.top_k > 0) & (st.top_k < vocab_size)
    use_top_p = do_sample & (st.top_p < 1)
    use_min_p = do_sample & (st.min_p > 0)
    # NOTE: one device-to-host sync for every decision below: which rows sample, which fail, the
    # largest active top_k (0: none) and whether any row uses top_p / min_p.
    flags = torch.cat(
        [
            do_sample.long(),
            _failure_codes(logits, processed, st, do_sample),
            torch.where(use_top_k, st.top_k, 0).amax(0, keepdim=True),
            torch.stack([use_top_p.any(), use_min_p.any()]).long(),
        ]
    ).cpu()
    failure_codes = flags[num_rows : 2 * num_rows]
    # A failed row is left out of sampling: it takes the (meaningless) argmax path.
    is_sampled = flags[:num_rows].bool() & (failure_codes == 0)
    max_k, any_top_p, any_min_p = flags[2 * num_rows :].tolist()
    num_sampled = int(is_sampled.sum())
    failed_rows = {}
    if failure_codes.any():
        failed_rows = {row: _FAILURE_REASONS[code] for row, code in enumerate(failure_codes.tolist()) if code}

    if num_sampled < num_rows:
        token_ids = processed.argmax(dim=-1)
    if num_sampled > 0:
        rows = None
        if num_sampled < num_rows:
            rows = is_sampled.nonzero().squeeze(1).to(logits.device)
        sub = _RowSubset(rows)
        scaled = sub(processed) / sub(st.temperature)[:, None]
        if max_k > 0:
            scaled = _apply_top_k(scaled, sub(st.top_k), sub(use_top_k), max_k)
        probs = scaled.softmax(dim=-1)  # never renormalised below: the race is scale-free
        if any_top_p:
            cut = _top_p_cut(probs, sub(st.top_p), sub(use_top_p))
            probs = probs.masked_fill(probs < cut[:, None], 0.0)
        if any_min_p:
            cut = sub(st.min_p) * probs.amax(dim=-1)
            probs = probs.masked_fill(probs < cut[:, None], 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        exp_noise = uniform_noise(sub(st.seeds), sub(st.positions), vocab_size).log_().neg_()
        sampled = (probs / exp_noise).argmax(dim=-1)
        token_ids = sampled if rows is None else token_ids.index_copy(0, rows, sampled)

    if st.num_top_logprobs < 0:
        return SamplerOutput(token_ids, None, None, None, failed_rows)
    chosen, top_ids, top_logprobs = token_logprobs(logits, token_ids, st.num_top_logprobs)
    return SamplerOutput(token_ids, chosen, top_ids, top_logprobs, failed_rows)


def _failure_codes(
    logits: torch.Tensor, processed: torch.Tensor, st: SamplingTensors, do_sample: torch.Tensor
) -> torch.Tensor:
    """[B] int64: 0 = the row can be sampled, else an index into _FAILURE_REASONS.

    NaN propagates through min and max, so the raw row's (min, max) is finite exactly when every
    raw logit is. The processed row may hold -inf (a banned token) but its best value divided by
    the temperature must be finite: then the softmax of the scaled row is well defined.
    """
    lowest, highest = torch.aminmax(logits, dim=-1)
    model_ok = lowest.isfinite() & highest.isfinite()
    best = processed.amax(dim=-1) if st.has_penalties else highest.float()
    params_ok = (best / torch.where(do_sample, st.temperature, 1.0)).isfinite()
    return torch.where(model_ok, torch.where(params_ok, 0, 2), 1)


def _empty_output(logits: torch.Tensor, k: int) -> SamplerOutput:
    token_ids = torch.zeros(0, dtype=torch.int64, device=logits.device)
    if k < 0:
        return SamplerOutput(token_ids, None, None, None)
    return SamplerOutput(
        token_ids,
        torch.zeros(0, device=logits.device),
        torch.zeros(0, k, dtype=torch.int64, device=logits.device),
        torch.zeros(0, k, device=logits.device),
    )


class _RowSubset:
    """Selects the sampled rows of a per-row tensor (all of them when rows is None)."""

    def __init__(self, rows: torch.Tensor | None):
        self.rows = rows

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.rows is None else value.index_select(0, self.rows)


def _apply_top_k(
    scaled: torch.Tensor, top_k: torch.Tensor, use_top_k: torch.Tensor, max_k: int
) -> torch.Tensor:
    """Masks to -inf every logit below the row's k-th largest; max_k is the largest active k."""
    top_values = scaled.topk(max_k, dim=-1).values  # [S, max_k], best first
    kth = top_values.gather(1, (top_k.clamp(1, max_k) - 1)[:, None])  # [S, 1]
    return scaled.masked_fill(use_top_k[:, None] & (scaled < kth), float("-inf"))


def _top_p_cut(probs: torch.Tensor, top_p: torch.Tensor, use_top_p: torch.Tensor) -> torch.Tensor:
    """probs [S, V] -> [S] smallest probability each row keeps: the shortest best-first prefix
    whose mass reaches top_p (0 for rows without top_p).

    Most nuclei fit in the best _TOP_P_WINDOW tokens, where a top-k replaces the full sort. The
    window's prefix sums are the first entries of the full ones, computed the same way, so a row
    gets the same cut whichever path its batch takes.
    """
    vocab_size = probs.shape[-1]
    head = probs.topk(min(_TOP_P_WINDOW, vocab_size), dim=-1).values  # [S, W], best first
    head_mass = head.cumsum(dim=-1)
    sorted_probs, mass = head, head_mass
    # NOTE: a second sync, only for top_p: does every nucleus end inside the window?
    if head.shape[-1] < vocab_size and not bool((~use_top_p | (head_mass[:, -1] >= top_p)).all()):
        tail = probs.sort(dim=-1, descending=True).values[:, head.shape[-1] :]  # [S, V - W]
        sorted_probs = torch.cat([head, tail], dim=-1)
        mass = torch.cat([head_mass, head_mass[:, -1:] + tail.cumsum(dim=-1)], dim=-1)
    mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
    num_kept = (mass_before < top_p[:, None]).sum(dim=-1).clamp(min=1)  # the top token stays
    cut = sorted_probs.gather(1, (num_kept - 1)[:, None]).squeeze(1)
    return torch.where(use_top_p, cut, 0.0)


def apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [B, V] any float dtype -> processed logits [B, V] float32.

    May return `logits` itself when it is float32 and there is nothing to apply: never write to
    the result in place.
    """
    out = logits.float()
    if not st.has_penalties:
        return out
    if out is logits:
        out = out.clone()
    _check_vocab_shapes(out, st)

    if st.logit_bias is not None:
        row_ids, token_ids, bias = st.logit_bias
        # accumulate=True sums duplicate (row, token) entries instead of keeping an arbitrary one.
        out.index_put_((row_ids, token_ids), bias.float(), accumulate=True)

    was_generated = None  # [B, V] bool, only built when a penalty reads it
    needs_generated = st.repetition_penalty is not None or st.presence_penalty is not None
    if needs_generated and st.output_counts is not None:
        was_generated = st.output_counts > 0
    if st.repetition_penalty is not None:
        seen = _or(st.prompt_mask, was_generated)
        penalty = st.repetition_penalty[:, None]
        # Positive logits divided, negative multiplied. NOTE: the clamp form is bit-identical to
        # where(out > 0, out / penalty, out * penalty) but branch-free: on CPU a where() over a
        # mask of random signs runs ~7x slower.
        penalized = out.clamp_min(0).div_(penalty).add_(out.clamp_max(0).mul_(penalty))
        out = torch.where(seen, penalized, out)

    if st.frequency_penalty is not None:
        out -= st.output_counts.float().mul_(st.frequency_penalty[:, None])
    if st.presence_penalty is not None:
        out -= was_generated * st.presence_penalty[:, None]
    return out


def _or(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """Elementwise or of two [B, V] bool masks, either (not both) of which may be None."""
    if a is None or b is None:
        return b if a is None else a
    return a | b


def _check_vocab_shapes(logits: torch.Tensor, st: SamplingTensors) -> None:
    for name in ("output_counts", "prompt_mask"):
        value = getattr(st, name)
        if value is not None and value.shape != logits.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, logits {tuple(logits.shape)}")
