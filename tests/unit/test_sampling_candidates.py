"""The sampler races on candidates (a row's top_k, or the top_p window that holds its cut) instead
of the whole vocabulary, and penalizes only the tokens a row has seen; it must give every row the
token and logprobs it got before. The tests draw seeded random batches and compare `sample` with
the frozen pre-candidate sampler (tests/sampling_oracle.py) bit for bit, and check that the
candidate path really ran."""

import pytest
import sampling_oracle
import torch

import mi.ops.draw as draw_module
import mi.ops.sampling as sampling_module
from mi.ops.draw import row_argmax, token_noise, uniform_noise
from mi.ops.penalties import apply_penalties
from mi.ops.sampling import SamplingTensors, sample


@pytest.fixture
def race_counts(monkeypatch):
    """Rows raced on candidates / on the whole vocabulary, batches that did both, and the
    candidate widths tried, over the test."""
    counts = {"candidates": 0, "full": 0, "split batches": 0, "widths": []}
    race_candidates, race_full, draw = draw_module._race_candidates, draw_module._race_full, draw_module.draw
    candidates_of = draw_module._Candidates.of

    def count_candidates(cand, *args):
        counts["candidates"] += cand.ids.shape[0]
        return race_candidates(cand, *args)

    def count_full(probs, *args):
        counts["full"] += probs.shape[0]
        return race_full(probs, *args)

    def count_split(processed, *args):
        before = dict(counts)
        token_ids = draw(processed, *args)
        counts["split batches"] += all(counts[path] > before[path] for path in ("candidates", "full"))
        return token_ids

    def record_width(probs, top_ids, width):
        counts["widths"].append(width)
        return candidates_of(probs, top_ids, width)

    monkeypatch.setattr(draw_module, "_race_candidates", count_candidates)
    monkeypatch.setattr(draw_module, "_race_full", count_full)
    monkeypatch.setattr(draw_module._Candidates, "of", staticmethod(record_width))
    monkeypatch.setattr(sampling_module, "draw", count_split)
    return counts


def set_window(monkeypatch, window: int) -> None:
    monkeypatch.setattr(draw_module, "_TOP_P_WINDOW", window)
    monkeypatch.setattr(sampling_oracle, "_TOP_P_WINDOW", window)


def pick(gen: torch.Generator, num_rows: int, choices: list) -> torch.Tensor:
    """[num_rows] values drawn from `choices` (each a number or a callable of the row count)."""
    columns = [c(num_rows) if callable(c) else torch.full((num_rows,), float(c)) for c in choices]
    which = torch.randint(0, len(choices), (num_rows,), generator=gen)
    return torch.stack(columns, dim=1).gather(1, which[:, None]).squeeze(1)


def random_batch(gen: torch.Generator, num_rows: int, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """Logits and SamplingTensors fields for a batch that mixes every feature and edge case."""
    rand = lambda n: torch.rand(n, generator=gen)  # noqa: E731
    scale = pick(gen, num_rows, [0.3, 2.0, 5.0, 12.0])
    logits = torch.randn(num_rows, vocab_size, generator=gen) * scale[:, None]
    kind = torch.randint(0, 4, (num_rows,), generator=gen)
    logits[kind == 1] = logits[kind == 1].round()  # many exact ties, at the k-th logit too
    tied = torch.rand(num_rows, vocab_size, generator=gen) < 0.05
    kth = logits.topk(min(20, vocab_size), dim=-1).values[:, -1:]  # ties reaching past the top 20
    logits = torch.where((kind == 2)[:, None] & tied, kth, logits)
    logits[kind == 3] = logits[kind == 3].to(torch.bfloat16).float()  # bf16 resolution
    fields = {
        "temperature": pick(gen, num_rows, [0.0, 1e-6, 0.05, 1.0, lambda n: 0.2 + 1.8 * rand(n)]),
        "top_k": pick(
            gen,
            num_rows,
            [
                0,
                -1,
                1,
                5,
                50,
                vocab_size - 1,
                vocab_size,
                vocab_size + 3,
                lambda n: torch.randint(1, 70, (n,), generator=gen),
            ],
        ).long(),
        "top_p": pick(gen, num_rows, [1.0, 1.0, 0.9, 0.9999999, lambda n: 0.05 + 0.95 * rand(n)]),
        "min_p": pick(gen, num_rows, [0.0, 0.0, 0.05, lambda n: 0.5 * rand(n)]),
        "seeds": torch.randint(-(2**63), 2**63 - 1, (num_rows,), generator=gen),
        "positions": torch.randint(0, 1 << 20, (num_rows,), generator=gen),
    }
    if rand(1) < 0.5:  # penalties, neutral in some rows
        fields["repetition_penalty"] = pick(gen, num_rows, [1.0, lambda n: 0.5 + rand(n)])
        fields["presence_penalty"] = pick(gen, num_rows, [0.0, lambda n: rand(n) - 0.5])
        fields["frequency_penalty"] = pick(gen, num_rows, [0.0, lambda n: rand(n) - 0.5])
        fields["output_counts"] = torch.randint(
            0, 3, (num_rows, vocab_size), generator=gen, dtype=torch.int32
        )
        fields["prompt_mask"] = torch.rand(num_rows, vocab_size, generator=gen) < 0.2
    if rand(1) < 0.5:  # bias and bans (-inf), one row with every token banned
        num_entries = 4 * num_rows
        row_ids = torch.randint(0, num_rows, (num_entries,), generator=gen)
        token_ids = torch.randint(0, vocab_size, (num_entries,), generator=gen)
        bias = torch.where(rand(num_entries) < 0.5, float("-inf"), (rand(num_entries) - 0.5) * 20)
        all_banned = torch.randint(0, num_rows, (1,), generator=gen).expand(vocab_size)
        fields["logit_bias"] = (
            torch.cat([row_ids, all_banned]),
            torch.cat([token_ids, torch.arange(vocab_size)]),
            torch.cat([bias, torch.full((vocab_size,), float("-inf"))]),
        )
    broken = torch.randint(0, num_rows, (2,), generator=gen)
    logits[broken[0], torch.randint(0, vocab_size, (1,), generator=gen)] = float("nan")
    logits[broken[1]] = float("inf")
    if rand(1) < 0.5:
        logits = logits.to(torch.bfloat16)
    fields["num_top_logprobs"] = int(torch.randint(-1, 6, (1,), generator=gen))
    return logits, fields


def assert_same_as_oracle(logits: torch.Tensor, st: SamplingTensors, context: str) -> None:
    new, old = sample(logits, st), sampling_oracle.sample(logits, st)
    assert new.failed_rows == old.failed_rows, context
    assert torch.equal(new.token_ids, old.token_ids), (
        context,
        (new.token_ids != old.token_ids).nonzero().flatten().tolist(),
    )
    for name in ("logprobs", "top_ids", "top_logprobs"):
        new_value, old_value = getattr(new, name), getattr(old, name)
        assert (new_value is None) == (old_value is None), (context, name)
        if new_value is not None:
            torch.testing.assert_close(new_value, old_value, rtol=0, atol=0, equal_nan=True, msg=context)


@pytest.mark.parametrize("vocab_size, window", [(300, 256), (300, 8), (1000, 256), (4000, 40), (60, 3)])
def test_random_batches_match_the_full_vocabulary_sampler(monkeypatch, race_counts, vocab_size, window):
    set_window(monkeypatch, window)
    for case in range(60):
        gen = torch.Generator().manual_seed(1000 * vocab_size + case)
        logits, fields = random_batch(gen, int(torch.randint(1, 24, (1,), generator=gen)), vocab_size)
        assert_same_as_oracle(logits, SamplingTensors(**fields), f"V={vocab_size} case {case}")
    if vocab_size >= 300:  # large enough for the candidate path (4 tokens per candidate)
        assert race_counts["candidates"] > 100 and race_counts["full"] > 25, race_counts
        assert race_counts["split batches"] > 5, race_counts


def uniform_batch(num_rows: int, vocab_size: int, gen: torch.Generator, **fields) -> SamplingTensors:
    """Every row with the same parameters (scalars), random seeds."""
    values = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    values.update(fields)
    tensors = {
        name: torch.full((num_rows,), value, dtype=torch.int64 if name == "top_k" else torch.float32)
        for name, value in values.items()
    }
    seeds = torch.randint(-(2**63), 2**63 - 1, (num_rows,), generator=gen)
    return SamplingTensors(**tensors, seeds=seeds, positions=torch.arange(num_rows))


@pytest.mark.parametrize(
    "fields, path",
    [
        ({"top_k": 50}, "candidates"),
        ({"top_k": 50, "top_p": 0.9, "min_p": 0.05}, "candidates"),
        ({"top_p": 0.9}, "candidates"),  # peaked logits: every nucleus fits in the window
        ({"top_p": 0.9, "temperature": 8.0}, "full"),  # flat: the nucleus is beyond the window
        ({"min_p": 0.1}, "candidates"),
        ({"min_p": 0.1, "temperature": 8.0}, "full"),
        ({"temperature": 0.8}, "full"),
        ({"top_k": 2000}, "full"),  # more candidates than the vocabulary's quarter
    ],
)
def test_each_kind_of_row_takes_its_path_and_the_same_token(race_counts, fields, path):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 4000, generator=gen) * 4
    assert_same_as_oracle(logits, uniform_batch(64, 4000, gen, **fields), str(fields))
    assert race_counts[path] == 64 and race_counts["candidates" if path == "full" else "full"] == 0


@pytest.mark.parametrize("num_tied, widths, path", [(40, [10, 80], "candidates"), (100, [10, 80], "full")])
def test_ties_at_the_kth_logit_are_all_kept(race_counts, num_tied, widths, path):
    # The 10th best logit is shared by num_tied tokens: top_k=10 keeps them all (the filters keep
    # ties), more than 10 candidates hold: the rows try 80, which hold 49 but not 109 tokens, and
    # 640 would be more than half the vocabulary.
    gen = torch.Generator().manual_seed(6)
    num_rows, vocab_size = 4000, 1000
    row = torch.randn(vocab_size, generator=gen)
    order = row.argsort(descending=True)
    row[order[9 : 9 + num_tied]] = float(row[order[9]])
    logits = row[None, :].expand(num_rows, -1).contiguous()
    st = uniform_batch(num_rows, vocab_size, gen, top_k=10)
    tokens = sample(logits, st).token_ids
    assert set(tokens.tolist()) == set(order[: 9 + num_tied].tolist())
    assert race_counts["widths"] == widths and race_counts[path] == num_rows
    assert torch.equal(tokens, sampling_oracle.sample(logits, st).token_ids)


def test_ties_inside_the_top_k_need_no_more_candidates(race_counts):
    gen = torch.Generator().manual_seed(6)
    row = torch.randn(1000, generator=gen)
    order = row.argsort(descending=True)
    row[order[5:10]] = float(row[order[5]])
    logits = row[None, :].expand(500, -1).contiguous()
    assert_same_as_oracle(logits, uniform_batch(500, 1000, gen, top_k=10), "ties inside the top k")
    assert race_counts["widths"] == [10] and race_counts["candidates"] == 500


def test_equal_scores_pick_the_lowest_token_id():
    # On the whole vocabulary argmax breaks a tie by the lowest id; candidates come in probability
    # order. Probabilities E * 2**-4 make every score p / E exactly 2**-4.
    ids = torch.tensor([[7, 3, 5, 1, 6, 2, 4, 0]])
    seeds, positions = torch.tensor([3]), torch.tensor([1])
    exp_noise = token_noise(seeds, positions, ids).log_().neg_()
    cand = draw_module._Candidates(ids, exp_noise * 2**-4, torch.zeros(1))
    ones, off = torch.ones(1), torch.zeros(1, dtype=torch.bool)
    params = draw_module.DrawParams(ones, ones.long(), off, ones, off, 0 * ones, seeds, positions)
    plan = draw_module.DrawPlan(8, 8, any_top_p=False, any_min_p=False, any_window=False)
    assert draw_module._race_candidates(cand, torch.zeros(1), torch.zeros(1), params, plan).tolist() == [0]


def test_token_noise_is_uniform_noise_at_those_tokens():
    gen = torch.Generator().manual_seed(7)
    seeds = torch.randint(-(2**63), 2**63 - 1, (5,), generator=gen)
    positions = torch.randint(0, 1 << 30, (5,), generator=gen)
    token_ids = torch.randint(0, 32000, (5, 64), generator=gen)
    full = uniform_noise(seeds, positions, 32000)
    assert torch.equal(token_noise(seeds, positions, token_ids), full.gather(1, token_ids))


@pytest.mark.parametrize("vocab_size", [32000, 50257, 130, 100, 7])
def test_row_argmax_is_argmax(vocab_size):
    gen = torch.Generator().manual_seed(vocab_size)
    x = torch.randint(0, 4, (64, vocab_size), generator=gen).float()  # many ties
    x[0, -1] = 9.0  # the last token, in a short last block
    x[1, vocab_size // 2 :] = 9.0
    x[2, 3] = x[2, -1] = float("nan")
    x[3] = float("-inf")
    x[4] = float("nan")
    x[5, -1] = float("nan")
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))


@pytest.mark.parametrize("which", ["all", "repetition", "frequency", "presence", "prompt only"])
def test_penalties_on_seen_tokens_equal_the_dense_penalties(which):
    # apply_penalties works on the entries a row has seen; the oracle on all [B, V]. They agree
    # but for the sign of a zero logit (x - 0 * f is -0.0 - -0.0 = +0.0 on the dense path).
    gen = torch.Generator().manual_seed(8)
    num_rows, vocab_size = 12, 500
    logits = torch.randn(num_rows, vocab_size, generator=gen) * 3
    logits[0, :5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    counts = torch.randint(0, 4, (num_rows, vocab_size), generator=gen, dtype=torch.int32)
    counts *= torch.rand(num_rows, vocab_size, generator=gen) < 0.05
    fields = dict(
        temperature=torch.ones(num_rows),
        top_p=torch.ones(num_rows),
        top_k=torch.zeros(num_rows, dtype=torch.int64),
        min_p=torch.zeros(num_rows),
        seeds=torch.arange(num_rows),
        positions=torch.arange(num_rows),
        repetition_penalty=torch.tensor([1.0, 1.3, 0.7, float("inf"), 1e-30] + [1.2] * 7),
        presence_penalty=torch.rand(num_rows, generator=gen) * 4 - 2,
        frequency_penalty=torch.rand(num_rows, generator=gen) * 4 - 2,
        output_counts=counts,
        prompt_mask=torch.rand(num_rows, vocab_size, generator=gen) < 0.1,
        logit_bias=(
            torch.tensor([1, 1, 2]),
            torch.tensor([3, 3, 9]),
            torch.tensor([1.0, float("-inf"), 5.0]),
        ),
    )
    drop = {
        "all": (),
        "repetition": ("presence_penalty", "frequency_penalty"),
        "frequency": ("repetition_penalty", "presence_penalty", "prompt_mask"),
        "presence": ("repetition_penalty", "frequency_penalty", "prompt_mask"),
        "prompt only": ("presence_penalty", "frequency_penalty", "output_counts"),
    }[which]
    st = SamplingTensors(**{name: value for name, value in fields.items() if name not in drop})
    new, old = apply_penalties(logits, st), sampling_oracle.apply_penalties(logits, st)
    assert not torch.equal(new, logits)
    torch.testing.assert_close(new + 0.0, old + 0.0, rtol=0, atol=0, equal_nan=True)
