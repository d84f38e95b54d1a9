"""Sampler tests: each parameter has a test that fails without it, plus determinism, greedy
isolation, raw logprobs and low-precision inputs, and the worker's per-slot sampling state that
feeds the sampler. CPU, a few seconds."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

import mi.ops.draw as draw_module
import mi.ops.logprobs as logprobs_module
import mi.ops.sampling as sampling_module
from mi.actors import messages as m
from mi.actors.worker.slot_sampling import SlotSampling
from mi.api.sampling import SamplingParams
from mi.ops.draw import uniform_noise
from mi.ops.logprobs import prompt_logprobs
from mi.ops.penalties import apply_penalties
from mi.ops.sampling import SamplingTensors, sample


@pytest.fixture(autouse=True)
def seeded_torch():
    """Tests that draw random logits draw the same ones on every run."""
    torch.manual_seed(0)


def make_st(num_rows: int, **overrides) -> SamplingTensors:
    """Plain sampling (temperature 1, no filters), seeds 0..B-1 at position 0, unless overridden;
    scalar overrides are broadcast to every row."""
    fields = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "seeds": torch.arange(num_rows),
        "positions": 0,
    }
    fields.update(overrides)
    dtypes = {
        "temperature": torch.float32,
        "top_p": torch.float32,
        "top_k": torch.int64,
        "min_p": torch.float32,
        "seeds": torch.int64,
        "positions": torch.int64,
        "repetition_penalty": torch.float32,
        "presence_penalty": torch.float32,
        "frequency_penalty": torch.float32,
    }
    for name, dtype in dtypes.items():
        value = fields.get(name)
        if value is not None and not isinstance(value, torch.Tensor):
            fields[name] = torch.full((num_rows,), value, dtype=dtype)
    return SamplingTensors(**fields)


def repeat_rows(row_logits: list[float], num_rows: int) -> torch.Tensor:
    return torch.tensor(row_logits).log()[None, :].expand(num_rows, -1).contiguous()


def sampled_set(logits: torch.Tensor, st: SamplingTensors) -> set[int]:
    return set(sample(logits, st).token_ids.tolist())


# --- filters -------------------------------------------------------------------------------------


def test_top_k_1_equals_greedy():
    logits = torch.randn(64, 100)
    assert sample(logits, make_st(64)).token_ids.ne(logits.argmax(-1)).any()  # sampling differs
    assert torch.equal(sample(logits, make_st(64, top_k=1)).token_ids, logits.argmax(-1))


def test_top_k_only_yields_the_k_best():
    num_rows, k = 4000, 5
    logits = torch.randn(50)[None, :].expand(num_rows, -1).contiguous()
    best = set(logits[0].topk(k).indices.tolist())
    assert not sampled_set(logits, make_st(num_rows)) <= best
    assert sampled_set(logits, make_st(num_rows, top_k=k)) == best
    # A row with top_k beside rows without it (the top-k pass is batch-wide, the cut per row).
    top_k = torch.where(torch.arange(num_rows) % 2 == 0, k, 0)
    tokens = sample(logits, make_st(num_rows, top_k=top_k)).token_ids
    assert set(tokens[::2].tolist()) == best and not set(tokens[1::2].tolist()) <= best


@pytest.mark.parametrize(
    "top_p, nucleus", [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_minimal_nucleus(top_p, nucleus):
    # Probabilities 0.5, 0.3, 0.15, 0.05: the nucleus is the shortest prefix reaching top_p.
    logits = repeat_rows([0.5, 0.3, 0.15, 0.05], 2000)
    other = torch.where(torch.arange(2000) % 2 == 0, top_p, 0.5)  # odd rows: another top_p
    tokens = sample(logits, make_st(2000, top_p=other)).token_ids
    assert set(tokens[::2].tolist()) == nucleus


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = set(), 0.0
    for token in order:
        if kept and mass >= top_p:
            break
        kept.add(token)
        mass += float(probs[token])
    return kept


@pytest.mark.parametrize("window", [256, 8])
def test_top_p_nucleus_beyond_the_window(monkeypatch, window):
    monkeypatch.setattr(draw_module, "_TOP_P_WINDOW", window)
    num_rows = 3000
    row_probs = torch.arange(40, 0, -1.0) ** 0.5 + torch.linspace(0, 0.1, 40)  # no ties
    row_probs = row_probs / row_probs.sum()
    logits = row_probs.log()[None, :].expand(num_rows, -1).contiguous()
    for top_p in (0.1, 0.5, 0.9):
        nucleus = reference_nucleus(row_probs, top_p)
        assert sampled_set(logits, make_st(num_rows, top_p=top_p)) == nucleus


def test_top_p_applies_after_top_k():
    # Alone, top_p=0.5 needs 0.4 + 0.35. After top_k=2 renormalises them to 0.53, 0.47 the first
    # token reaches 0.5 by itself.
    logits = repeat_rows([0.4, 0.35, 0.25], 2000)
    assert sampled_set(logits, make_st(2000, top_p=0.5)) == {0, 1}
    assert sampled_set(logits, make_st(2000, top_k=2, top_p=0.5)) == {0}


@pytest.mark.parametrize(
    "min_p, temperature, kept",
    [(0.3, 1.0, {0, 1, 2}), (0.6, 1.0, {0, 1}), (0.6, 2.0, {0, 1, 2}), (0.0, 1.0, {0, 1, 2, 3})],
)
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p, temperature, kept):
    # Probabilities 0.4, 0.3, 0.2, 0.1; at T=2 they become ∝ sqrt(p): ratios 1, .87, .71, .5.
    logits = repeat_rows([0.4, 0.3, 0.2, 0.1], 2000)
    assert sampled_set(logits, make_st(2000, min_p=min_p, temperature=temperature)) == kept


def test_min_p_with_top_k():
    logits = repeat_rows([0.4, 0.3, 0.2, 0.1], 2000)
    assert sampled_set(logits, make_st(2000, min_p=0.3, top_k=2)) == {0, 1}
    assert sampled_set(logits, make_st(2000, min_p=0.6, top_k=3, top_p=0.95)) == {0, 1}


# --- temperature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax_of_logits_over_t(temperature):
    num_rows = 40_000
    row_logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5])
    logits = row_logits[None, :].expand(num_rows, -1).contiguous()
    tokens = sample(logits, make_st(num_rows, temperature=temperature)).token_ids
    freq = torch.bincount(tokens, minlength=5).float() / num_rows
    expected = torch.softmax(row_logits / temperature, dim=-1)
    # One frequency's std is <= sqrt(0.25 / 40000) = 0.0025: allow 4 sigma.
    assert (freq - expected).abs().max() < 0.01, (freq, expected)


def test_temperature_sharpens_and_flattens():
    num_rows = 20_000
    logits = torch.tensor([1.0, 0.0, -1.0])[None, :].expand(num_rows, -1).contiguous()
    top_freq = [
        sample(logits, make_st(num_rows, temperature=t)).token_ids.eq(0).float().mean()
        for t in (0.25, 1.0, 4.0)
    ]
    assert top_freq[0] > 0.95 and 0.6 < top_freq[1] < 0.73 and top_freq[2] < 0.45


def test_temperature_zero_is_exact_argmax():
    logits = torch.randn(32, 1000) * 5
    assert torch.equal(sample(logits, make_st(32, temperature=0.0)).token_ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_temperature_below_the_epsilon_is_greedy(temperature):
    # 1e-40 is valid input; logits / T overflowed to inf, the softmax gave NaN, and every row
    # drew token 0.
    logits = torch.randn(32, 1000) * 5
    out = sample(logits, make_st(32, temperature=temperature))
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.failed_rows == {}
    assert sample(logits, make_st(32, temperature=sampling_module.GREEDY_TEMPERATURE)).failed_rows == {}


# --- rows that cannot be sampled ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_model_logits_fail_their_row_only(temperature, bad):
    logits = torch.randn(6, 300)
    good = sample(logits, make_st(6, temperature=temperature, top_p=0.9))
    broken = logits.clone()
    broken[1, 17] = bad
    broken[4] = bad
    out = sample(broken, make_st(6, temperature=temperature, top_p=0.9))
    assert out.failed_rows == {1: sampling_module.MODEL_NOT_FINITE, 4: sampling_module.MODEL_NOT_FINITE}
    rest = [0, 2, 3, 5]
    assert torch.equal(out.token_ids[rest], good.token_ids[rest])  # the others sample as without them


def test_non_finite_low_precision_logits_are_caught():
    logits = torch.randn(3, 300).to(torch.bfloat16)
    logits[2, 5] = float("nan")
    assert sample(logits, make_st(3)).failed_rows == {2: sampling_module.MODEL_NOT_FINITE}


def _seen_everywhere(num_rows: int, vocab_size: int) -> dict:
    return {
        "prompt_mask": torch.ones(num_rows, vocab_size, dtype=torch.bool),
        "output_counts": torch.zeros(num_rows, vocab_size, dtype=torch.int32),
    }


@pytest.mark.parametrize(
    "penalty, temperature",
    [
        (float("inf"), 1.0),  # 0 * inf: NaN for every positive logit
        (1e-45, 0.0),  # 1.4e-45 in float32: positive logits / it are +inf
        (1e-35, 1e-4),  # finite after the penalty, +inf once divided by the temperature
    ],
)
def test_parameters_that_break_the_logits_fail_their_row_only(penalty, temperature):
    logits = torch.randn(3, 200).abs() + 1  # positive, so the penalty divides every one
    penalties = torch.tensor([1.0, penalty, 1.0])
    st = make_st(3, temperature=temperature, repetition_penalty=penalties, **_seen_everywhere(3, 200))
    out = sample(logits, st)
    assert out.failed_rows == {1: sampling_module.PARAMS_NOT_FINITE}
    alone = sample(logits[[0, 2]], make_st(2, temperature=temperature, seeds=torch.tensor([0, 2])))
    assert torch.equal(out.token_ids[[0, 2]], alone.token_ids)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_with_every_token_banned_fails(temperature):
    # min_tokens bans EOS and stop_token_ids with -inf; a stop list covering the vocabulary bans all.
    vocab_size = 50
    rows = torch.tensor([1] * vocab_size)
    tokens = torch.arange(vocab_size)
    bias = (rows, tokens, torch.full((vocab_size,), float("-inf")))
    out = sample(torch.randn(2, vocab_size), make_st(2, temperature=temperature, logit_bias=bias))
    assert out.failed_rows == {1: sampling_module.PARAMS_NOT_FINITE}


# --- logit_bias and penalties ---------------------------------------------------------------------


def test_logit_bias_forces_and_bans():
    num_rows = 500
    logits = torch.randn(num_rows, 64)
    temperature = torch.where(torch.arange(num_rows) == 0, 0.0, 1.0)  # row 0 greedy
    rows = torch.arange(num_rows)
    forced = make_st(
        num_rows,
        temperature=temperature,
        logit_bias=(rows, torch.full((num_rows,), 7), torch.full((num_rows,), 100.0)),
    )
    assert sample(logits, forced).token_ids.eq(7).all()

    logits[:, 3] = 50.0  # token 3 would always win
    banned = make_st(
        num_rows,
        temperature=temperature,
        logit_bias=(rows, torch.full((num_rows,), 3), torch.full((num_rows,), float("-inf"))),
    )
    tokens = sample(logits, banned).token_ids
    assert tokens.ne(3).all()
    assert tokens[0] == logits[0].index_fill(0, torch.tensor([3]), float("-inf")).argmax()
    assert sample(logits, make_st(num_rows, temperature=temperature)).token_ids.eq(3).all()


def test_logit_bias_only_touches_its_rows_and_tokens():
    logits = torch.randn(3, 10)
    st = make_st(
        3, logit_bias=(torch.tensor([1, 1, 2]), torch.tensor([4, 4, 0]), torch.tensor([1.5, 0.5, -2.0]))
    )
    expected = logits.clone()
    expected[1, 4] += 2.0  # duplicate entries add up
    expected[2, 0] -= 2.0
    assert torch.equal(apply_penalties(logits, st), expected)


def test_repetition_penalty_scales_seen_tokens_by_the_factor():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 1.0]])
    prompt_mask = torch.tensor([[True, True, False, False, False, False]])
    output_counts = torch.tensor([[0, 0, 2, 1, 0, 0]], dtype=torch.int32)
    st = make_st(1, repetition_penalty=2.0, prompt_mask=prompt_mask, output_counts=output_counts)
    processed = apply_penalties(logits, st)
    assert processed.tolist() == [[1.0, -4.0, 1.5, -2.0, 0.5, 1.0]]
    assert logits.tolist() == [[2.0, -2.0, 3.0, -1.0, 0.5, 1.0]]  # input left alone


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.5])
def test_repetition_penalty_matches_transformers(penalty):
    gen = torch.Generator().manual_seed(0)
    num_rows, vocab_size = 4, 40
    logits = torch.randn(num_rows, vocab_size, generator=gen) * 3
    prompt_ids = torch.randint(0, vocab_size, (num_rows, 6), generator=gen)
    output_ids = torch.randint(0, vocab_size, (num_rows, 5), generator=gen)
    prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool).scatter_(1, prompt_ids, True)
    output_counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32).scatter_add_(
        1, output_ids, torch.ones_like(output_ids, dtype=torch.int32)
    )
    st = make_st(num_rows, repetition_penalty=penalty, prompt_mask=prompt_mask, output_counts=output_counts)
    reference = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.cat([prompt_ids, output_ids], dim=1), logits.clone()
    )
    torch.testing.assert_close(apply_penalties(logits, st), reference, rtol=0, atol=1e-6)


def test_presence_and_frequency_penalties_follow_the_formula():
    gen = torch.Generator().manual_seed(1)
    num_rows, vocab_size = 3, 20
    logits = torch.randn(num_rows, vocab_size, generator=gen)
    output_counts = torch.randint(0, 4, (num_rows, vocab_size), generator=gen, dtype=torch.int32)
    prompt_mask = torch.rand(num_rows, vocab_size, generator=gen) < 0.5
    presence = torch.tensor([0.0, 0.5, -1.0])
    frequency = torch.tensor([0.25, 0.0, 1.5])
    st = make_st(
        num_rows,
        presence_penalty=presence,
        frequency_penalty=frequency,
        output_counts=output_counts,
        prompt_mask=prompt_mask,
    )
    expected = logits.clone()
    for row in range(num_rows):
        for token in range(vocab_size):
            count = int(output_counts[row, token])  # prompt tokens play no part
            expected[row, token] -= frequency[row] * count + presence[row] * (count > 0)
    torch.testing.assert_close(apply_penalties(logits, st), expected, rtol=0, atol=1e-6)


def test_penalties_order_bias_then_repetition_then_frequency():
    logits = torch.tensor([[1.0, 1.0]])
    st = make_st(
        1,
        logit_bias=(torch.tensor([0]), torch.tensor([0]), torch.tensor([3.0])),
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        output_counts=torch.tensor([[2, 0]], dtype=torch.int32),
    )
    assert apply_penalties(logits, st).tolist() == [[(1.0 + 3.0) / 2.0 - 0.5 * 2, 1.0]]


def test_penalties_steer_sampling_and_greedy():
    logits = torch.tensor([[3.0, 2.9, 0.0]]).expand(2, -1).contiguous()
    counts = torch.tensor([[5, 0, 0]], dtype=torch.int32).expand(2, -1).contiguous()
    st = make_st(2, temperature=torch.tensor([0.0, 1e-3]), frequency_penalty=1.0, output_counts=counts)
    assert sample(logits, st).token_ids.tolist() == [1, 1]


def test_no_penalties_returns_the_logits_unchanged():
    logits = torch.randn(2, 8)
    assert apply_penalties(logits, make_st(2)) is logits  # no copy, no pass
    neutral = make_st(
        2,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        output_counts=torch.ones(2, 8, dtype=torch.int32),
        prompt_mask=torch.ones(2, 8, dtype=torch.bool),
    )
    assert torch.equal(apply_penalties(logits, neutral), logits)


# --- determinism and batch independence -----------------------------------------------------------


def random_rows(num_rows: int, vocab_size: int, gen: torch.Generator) -> dict:
    """Per-row tensors for a mixed batch: greedy, plain, top_k, top_p, min_p and penalty rows."""
    is_sampled = torch.arange(num_rows) % 4 != 0
    return {
        "logits": torch.randn(num_rows, vocab_size, generator=gen) * 2,
        "temperature": torch.rand(num_rows, generator=gen) * 1.5 * is_sampled,
        "top_k": torch.randint(-1, 30, (num_rows,), generator=gen),
        "top_p": torch.rand(num_rows, generator=gen).clamp(min=0.2) ** (torch.arange(num_rows) % 2),
        "min_p": torch.rand(num_rows, generator=gen) * 0.2 * (torch.arange(num_rows) % 3 == 0),
        "seeds": torch.randint(-(2**62), 2**62, (num_rows,), generator=gen),
        "positions": torch.randint(0, 4096, (num_rows,), generator=gen),
        "repetition_penalty": 1 + torch.rand(num_rows, generator=gen),
        "presence_penalty": torch.rand(num_rows, generator=gen),
        "frequency_penalty": torch.rand(num_rows, generator=gen),
        "output_counts": torch.randint(0, 3, (num_rows, vocab_size), generator=gen, dtype=torch.int32),
        "prompt_mask": torch.rand(num_rows, vocab_size, generator=gen) < 0.3,
    }


def st_of(rows: dict, index: torch.Tensor, **extra) -> tuple[torch.Tensor, SamplingTensors]:
    picked = {name: value[index] for name, value in rows.items()}
    return picked.pop("logits"), SamplingTensors(**picked, **extra)


@pytest.mark.parametrize("penalties, window", [(False, 256), (True, 256), (False, 8)])
def test_seeded_row_is_the_same_alone_and_in_a_shuffled_batch(monkeypatch, penalties, window):
    # window 8: some rows find their top_p cut in the window alone, but sort fully in the batch.
    monkeypatch.setattr(draw_module, "_TOP_P_WINDOW", window)
    gen = torch.Generator().manual_seed(2)
    rows = random_rows(17, 256, gen)
    if not penalties:
        for name in (
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "output_counts",
            "prompt_mask",
        ):
            del rows[name]
    alone = torch.cat([sample(*st_of(rows, torch.tensor([i]))).token_ids for i in range(17)])
    for _ in range(3):
        order = torch.randperm(17, generator=gen)
        in_batch = sample(*st_of(rows, order)).token_ids
        assert torch.equal(in_batch, alone[order])


def test_same_seed_and_position_repeat_different_ones_differ():
    logits = torch.zeros(64, 1000)  # uniform: the token is the noise's argmax
    fixed = sample(logits, make_st(64, seeds=7, positions=3)).token_ids
    assert fixed.eq(fixed[0]).all()
    assert len(set(sample(logits, make_st(64)).token_ids.tolist())) > 50  # seeds 0..63
    by_position = sample(logits, make_st(64, seeds=7, positions=torch.arange(64))).token_ids
    assert len(set(by_position.tolist())) > 50


def reference_uniform(seed: int, position: int, token: int) -> float:
    """uniform_noise for one token, in plain Python integers."""
    mask = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    row = splitmix64(splitmix64(seed & mask) ^ (position & mask))
    mantissa = splitmix64(row ^ token) >> 40  # 24 bits
    uniform = (np.float32(mantissa) + np.float32(0.5)) * np.float32(1 / (1 << 24))
    return float(min(uniform, np.float32(1 - 2**-24)))


def test_uniform_noise_matches_the_reference():
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789])
    positions = torch.tensor([0, 5, 4095, 1, 2**40, 7])
    noise = uniform_noise(seeds, positions, 70)
    for row, (seed, position) in enumerate(zip(seeds.tolist(), positions.tolist())):
        for token in (0, 1, 33, 69):
            assert float(noise[row, token]) == reference_uniform(seed, position, token)


def test_uniform_noise_stays_below_one():
    # At (12345, 621, 20601) the 24 random bits are all ones: (2**24 - 1) + 0.5 rounds to 2**24
    # in float32, u was 1, E = -log(u) = 0, and a token with probability 0 scored 0 / 0 = NaN,
    # which argmax picks: top_k=1 answered token 20601, not the argmax (~0.1% of rows at V=32000).
    seeds, positions = torch.tensor([12345]), torch.tensor([621])
    assert reference_uniform(12345, 621, 20601) == float(np.float32(1 - 2**-24))
    assert float(uniform_noise(seeds, positions, 32000)[0, 20601]) == reference_uniform(12345, 621, 20601)
    logits = torch.randn(1, 32000)
    logits[0, 20601] = -50.0
    st = make_st(1, seeds=seeds, positions=positions)
    assert sample(logits, dataclasses.replace(st, top_k=torch.tensor([1]))).token_ids.tolist() == [
        int(logits.argmax())
    ]
    banned = (torch.tensor([0]), torch.tensor([20601]), torch.tensor([float("-inf")]))
    assert sample(logits, dataclasses.replace(st, logit_bias=banned)).token_ids.tolist() != [20601]


def test_uniform_noise_is_a_function_of_seed_position_and_token():
    seeds, positions = torch.tensor([1, 2, 1]), torch.tensor([5, 5, 5])
    noise = uniform_noise(seeds, positions, 100)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(uniform_noise(seeds[:1], positions[:1], 50)[0], noise[0, :50])
    assert 0 < noise.min() and noise.max() < 1


def test_greedy_rows_ignore_other_rows_params():
    gen = torch.Generator().manual_seed(3)
    rows = random_rows(16, 300, gen)
    is_greedy = torch.arange(16) % 2 == 0
    rows["temperature"] = torch.where(is_greedy, 0.0, rows["temperature"] + 0.1)
    rows["repetition_penalty"] = torch.where(is_greedy, 1.0, rows["repetition_penalty"])
    rows["presence_penalty"] = torch.where(is_greedy, 0.0, rows["presence_penalty"])
    rows["frequency_penalty"] = torch.where(is_greedy, 0.0, rows["frequency_penalty"])
    logits, st = st_of(rows, torch.arange(16), num_top_logprobs=3)
    tokens = sample(logits, st).token_ids
    assert torch.equal(tokens[is_greedy], logits[is_greedy].argmax(-1))


# --- logprobs ------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax():
    num_rows, vocab_size, k = 8, 500, 5
    logits = torch.randn(num_rows, vocab_size) * 4
    bias = (torch.arange(num_rows), torch.full((num_rows,), 11), torch.full((num_rows,), 100.0))
    st = make_st(
        num_rows, temperature=torch.linspace(0, 2, num_rows), top_k=50, logit_bias=bias, num_top_logprobs=k
    )
    out = sample(logits, st)
    reference = torch.log_softmax(logits, dim=-1)
    assert out.token_ids.eq(11).all()  # the bias steered the choice, not the logprobs
    torch.testing.assert_close(out.logprobs, reference[:, 11], rtol=0, atol=1e-5)
    top_values, top_ids = reference.topk(k, dim=-1)
    assert torch.equal(out.top_ids, top_ids)
    torch.testing.assert_close(out.top_logprobs, top_values, rtol=0, atol=1e-5)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_logprobs_off_and_zero_alternatives():
    logits = torch.randn(4, 30)
    assert sample(logits, make_st(4)).logprobs is None
    out = sample(logits, make_st(4, num_top_logprobs=0))
    assert out.top_ids.shape == (4, 0) and out.top_logprobs.shape == (4, 0)
    torch.testing.assert_close(
        out.logprobs,
        torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None]).squeeze(1),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("chunk_elements", [1 << 24, 64])
def test_prompt_logprobs(monkeypatch, chunk_elements):
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", chunk_elements)  # 64: 2 rows a chunk
    logits = torch.randn(9, 32) * 3
    targets = torch.tensor([5, 0, 31, -1, 7, 7, -1, 2, 1])
    target_lp, top_ids, top_lp = prompt_logprobs(logits, targets, 4)
    reference = torch.log_softmax(logits, dim=-1)
    has_target = targets >= 0
    assert torch.isnan(target_lp[~has_target]).all()
    torch.testing.assert_close(
        target_lp[has_target], reference[has_target, targets[has_target]], rtol=0, atol=1e-5
    )
    top_values, expected_ids = reference.topk(4, dim=-1)
    assert torch.equal(top_ids, expected_ids)
    torch.testing.assert_close(top_lp, top_values, rtol=0, atol=1e-5)


# --- dtypes and validation -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    logits = (torch.randn(6, 200) * 3).to(dtype)
    temperature = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.7, 0.0])
    st = make_st(
        6,
        temperature=temperature,
        top_k=torch.tensor([0, 0, 10, 0, 0, 0]),
        top_p=torch.tensor([1, 1, 1, 0.9, 1, 1]),
        num_top_logprobs=3,
        repetition_penalty=1.0,
        output_counts=torch.zeros(6, 200, dtype=torch.int32),
    )
    out = sample(logits, st)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    greedy = temperature == 0
    assert torch.equal(out.token_ids[greedy], logits.float()[greedy].argmax(-1))
    reference = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(
        out.logprobs, reference.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(out.top_logprobs, reference.topk(3).values, rtol=0, atol=1e-5)
    target_lp, _, _ = prompt_logprobs(logits, out.token_ids, 2)
    torch.testing.assert_close(target_lp, out.logprobs, rtol=0, atol=1e-5)


def test_empty_batch():
    logits = torch.zeros(0, 50)
    assert sample(logits, make_st(0)).token_ids.shape == (0,)
    out = sample(logits, make_st(0, num_top_logprobs=2))
    assert out.logprobs.shape == (0,) and out.top_ids.shape == (0, 2)
    values, top_ids, _ = prompt_logprobs(logits, torch.zeros(0, dtype=torch.int64), 3)
    assert values.shape == (0,) and top_ids.shape == (0, 3)


def test_invalid_sampling_tensors_raise():
    with pytest.raises(ValueError, match="top_p"):
        make_st(3, top_p=torch.ones(2))
    with pytest.raises(ValueError, match="output_counts"):
        make_st(3, frequency_penalty=0.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        make_st(3, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="num_top_logprobs"):
        make_st(3, num_top_logprobs=-2)
    with pytest.raises(ValueError, match="output_counts"):
        apply_penalties(
            torch.zeros(3, 5),
            make_st(3, frequency_penalty=0.5, output_counts=torch.zeros(3, 4, dtype=torch.int32)),
        )


def test_slot_sampling_takes_new_slots_as_the_ring_delivers_them():
    """The worker's per-slot state reads each NewSlot's attributes (decoded from the ring, so its
    arrays are read-only, unaligned views): parameters, logit bias, min_tokens bans, logprobs
    (None -> -1) and the prefix-cache hits of a penalized request."""

    def new_slot(slot, params, bans=(), cached=()):
        return m.NewSlot(
            slot=slot,
            num_prompt_tokens=3,
            params=params,
            ban_token_ids=np.array(bans, np.int32),
            cached_token_ids=np.array(cached, np.int32),
        )

    plan = m.CODEC.decode(
        m.CODEC.encode(
            m.StepPlan(
                step_id=1,
                new_slots=[
                    new_slot(
                        2,
                        SamplingParams(
                            temperature=0.5, top_k=-1, seed=7, logprobs=2, logit_bias={4: -100.0, 1: 2.5}
                        ),
                    ),
                    new_slot(
                        0,
                        SamplingParams(top_p=0.0, seed=-3, min_tokens=2, presence_penalty=1.0),
                        bans=(0, 5),
                        cached=(6, 6),
                    ),
                ],
                **{
                    name: np.zeros(0, np.uint8 if name in ("do_sample", "prompt_logprobs_rows") else np.int32)
                    for name in (
                        "freed_slots",
                        "slots",
                        "num_new_tokens",
                        "num_computed_tokens",
                        "input_ids",
                        "do_sample",
                        "prompt_logprobs_rows",
                        "prompt_targets",
                    )
                },
                block_appends=np.zeros((0, 2), np.int32),
            )
        )
    )
    state = SlotSampling(max_num_seqs=4, vocab_size=8, device=torch.device("cpu"))
    state.admit(plan.new_slots)
    p = state.params
    assert p["temperature"][[2, 0]].tolist() == [0.5, 1.0]
    assert p["top_k"][[2, 0]].tolist() == [0, 1] and p["seed"][[2, 0]].tolist() == [7, -3]
    assert p["logprobs"][[2, 0]].tolist() == [2, -1]
    assert p["prompt_logprobs"][[2, 0]].tolist() == [-1, -1]
    assert state.is_penalized.tolist() == [True, False, False, False]
    assert sorted(zip(*(a.tolist() for a in state.bias))) == [(2, 1, 2.5), (2, 4, -100.0)]
    assert sorted(zip(*(a.tolist() for a in state.bans))) == [(0, 0, -np.inf), (0, 5, -np.inf)]
    assert state.output_counts.sum() == 0
    assert state.prompt_mask[0].nonzero().flatten().tolist() == [6]
    # Row 0 has generated 1 < min_tokens 2 tokens at position 4: its bans apply with the bias.
    st = state.tensors(np.array([0, 2]), np.array([4, 3]))
    assert st.top_k.tolist() == [1, 0] and st.num_top_logprobs == 2
    rows, tokens, values = (t.tolist() for t in st.logit_bias)
    assert sorted(zip(rows, tokens, values)) == [
        (0, 0, -np.inf),
        (0, 5, -np.inf),
        (1, 1, 2.5),
        (1, 4, -100.0),
    ]
