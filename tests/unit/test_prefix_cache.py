"""Prefix caching, prompt logprobs and prompt-only requests in the scheduler core.

Driven by the fake worker of test_scheduler_core: its KV cache holds a state per token that
depends on every earlier token, so a block reused for the wrong prefix fails its checks.
"""

import hashlib

import pytest
from test_scheduler_core import (
    FakeWorker,
    expected_tokens,
    make_core,
    params,
    prompt,
    ring_params,
    run_all,
    step,
)

from mi.actors.scheduler import prefix_cache
from mi.actors.scheduler.block_manager import InvariantError
from mi.actors.scheduler.core import RequestOutput
from mi.shm import CodecError


def table_of(core, worker, req_id: int) -> list[int]:
    slot = next(s for s, r in worker.slot_req.items() if r == req_id)
    return core.block_tables()[slot]


def test_prefix_hit_shares_blocks_and_reports_cached_tokens():
    core = make_core(block_size=4)
    worker = FakeWorker(core)
    shared = prompt(10)  # 2 full blocks + 2 tokens
    core.add_request(0, shared, params(max_tokens=5))
    _, first = step(core, worker)
    core.add_request(1, shared, params(max_tokens=5))
    plan, outputs = step(core, worker)
    assert plan.req_ids == [0, 1]
    assert plan.num_computed_tokens.tolist() == [10, 8] and plan.num_new_tokens.tolist() == [1, 2]
    (new,) = plan.new_reqs
    assert new.req_id == 1 and new.num_prompt_tokens == 10
    assert new.cached_token_ids.tolist() == shared[:8]
    table_0, table_1 = table_of(core, worker, 0), table_of(core, worker, 1)
    assert table_1[:2] == table_0[:2] and table_1[2] != table_0[2]
    assert [core.blocks.ref_count(b) for b in table_1] == [2, 2, 1]
    assert [o.num_cached_tokens for o in outputs] == [0, 8]
    assert core.stats()["prefix_cache_queried_tokens"] == 20
    assert core.stats()["prefix_cache_hit_tokens"] == 8
    tokens = run_all(core, worker)
    for out in reversed(first + outputs):
        tokens[out.req_id].insert(0, out.token_id)
    assert tokens == {0: expected_tokens(shared, 5), 1: expected_tokens(shared, 5)}


def test_prompt_of_exactly_full_blocks_still_computes_its_last_token():
    core = make_core(block_size=4)
    worker = FakeWorker(core)
    core.add_request(0, prompt(8), params(max_tokens=1))
    run_all(core, worker)
    assert core.blocks.num_cached == 2  # both blocks stay cached, free
    core.add_request(1, prompt(8), params(max_tokens=1))
    plan, outputs = step(core, worker)
    assert plan.num_computed_tokens.tolist() == [4]  # 1 block of 2: the last token's logits
    assert plan.num_new_tokens.tolist() == [4]
    assert outputs == [RequestOutput(1, expected_tokens(prompt(8), 1)[0], "length", 4)]


def test_a_request_waits_for_and_then_hits_blocks_a_running_request_is_computing():
    core = make_core(block_size=4, max_num_batched_tokens=10)
    worker = FakeWorker(core)
    core.add_request(0, prompt(16), params(max_tokens=6))
    core.add_request(1, prompt(16), params(max_tokens=3))
    plan, _ = step(core, worker)  # req 0 computes 10: 2 full blocks
    assert plan.req_ids == [0]
    plan, _ = step(core, worker)  # req 0 is computing block 2: req 1 waits
    assert plan.req_ids == [0]
    plan, outputs = step(core, worker)
    assert plan.req_ids == [0, 1]
    assert plan.num_computed_tokens.tolist() == [16, 12] and plan.num_new_tokens.tolist() == [1, 4]
    assert table_of(core, worker, 1)[:3] == table_of(core, worker, 0)[:3]
    first = [o.token_id for o in outputs if o.req_id == 1]
    assert first + run_all(core, worker)[1] == expected_tokens(prompt(16), 3)


def test_identical_prompts_sent_together_share_their_blocks():
    core = make_core(block_size=4)
    worker = FakeWorker(core)
    core.add_request(0, prompt(12), params(max_tokens=4))
    core.add_request(1, prompt(12), params(max_tokens=4))
    plan, outputs = step(core, worker)  # req 1 waits for req 0's blocks
    assert plan.req_ids == [0]
    plan, outputs = step(core, worker)
    assert plan.req_ids == [0, 1]
    assert plan.num_computed_tokens.tolist() == [12, 8]  # 2 full blocks shared, 1 token computed
    assert [o.num_cached_tokens for o in outputs] == [0, 8]
    assert table_of(core, worker, 1)[:2] == table_of(core, worker, 0)[:2]
    first = [o.token_id for o in outputs if o.req_id == 1]
    assert first + run_all(core, worker)[1] == expected_tokens(prompt(12), 4)
    core.check_invariants()


def test_blocks_of_one_step_are_not_hit_in_that_step():
    """Requests admitted in one step never read each other's blocks: with different tails
    (no block to wait for) both compute their shared-looking prefix privately."""
    core = make_core(block_size=4)
    worker = FakeWorker(core)
    core.add_request(0, prompt(12), params(max_tokens=2, prompt_logprobs=0))
    core.add_request(1, prompt(12), params(max_tokens=2))
    plan, outputs = step(core, worker)  # req 0 never indexes before it is done
    assert plan.num_computed_tokens.tolist() == [0, 0]
    assert [o.num_cached_tokens for o in outputs] == [0, 0]
    assert not set(table_of(core, worker, 0)) & set(table_of(core, worker, 1))
    run_all(core, worker)
    core.check_invariants()


@pytest.mark.parametrize(
    "fake_hash, expected_num_cached",
    [
        (lambda parent, token_ids: b"same key for everything", [0, 0, 0, 0, 0, 0, 0, 0]),
        (
            lambda parent, token_ids: hashlib.sha256(bytes(token_ids)).digest(),  # ignores parents
            [0, 0, 4, 0, 0, 0, 0, 8],
        ),
    ],
)
def test_hash_collisions_never_reuse_wrong_kv(monkeypatch, fake_hash, expected_num_cached):
    monkeypatch.setattr(prefix_cache, "hash_block", fake_hash)
    core = make_core(block_size=4)
    worker = FakeWorker(core)
    p, q, r = prompt(4, start=10), prompt(4, start=20), prompt(8, start=60)
    workload = [p + [1], q + [2], p + q + [1], q + q + [2], q + p + [3], r + [4], p + q + [5], r + [6]]
    num_cached = []
    for req_id, prompt_ids in enumerate(workload):  # one at a time: all of them cached
        core.add_request(req_id, prompt_ids, params(max_tokens=3))
        worker_outputs = []
        while (result := step(core, worker))[0] is not None:
            worker_outputs += result[1]
        assert [o.token_id for o in worker_outputs] == expected_tokens(prompt_ids, 3)
        num_cached.append(worker_outputs[0].num_cached_tokens)
    # Keys collide all the time: only equal tokens behind the same chain of entries are a hit.
    assert num_cached == expected_num_cached
    core.check_invariants()


def test_lru_eviction_of_unreferenced_cached_blocks():
    core = make_core(num_blocks=6, block_size=4)
    worker = FakeWorker(core)
    a, b, c = prompt(8, start=100), prompt(8, start=200), prompt(16, start=300)
    for req_id, prompt_ids in enumerate((a, b)):  # free list: 2 3 4 5 | a1 a0 | b1 b0
        core.add_request(req_id, prompt_ids, params(max_tokens=1))
        run_all(core, worker)
    assert core.blocks.num_cached == 4 and core.blocks.num_free == 6
    core.add_request(2, c, params(max_tokens=1))  # 4 blocks: the 2 never used, then a's
    run_all(core, worker)
    core.add_request(3, b + [1], params(max_tokens=1))
    core.add_request(4, a + [1], params(max_tokens=1))
    _, outputs = step(core, worker)
    assert {o.req_id: o.num_cached_tokens for o in outputs} == {3: 8, 4: 0}


def test_a_revived_cached_block_leaves_the_free_list():
    core = make_core(num_blocks=8, block_size=4)
    worker = FakeWorker(core)
    core.add_request(0, prompt(9), params(max_tokens=1))
    run_all(core, worker)
    cached = [
        e.block_id for e in core.blocks.match_prefix([prefix_cache.hash_block(b"", prompt(4))], prompt(4))
    ]
    assert len(cached) == 1 and core.blocks.num_free == 8
    core.add_request(1, prompt(9) + [50, 51, 52, 53, 54, 55, 56, 57, 58, 59], params(max_tokens=8))
    plan, _ = step(core, worker)
    table = table_of(core, worker, 1)
    assert plan.num_computed_tokens.tolist() == [8] and table[0] == cached[0]
    assert core.blocks.ref_count(cached[0]) == 1 and core.blocks.num_free == 8 - len(table)
    assert cached[0] not in core.blocks.allocate(core.blocks.num_free)  # never handed out again
    assert core.stats()["num_kv_blocks_used"] == 8


def test_prompt_logprobs_requests_skip_the_lookup_and_get_every_target():
    core = make_core(block_size=4, max_num_batched_tokens=6)
    worker = FakeWorker(core)
    shared = prompt(10, start=30)
    core.add_request(0, shared, params(max_tokens=2))
    run_all(core, worker)
    queried = core.stats()["prefix_cache_queried_tokens"]
    core.add_request(1, shared, params(max_tokens=2, prompt_logprobs=3))
    core.add_request(2, prompt(3, start=70), params(max_tokens=2))
    plan, _ = step(core, worker)
    assert plan.req_ids == [1] and plan.num_computed_tokens.tolist() == [0]
    assert plan.prompt_logprobs_rows.tolist() == [True]
    assert plan.prompt_targets.tolist() == shared[1:7]
    plan, outputs = step(core, worker)
    assert plan.req_ids == [1, 2] and plan.num_new_tokens.tolist() == [4, 2]
    assert plan.prompt_logprobs_rows.tolist() == [True, False]
    assert plan.prompt_targets.tolist() == shared[7:] + [-1]
    assert outputs[0].num_cached_tokens == 0
    assert core.stats()["prefix_cache_queried_tokens"] == queried + 3  # req 2 only
    plan, _ = step(core, worker)
    assert not plan.prompt_logprobs_rows.any() and len(plan.prompt_targets) == 0
    run_all(core, worker)
    assert worker.prompt_targets[1] == {pos: shared[pos] for pos in range(1, 10)}


def test_max_tokens_zero_scores_the_prompt_without_sampling():
    with pytest.raises(CodecError, match="max_tokens"):
        ring_params(dict(max_tokens=0))
    with pytest.raises(CodecError, match="min_tokens"):
        ring_params(dict(max_tokens=0, prompt_logprobs=0, min_tokens=1))
    core = make_core(block_size=4, max_num_batched_tokens=4, max_model_len=6)
    worker = FakeWorker(core)
    core.add_request(0, prompt(6), params(max_tokens=0, prompt_logprobs=0))  # = max_model_len
    plan, outputs = step(core, worker)
    assert plan.do_sample.tolist() == [False] and outputs == []
    assert plan.prompt_targets.tolist() == prompt(6)[1:5]
    plan = core.schedule()
    assert plan.do_sample.tolist() == [False] and plan.prompt_targets.tolist() == [6, -1]
    assert core.update(plan, worker.apply(plan)) == [RequestOutput(0, -1, "length", 0)]
    assert not core.has_unfinished() and core.blocks.num_free == core.blocks.num_blocks
    core.check_invariants()
    core.add_request(1, [5], params(max_tokens=0, prompt_logprobs=2))  # a 1-token prompt
    plan = core.schedule()
    assert plan.prompt_logprobs_rows.tolist() == [True] and plan.prompt_targets.tolist() == [-1]
    assert core.update(plan, []) == [RequestOutput(1, -1, "length", 0)]


def test_preemption_with_prefix_caching_keeps_outputs_identical():
    shared = prompt(12, start=500)
    workload = [(i, shared + prompt(1 + i, start=40 * i + 1), 6 + i) for i in range(5)]

    def run(num_blocks: int, enable_prefix_caching: bool):
        core = make_core(
            num_blocks=num_blocks,
            block_size=2,
            max_num_batched_tokens=16,
            enable_prefix_caching=enable_prefix_caching,
        )
        worker, readmitted_with_hits, seen = FakeWorker(core), 0, set()
        for req_id, prompt_ids, max_tokens in workload:
            core.add_request(req_id, prompt_ids, params(max_tokens=max_tokens))
        tokens = {}
        while (result := step(core, worker))[0] is not None:
            plan, outputs = result
            for new in plan.new_reqs:
                readmitted_with_hits += new.req_id in seen and len(new.cached_token_ids) > 0
                seen.add(new.req_id)
            for out in outputs:
                tokens.setdefault(out.req_id, []).append(out.token_id)
        assert core.blocks.num_free == num_blocks
        return tokens, core.stats(), readmitted_with_hits

    expected = {i: expected_tokens(p, m) for i, p, m in workload}
    relaxed, relaxed_stats, _ = run(256, True)
    pressured, stats, readmitted_with_hits = run(14, True)
    uncached, uncached_stats, _ = run(14, False)
    assert relaxed == pressured == uncached == expected
    assert relaxed_stats["num_preemptions"] == 0 and stats["num_preemptions"] > 0
    assert stats["prefix_cache_hit_tokens"] > 0 and readmitted_with_hits > 0
    assert uncached_stats["prefix_cache_queried_tokens"] == 0


def test_stats():
    core = make_core(num_blocks=10, block_size=4, max_num_seqs=1)
    worker = FakeWorker(core)
    assert core.stats() == {
        "num_requests_running": 0,
        "num_requests_waiting": 0,
        "num_kv_blocks": 10,
        "num_kv_blocks_used": 0,
        "num_preemptions": 0,
        "prefix_cache_queried_tokens": 0,
        "prefix_cache_hit_tokens": 0,
    }
    core.add_request(0, prompt(9), params(max_tokens=2))
    core.add_request(1, prompt(9), params(max_tokens=2))
    core.add_request(2, prompt(9), params(max_tokens=2, prompt_logprobs=1))
    step(core, worker)
    stats = core.stats()
    assert (stats["num_requests_running"], stats["num_requests_waiting"]) == (1, 2)
    assert stats["num_kv_blocks_used"] == 3 and stats["prefix_cache_queried_tokens"] == 9
    run_all(core, worker)
    stats = core.stats()
    assert stats["num_kv_blocks_used"] == 0 and core.blocks.num_cached > 0
    assert stats["prefix_cache_queried_tokens"] == 18  # req 2 (prompt logprobs) not
    assert stats["prefix_cache_hit_tokens"] == 8


def test_check_invariants_catches_a_cached_block_with_other_tokens():
    core = make_core(block_size=4)
    worker = FakeWorker(core)
    core.add_request(0, prompt(9), params())
    step(core, worker)
    core.check_invariants()
    index = core.blocks._index
    entry = next(iter(index))
    forged = prefix_cache.CachedBlock(
        entry.block_id, entry.block_hash, (9, 9, 9, 9), entry.parent, entry.serial
    )
    index._by_block[entry.block_id] = index._by_hash[entry.block_hash] = forged
    with pytest.raises(InvariantError, match="stores other tokens"):
        core.check_invariants()


def test_prefix_caching_off_never_indexes():
    core = make_core(enable_prefix_caching=False)
    worker = FakeWorker(core)
    for req_id in range(3):
        core.add_request(req_id, prompt(13), params(max_tokens=3))
    tokens = run_all(core, worker)
    assert tokens == {i: expected_tokens(prompt(13), 3) for i in range(3)}
    assert core.blocks.num_cached == 0 and core.stats()["prefix_cache_queried_tokens"] == 0
