"""The random half of sampling, for the rows of a batch that sample: temperature -> top_k ->
top_p -> min_p -> exponential race (mi.ops.sampling does penalties, greedy rows, failures and
logprobs around it).

The race draws argmax(p / E) with E = -log(u) ~ Exp(1) and u a hash of (seed, position, token
id). A token's score depends only on its own probability and noise, so the race may run on any
set of tokens that holds every token the filters leave with a nonzero probability:

- candidates: a row's C most probable tokens, where the best probability left out is 0 (top_k
  removed it) or below the row's top_p or min_p cut. C is the batch's largest top_k, or the top_p
  window if a row has top_p or min_p without top_k; a row they do not hold (a nucleus wider than
  the window, ties at the k-th logit) tries again with 8x as many, up to half the vocabulary.
- the whole vocabulary, [S, V] noise: rows without a filter and rows no candidate set holds.

Invariants:
- A row gets the same token on either path, bit for bit, so the path its batch takes never shows:
  the probabilities come from one softmax over the whole row (the rounding of its sum depends on
  where the survivors sit in the row), top_p's prefix sums are rounded as the full path rounds
  them, the noise is the same function of (seed, position, token id), and equal scores go to the
  lowest token id, as argmax over the vocabulary does.
- Filters cut at a threshold, so a token tied with the last kept one is kept too.
- One device-to-host sync per candidate width tried (usually one); the full path's top_p adds one
  more, to choose between its window and a full sort.
"""

from dataclasses import dataclass, fields

import torch

_TOP_P_WINDOW = 256  # top_p looks for its cut among this many best tokens before sorting all
_WIDTH_GROWTH = 8  # candidates per row on each retry, times the last try's
# Candidates stop at half the vocabulary: beyond, racing on all of it costs about the same.
_MIN_VOCAB_PER_CANDIDATE = 2
_ARGMAX_BLOCK = 64

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
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    return token_noise(seeds, positions, token_ids[None, :])


def token_noise(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """seeds, positions [B]; token_ids [B, C] or [1, C] -> [B, C] float32: uniform_noise's values
    at those tokens, bit for bit."""
    row = _splitmix64(_splitmix64(seeds) ^ positions)  # [B]
    bits = _splitmix64(row[:, None] ^ token_ids)
    mantissa = _shift_right(bits, 40)  # 24 random bits
    # NOTE: float32 rounds (2**24 - 1) + 0.5 up to 2**24, i.e. u = 1 and E = -log(u) = 0: a
    # filtered-out token then scored 0 / 0 = NaN, which argmax takes as the winner. The clamp
    # changes that one value and no other.
    return mantissa.float().add_(0.5).mul_(1.0 / (1 << 24)).clamp_max_(_BELOW_ONE)


@dataclass(frozen=True)
class DrawParams:
    """The parameters of the rows that sample, [S] each; use_* False where a filter is off."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    use_top_k: torch.Tensor
    top_p: torch.Tensor
    use_top_p: torch.Tensor
    min_p: torch.Tensor  # 0 where off
    seeds: torch.Tensor
    positions: torch.Tensor

    def take(self, rows: torch.Tensor) -> "DrawParams":
        return DrawParams(*_take_all(self, rows))


@dataclass(frozen=True)
class DrawPlan:
    """Batch-wide facts, read in sample()'s sync: which passes some row needs."""

    max_k: int  # the largest active top_k, 0: none
    max_candidate_k: int  # the largest active top_k below half the vocabulary, 0: none
    any_top_p: bool
    any_min_p: bool
    any_window: bool  # a row with top_p or min_p but no top_k: its candidates come from a window


def candidate_top_k(top_k: torch.Tensor, use_top_k: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B] each row's top_k where it makes few enough candidates, else 0 (DrawPlan.max_candidate_k
    is their max)."""
    is_few = use_top_k & ((top_k + 1) * _MIN_VOCAB_PER_CANDIDATE <= vocab_size)
    return torch.where(is_few, top_k, 0)


def draw(processed: torch.Tensor, p: DrawParams, plan: DrawPlan) -> torch.Tensor:
    """processed [S, V] float32 logits of rows that sample -> [S] int64 token ids."""
    num_rows, vocab_size = processed.shape
    device = processed.device
    scaled = processed / p.temperature[:, None]
    top_ids = None
    if plan.max_k > 0:
        scaled, top_ids = _apply_top_k(scaled, p.top_k, p.use_top_k, plan.max_k)
    # NOTE: the softmax runs over the whole row even where few tokens survive: a candidate must
    # get the very probability the full path gives it.
    probs = scaled.softmax(dim=-1)  # never renormalised below: the race is scale-free
    # The tokens of the largest scaled logits are any row's most probable ones, top_k or not.
    width = plan.max_candidate_k
    if plan.any_window and (_TOP_P_WINDOW + 1) * _MIN_VOCAB_PER_CANDIDATE <= vocab_size:
        width, top_ids = max(width, _TOP_P_WINDOW), None  # a top-k of the probabilities

    token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
    pending = torch.arange(num_rows)  # rows not drawn yet, on the host
    to_full = []
    while len(pending) and width > 0 and (width + 1) * _MIN_VOCAB_PER_CANDIDATE <= vocab_size:
        rows = None if len(pending) == num_rows else pending.to(device)
        winners, is_served, can_retry = _race_candidates_that_hold(probs, top_ids, width, rows, p, plan)
        if winners is not None:
            if rows is None and bool(is_served.all()):
                return winners
            token_ids.index_copy_(0, pending[is_served].to(device), winners)
        to_full.append(pending[~is_served & ~can_retry])
        pending = pending[can_retry]
        width, top_ids = width * _WIDTH_GROWTH, None
    full = torch.cat([*to_full, pending])
    if len(full) == num_rows:
        return _race_full(probs, p, plan)
    if len(full):
        full = full.to(device)
        token_ids.index_copy_(0, full, _race_full(probs.index_select(0, full), p.take(full), plan))
    return token_ids


def _race_candidates_that_hold(
    probs: torch.Tensor,
    top_ids: torch.Tensor | None,
    width: int,
    rows: torch.Tensor | None,
    p: DrawParams,
    plan: DrawPlan,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Races the rows (None: all) whose `width` candidates hold every survivor ->
    (their token ids or None if none; [R] host bool: held; [R] host bool: not held, but a filter
    might leave few enough survivors for more candidates)."""
    p = p if rows is None else p.take(rows)
    cand = _Candidates.of(_take(probs, rows), None if top_ids is None else _take(top_ids, rows), width)
    top_p_cut, min_p_cut, is_served = cand.cuts(p, plan)
    has_filter = p.use_top_k | p.use_top_p | (p.min_p > 0)
    # NOTE: a sync per width tried.
    is_served, has_filter = torch.stack([is_served, has_filter]).cpu()
    can_retry = has_filter & ~is_served
    if not is_served.any():
        return None, is_served, can_retry
    if not is_served.all():
        served = is_served.nonzero().squeeze(1).to(probs.device)
        cand, top_p_cut, min_p_cut, p = (
            cand.take(served),
            top_p_cut[served],
            min_p_cut[served],
            p.take(served),
        )
    return _race_candidates(cand, top_p_cut, min_p_cut, p, plan), is_served, can_retry


def _race_full(probs: torch.Tensor, p: DrawParams, plan: DrawPlan) -> torch.Tensor:
    """probs [S, V] after top_k -> [S] token ids: top_p, min_p and the race over every token."""
    if plan.any_top_p:
        cut = _top_p_cut(probs, p.top_p, p.use_top_p)
        probs = probs.masked_fill(probs < cut[:, None], 0.0)
    if plan.any_min_p:
        cut = p.min_p * probs.amax(dim=-1)
        probs = probs.masked_fill(probs < cut[:, None], 0.0)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
    exp_noise = uniform_noise(p.seeds, p.positions, probs.shape[-1]).log_().neg_()
    return row_argmax(probs / exp_noise)


def _race_candidates(
    cand: "_Candidates", top_p_cut: torch.Tensor, min_p_cut: torch.Tensor, p: DrawParams, plan: DrawPlan
) -> torch.Tensor:
    """_race_full's race on candidates that hold every token that can win."""
    probs = cand.probs
    if plan.any_top_p:
        probs = probs.masked_fill(probs < top_p_cut[:, None], 0.0)
    if plan.any_min_p:
        probs = probs.masked_fill(probs < min_p_cut[:, None], 0.0)
    score = probs / token_noise(p.seeds, p.positions, cand.ids).log_().neg_()
    # The candidates are in probability order: break ties by id, as argmax over the vocabulary.
    is_best = score == score.amax(dim=-1, keepdim=True)
    return torch.where(is_best, cand.ids, torch.iinfo(torch.int64).max).amin(dim=-1)


@dataclass(frozen=True)
class _Candidates:
    """Each row's `width` most probable tokens, best first, and the best probability left out."""

    ids: torch.Tensor  # [S, C] int64
    probs: torch.Tensor  # [S, C] float32, non-increasing along a row
    next_prob: torch.Tensor  # [S] the largest probability of a token that is not a candidate

    @staticmethod
    def of(probs: torch.Tensor, top_ids: torch.Tensor | None, width: int) -> "_Candidates":
        """top_ids [S, > width]: the tokens of the largest scaled logits, best first, if known.

        The softmax keeps the order of the scaled logits (ties may merge), so their probabilities
        are the row's best, in order, with no top-k pass over the probabilities.
        """
        if top_ids is None:
            values, top_ids = probs.topk(width + 1, dim=-1)
        else:
            top_ids = top_ids[:, : width + 1]
            values = probs.gather(1, top_ids)
        return _Candidates(top_ids[:, :width], values[:, :width], values[:, width])

    def take(self, rows: torch.Tensor) -> "_Candidates":
        return _Candidates(*_take_all(self, rows))

    def cuts(self, p: DrawParams, plan: DrawPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[S] each: the full path's top_p cut (where the nucleus ends among the candidates) and
        min_p cut, and whether no token left out survives them with a nonzero probability: then
        none can win, as 0 / E = 0 loses to the row's best token."""
        is_served = self.next_prob == 0
        top_p_cut = min_p_cut = torch.zeros_like(self.next_prob)
        if plan.any_top_p:
            mass = _prefix_mass(self.probs)
            top_p_cut = _nucleus_cut(self.probs, mass, p.top_p, p.use_top_p)
            is_inside = p.use_top_p & (mass[:, -1] >= p.top_p)
            is_served |= is_inside & (self.next_prob < top_p_cut)
        if plan.any_min_p:
            min_p_cut = p.min_p * self.probs[:, 0]  # the best token survives top_p
            is_served |= self.next_prob < min_p_cut
        return top_p_cut, min_p_cut, is_served


def _apply_top_k(
    scaled: torch.Tensor, top_k: torch.Tensor, use_top_k: torch.Tensor, max_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets to -inf, in place, every logit below the row's k-th largest (max_k: the largest
    active k); returns it and the ids of the max_k + 1 largest logits, best first."""
    top_values, top_ids = scaled.topk(max_k + 1, dim=-1)  # [S, max_k + 1], best first
    kth = top_values.gather(1, (top_k.clamp(1, max_k) - 1)[:, None])  # [S, 1]
    kth = kth.masked_fill_(~use_top_k[:, None], float("-inf"))  # nothing is below -inf
    return scaled.masked_fill_(scaled < kth, float("-inf")), top_ids


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
    # NOTE: a sync: does every nucleus end inside the window?
    if head.shape[-1] < vocab_size and not bool((~use_top_p | (head_mass[:, -1] >= top_p)).all()):
        tail = probs.sort(dim=-1, descending=True).values[:, head.shape[-1] :]  # [S, V - W]
        sorted_probs = torch.cat([head, tail], dim=-1)
        mass = torch.cat([head_mass, head_mass[:, -1:] + tail.cumsum(dim=-1)], dim=-1)
    return _nucleus_cut(sorted_probs, mass, top_p, use_top_p)


def _prefix_mass(sorted_probs: torch.Tensor) -> torch.Tensor:
    """Prefix sums of a best-first prefix of a row's probabilities, rounded as _top_p_cut rounds
    them: the window's cumsum, then the rest's cumsum offset by the window's mass."""
    window = _TOP_P_WINDOW
    if sorted_probs.shape[-1] <= window:
        return sorted_probs.cumsum(dim=-1)
    head_mass = sorted_probs[:, :window].cumsum(dim=-1)
    return torch.cat([head_mass, head_mass[:, -1:] + sorted_probs[:, window:].cumsum(dim=-1)], dim=-1)


def _nucleus_cut(
    sorted_probs: torch.Tensor, mass: torch.Tensor, top_p: torch.Tensor, use_top_p: torch.Tensor
) -> torch.Tensor:
    """The top_p cut from a best-first prefix of a row's probabilities and their prefix sums."""
    mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
    num_kept = (mass_before < top_p[:, None]).sum(dim=-1).clamp(min=1)  # the top token stays
    cut = sorted_probs.gather(1, (num_kept - 1)[:, None]).squeeze(1)
    return torch.where(use_top_p, cut, 0.0)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [S, V] -> [S] int64: x.argmax(dim=-1), bit for bit (the first index of the largest
    value, NaN above all), ~7x faster on CPU at V = 32000, where argmax runs at a fraction of max's
    speed: the max of each block of _ARGMAX_BLOCK, the first block holding the row's max, and the
    argmax inside it."""
    num_rows, vocab_size = x.shape
    num_blocks = vocab_size // _ARGMAX_BLOCK
    if num_blocks < 2:
        return x.argmax(dim=-1)
    body = x[:, : num_blocks * _ARGMAX_BLOCK].reshape(num_rows, num_blocks, _ARGMAX_BLOCK)
    block_max = body.amax(dim=-1)  # [S, blocks]; amax propagates NaN as argmax ranks it
    if num_blocks * _ARGMAX_BLOCK < vocab_size:
        tail_max = x[:, num_blocks * _ARGMAX_BLOCK :].amax(dim=-1, keepdim=True)
        block_max = torch.cat([block_max, tail_max], dim=1)
    start = block_max.argmax(dim=-1) * _ARGMAX_BLOCK  # [S]
    # The short last block repeats its last token, which argmax reaches only after the original.
    index = (start[:, None] + torch.arange(_ARGMAX_BLOCK, device=x.device)).clamp_max_(vocab_size - 1)
    return start + x.gather(1, index).argmax(dim=-1)


def _take(value: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return value if rows is None else value.index_select(0, rows)


def _take_all(record, rows: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor field of a dataclass, at `rows`."""
    return [getattr(record, f.name).index_select(0, rows) for f in fields(record)]
