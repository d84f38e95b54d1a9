"""Vectorized token sampling for a batch of requests with per-row parameters.

Order (vLLM's): float32 logits -> logit_bias -> repetition penalty -> frequency/presence
penalties (mi.ops.penalties) -> greedy rows take the argmax here -> temperature -> top_k ->
top_p -> min_p -> exponential race. Logprobs are of the raw logits (mi.ops.logprobs).

Invariants:
- Randomness is counter-based: the noise for row r is a hash of (seed_r, position_r, token id),
  so a request's tokens depend only on its own logits, parameters, seed and position — never on
  what else is in the batch, on the batch order, or on a preemption that recomputes it. Every
  step below is row-local, and rows that sample are gathered into a sub-batch by index only.
- A row with temperature below GREEDY_TEMPERATURE gets exactly the argmax of its processed
  logits.
- A row whose logits cannot be sampled is reported in `SamplerOutput.failed_rows` with the reason,
  never answered with an arbitrary token: raw logits with a NaN or an infinity (the model's fault),
  or processed logits whose best value is not finite once divided by the temperature (the
  parameters' fault: a NaN or +inf from an extreme penalty, or every token banned). The check is
  two row reductions folded into the one sync, and costs no extra sync when all is well.
- Work that no row needs is skipped, decided with one device-to-host sync per call (top_p adds
  a second, to choose between a top-k window and a full sort).
- Filters cut at a threshold, so a token tied with the last kept one is kept too.
"""

from dataclasses import dataclass, field

import torch

from mi.ops.logprobs import token_logprobs
from mi.ops.penalties import apply_penalties

_TOP_P_WINDOW = 256  # top_p looks for its cut among this many best tokens before sorting all

# Below this temperature a row is greedy. Sampling there is greedy anyway but for near-ties (at
# T = 1e-5 a logit gap of 1e-3 gives exp(-gap / T) = e^-100, below float32's smallest normal),
# and a smaller T is where the division broke: an ordinary logit over 1e-40 (a float32 denormal)
# overflows to inf, and the softmax of a row holding inf is NaN. At 1e-5, float32 holds
# logit / T for any |logit| < 3e33. vLLM draws the same line (_SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5

MODEL_NOT_FINITE = "The model produced NaN or infinite logits for this request."
PARAMS_NOT_FINITE = (
    "No token can be sampled with these parameters: they make the logits NaN or infinite "
    "(an extreme repetition_penalty, for one) or ban every token (min_tokens with stop_token_ids "
    "covering the vocabulary)."
)
_FAILURE_REASONS = (None, MODEL_NOT_FINITE, PARAMS_NOT_FINITE)  # by the codes of _failure_codes

_MASK64 = (1 << 64) - 1


def _to_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_int64(0x9E3779B97F4A7C15)
_MIX1 = _to_int64(0xBF58476D1CE4E5B9)
_MIX2 = _to_int64(0x94D049BB133111EB)
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


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
    # NOTE: float32 rounds (2**24 - 1) + 0.5 up to 2**24, i.e. u = 1 and E = -log(u) = 0: a
    # filtered-out token then scored 0 / 0 = NaN, which argmax takes as the winner. The clamp
    # changes that one value and no other.
    return mantissa.float().add_(0.5).mul_(1.0 / (1 << 24)).clamp_max_(_BELOW_ONE)


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters for one step; every tensor on the logits' device, B rows."""

    temperature: torch.Tensor  # [B] float32, < GREEDY_TEMPERATURE = greedy
    top_p: torch.Tensor  # [B] float32 in (0, 1], 1 = off
    top_k: torch.Tensor  # [B] int64, <= 0 (or >= V) = off
    min_p: torch.Tensor  # [B] float32 in [0, 1], 0 = off
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: the sampled token's position, keys the noise
    repetition_penalty: torch.Tensor | None = None  # [B] float32, 1 = off; None: no row uses it
    presence_penalty: torch.Tensor | None = None  # [B] float32, 0 = off
    frequency_penalty: torch.Tensor | None = None  # [B] float32, 0 = off
    output_counts: torch.Tensor | None = None  # [B, V] int32: times each token was generated
    prompt_mask: torch.Tensor | None = None  # [B, V] bool: token occurs in the prompt
    # (row ids [M] int64, token ids [M] int64, bias [M] float32); -inf bans a token.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    num_top_logprobs: int = -1  # -1: no logprobs; k >= 0: chosen token's logprob + top k

    @property
    def has_penalties(self) -> bool:
        """Whether any row has logit processing before temperature (mi.ops.penalties)."""
        return not (
            self.logit_bias is None
            and self.repetition_penalty is None
            and self.frequency_penalty is None
            and self.presence_penalty is None
        )

    def __post_init__(self):
        num_rows = self.temperature.shape[0]
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seeds",
            "positions",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (num_rows,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected ({num_rows},)")
        uses_counts = self.presence_penalty is not None or self.frequency_penalty is not None
        if uses_counts and self.output_counts is None:
            raise ValueError("presence/frequency penalties need output_counts")
        if self.repetition_penalty is not None and self.output_counts is None and self.prompt_mask is None:
            raise ValueError("repetition_penalty needs prompt_mask and/or output_counts")
        if self.logit_bias is not None and len(self.logit_bias) != 3:
            raise ValueError("logit_bias is (row_ids, token_ids, bias)")
        if self.num_top_logprobs < -1:
            raise ValueError(f"num_top_logprobs={self.num_top_logprobs} must be >= -1")


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: raw log_softmax at the chosen token
    top_ids: torch.Tensor | None  # [B, k] int64, best first
    top_logprobs: torch.Tensor | None  # [B, k] float32, raw log_softmax
    # row -> why it could not be sampled (its token id and logprobs are then meaningless)
    failed_rows: dict[int, str] = field(default_factory=dict)


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
