"""Sliding window in the scheduler core: blocks that fall out of every window go back to the
pool while the request runs, so a request holds about window + chunk tokens of KV whatever its
length. Driven by the fake worker of test_scheduler_core, which checks at every step that each
block a row's queries can see is still that row's own.
"""

import pytest
from test_scheduler_core import FakeWorker, expected_tokens, make_core, params, prompt, step

from mi.actors.scheduler.block_manager import num_blocks_for, peak_blocks
from mi.actors.scheduler.core import FREED


def run_tracking_usage(core, worker) -> tuple[dict[int, list[int]], int]:
    tokens, most_used = {}, 0
    while True:
        plan, outputs = step(core, worker)
        if plan is None:
            break
        most_used = max(most_used, core.blocks.num_used)
        for out in outputs:
            tokens.setdefault(out.req_id, []).append(out.token_id)
    assert not core.has_unfinished() and core.blocks.num_free == core.blocks.num_blocks
    return tokens, most_used


@pytest.mark.parametrize("window", [2, 5, 8, 13])
def test_blocks_behind_the_window_are_freed_and_outputs_unchanged(window):
    core = make_core(block_size=4, max_num_batched_tokens=8, sliding_window=window)
    worker = FakeWorker(core)
    prompt_ids = prompt(50)
    core.add_request(0, prompt_ids, params(max_tokens=60))
    tokens, most_used = run_tracking_usage(core, worker)
    assert tokens[0] == expected_tokens(prompt_ids, 60)
    whole = num_blocks_for(50 + 60 - 1, 4)
    assert most_used <= peak_blocks(50 + 60 - 1, 4, window, 8) < whole


def test_freed_entries_are_the_leading_ones_only():
    core = make_core(block_size=4, max_num_batched_tokens=8, sliding_window=6)
    worker = FakeWorker(core)
    core.add_request(0, prompt(30), params(max_tokens=10))
    for _ in range(4):  # 30 prompt tokens in chunks of 8, 8, 8, 6
        step(core, worker)
    (table,) = core.block_tables().values()
    # 30 computed: the next query (position 30) sees keys 25..30, so blocks 0..5 (keys 0..23) are gone
    assert table[:6] == [FREED] * 6 and FREED not in table[6:]
    assert core.blocks.num_used == len(table) - 6


def test_a_request_longer_than_the_cache_fits_under_a_window():
    """Without a window 200 tokens need 50 blocks of 4; with window 8 and chunks of 8 it never
    holds more than 5, so a 6-block cache serves it."""
    kw = dict(num_blocks=6, block_size=4, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="KV blocks even alone"):
        make_core(**kw).add_request(0, prompt(120), params(max_tokens=80))
    core = make_core(**kw, sliding_window=8)
    core.add_request(0, prompt(120), params(max_tokens=80))
    tokens, most_used = run_tracking_usage(core, FakeWorker(core))
    assert tokens[0] == expected_tokens(prompt(120), 80) and most_used <= 5


def test_freed_blocks_serve_other_requests_at_once():
    """Two long requests in a cache that cannot hold both whole: the blocks one frees are
    handed to the other (the fake worker checks no visible block is ever reused)."""
    core = make_core(num_blocks=12, block_size=4, max_num_batched_tokens=8, sliding_window=8)
    worker = FakeWorker(core)
    a, b = prompt(40, start=1), prompt(40, start=500)
    core.add_request(0, a, params(max_tokens=30))
    core.add_request(1, b, params(max_tokens=30))
    tokens, most_used = run_tracking_usage(core, worker)
    assert tokens == {0: expected_tokens(a, 30), 1: expected_tokens(b, 30)}
    assert core.num_preemptions == 0 and most_used <= 12


def test_prefix_hit_frees_the_hit_blocks_behind_the_window_at_admission():
    core = make_core(block_size=4, max_num_batched_tokens=64, sliding_window=8)
    worker = FakeWorker(core)
    shared = prompt(41)
    core.add_request(0, shared, params(max_tokens=3))
    first, _ = run_tracking_usage(core, worker)
    core.add_request(1, shared, params(max_tokens=3))
    plan, outputs = step(core, worker)
    assert plan.num_computed_tokens.tolist() == [40]  # 10 cached blocks hit
    (table,) = core.block_tables().values()
    # 41 computed after this step: the next query (position 41) sees keys 34..41, so blocks
    # 0..7 (keys 0..31) are freed, most of them straight at admission
    assert table[:8] == [FREED] * 8 and FREED not in table[8:]
    rest, _ = run_tracking_usage(core, worker)
    second = [out.token_id for out in outputs] + rest[1]
    assert first[0] == second == expected_tokens(shared, 3)


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="sliding_window"):
        make_core(sliding_window=0)
