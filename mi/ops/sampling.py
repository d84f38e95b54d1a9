"""Vectorized token sampling for a batch of requests with per-row parameters.

Order (vLLM's): float32 logits -> logit_bias -> repetition penalty -> frequency/presence
penalties (mi.ops.penalties) -> the structured-output mask of constrained rows (xgrammar's
bitmask) -> greedy rows take the argmax here -> temperature -> top_k ->
top_p -> min_p -> exponential race (mi.ops.draw, on each row's few candidates where the filters
leave few). Logprobs are of the raw logits (mi.ops.logprobs), computed only when asked.

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
- Work that no row needs is skipped, decided with one device-to-host sync per call; mi.ops.draw
  adds one per candidate width it tries (usually one), and penalties one on a GPU (nonzero).
"""

from dataclasses import dataclass, field

import torch

from mi.ops.draw import DrawParams, DrawPlan, candidate_top_k, draw, row_argmax
from mi.ops.logprobs import token_logprobs
from mi.ops.penalties import apply_penalties

# Below this temperature a row is greedy. Sampling there is greedy anyway but for near-ties (at
# T = 1e-5 a logit gap of 1e-3 gives exp(-gap / T) = e^-100, below float32's smallest normal),
# and a smaller T is where the division broke: an ordinary logit over 1e-40 (a float32 denormal)
# overflows to inf, and the softmax of a row holding inf is NaN. At 1e-5, float32 holds
# logit / T for any |logit| < 3e33. vLLM draws the same line (_SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5

MODEL_NOT_FINITE = "The model produced NaN or infinite logits for this request."
PARAMS_NOT_FINITE = (
    "No token can be sampled with these parameters: they make the logits NaN or infinite, or "
    "ban every token (min_tokens with stop_token_ids covering the vocabulary)."
)
_FAILURE_REASONS = (None, MODEL_NOT_FINITE, PARAMS_NOT_FINITE)  # by the codes of _failure_codes


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
    # Structured output: (rows [M] int64, xgrammar bitmask [M, ceil(V / 32)] int32) of the
    # constrained rows; a token whose bit is 0 gets -inf. None: no row is constrained.
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def has_penalties(self) -> bool:
        """Whether any row has logit processing before temperature (mi.ops.penalties, the
        structured-output mask)."""
        return not (
            self.logit_bias is None
            and self.repetition_penalty is None
            and self.frequency_penalty is None
            and self.presence_penalty is None
            and self.token_bitmask is None
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
    if st.token_bitmask is not None:
        processed = _apply_token_bitmask(processed, *st.token_bitmask)

    do_sample = st.temperature >= GREEDY_TEMPERATURE
    use_top_k = do_sample & (st.top_k > 0) & (st.top_k < vocab_size)
    use_top_p = do_sample & (st.top_p < 1)
    use_min_p = do_sample & (st.min_p > 0)
    # NOTE: one device-to-host sync for every decision below: which rows sample, which fail, the
    # largest active top_k (0: none) and the largest that makes few enough candidates, whether
    # any row uses top_p / min_p, and whether one uses either without top_k.
    flags = torch.cat(
        [
            do_sample.long(),
            _failure_codes(logits, processed, st, do_sample),
            torch.where(use_top_k, st.top_k, 0).amax(0, keepdim=True),
            candidate_top_k(st.top_k, use_top_k, vocab_size).amax(0, keepdim=True),
            torch.stack(
                [use_top_p.any(), use_min_p.any(), ((use_top_p | use_min_p) & ~use_top_k).any()]
            ).long(),
        ]
    ).cpu()
    failure_codes = flags[num_rows : 2 * num_rows]
    # A failed row is left out of sampling: it takes the (meaningless) argmax path.
    is_sampled = flags[:num_rows].bool() & (failure_codes == 0)
    max_k, max_candidate_k, any_top_p, any_min_p, any_window = flags[2 * num_rows :].tolist()
    num_sampled = int(is_sampled.sum())
    failed_rows = {}
    if failure_codes.any():
        failed_rows = {row: _FAILURE_REASONS[code] for row, code in enumerate(failure_codes.tolist()) if code}

    if num_sampled < num_rows:
        token_ids = row_argmax(processed)
    if num_sampled > 0:
        rows = None
        if num_sampled < num_rows:
            rows = is_sampled.nonzero().squeeze(1).to(logits.device)
        params = DrawParams(
            st.temperature, st.top_k, use_top_k, st.top_p, use_top_p, st.min_p, st.seeds, st.positions
        )
        plan = DrawPlan(max_k, max_candidate_k, bool(any_top_p), bool(any_min_p), bool(any_window))
        if rows is None:
            token_ids = draw(processed, params, plan)
        else:
            sampled = draw(processed.index_select(0, rows), params.take(rows), plan)
            token_ids = token_ids.index_copy(0, rows, sampled)

    if st.num_top_logprobs < 0:
        return SamplerOutput(token_ids, None, None, None, failed_rows)
    chosen, top_ids, top_logprobs = token_logprobs(logits, token_ids, st.num_top_logprobs)
    return SamplerOutput(token_ids, chosen, top_ids, top_logprobs, failed_rows)


def _apply_token_bitmask(processed: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf at the tokens each constrained row's grammar forbids, in place (xgrammar's kernel:
    C++ on CPU, its own on CUDA). `processed` is apply_penalties' copy, never the raw logits
    (has_penalties counts the mask): logprobs are of those."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(processed, bitmask.to(processed.device), indices=rows.tolist())
    return processed


def _failure_codes(
    logits: torch.Tensor, processed: torch.Tensor, st: SamplingTensors, do_sample: torch.Tensor
) -> torch.Tensor:
    """[B] int64: 0 = the row can be sampled, else an index into _FAILURE_REASONS.

    NaN propagates through min and max, so the raw row's (min, max) is finite exactly when every
    raw logit is. The processed row may hold -inf (a banned token) but its best value divided by
    the temperature must be finite: then the softmax of the scaled row is well defined.
    """
    # NOTE: amin and amax apart, not aminmax: on CPU aminmax over the last dimension runs ~25x
    # slower than the two reductions together.
    lowest, highest = logits.amin(dim=-1), logits.amax(dim=-1)
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
