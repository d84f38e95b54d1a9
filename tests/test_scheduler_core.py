"""Unit tests for the synchronous scheduler core, driven by a fake worker and a fake model.

The fake worker rebuilds each slot's block table and token history from the plan diffs alone
(``freed_slots``, ``new_reqs``, ``block_appends``, ``input_ids``) and checks them against the
scheduler after every step; the fake model's next token is a function of all previous tokens, so
any scheduling bug that feeds the wrong tokens changes the output.
"""
import os
import random

import numpy as np
import pytest

from mi.actors.block_manager import InvariantError
from mi.actors.scheduler_core import RequestOutput, SamplingParams, SchedulerCore, StepPlan

EOS = 0


def make_core(**overrides) -> SchedulerCore:
    config = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                  max_model_len=256, eos_token_ids=(EOS,))
    config.update(overrides)
    return SchedulerCore(**config)


def params(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)


def prompt(n: int, start: int = 1) -> list[int]:
    return [start + i for i in range(n)]


def fake_model(tokens: list[int]) -> int:
    """Deterministic next token from all previous ones; never EOS."""
    h = 7
    for t in tokens:
        h = (h * 31 + t) % 1_000_003
    return 1 + h % 997


class FakeWorker:
    """Mirror of the worker side: per-slot block tables and token histories, from diffs only."""

    def __init__(self, core: SchedulerCore, model=fake_model):
        self.core, self.model = core, model
        self.tables: dict[int, list[int]] = {}
        self.history: dict[int, list[int]] = {}
        self.slot_req: dict[int, int] = {}

    def apply(self, plan: StepPlan) -> list[int]:
        for slot in plan.freed_slots.tolist():
            del self.tables[slot], self.history[slot], self.slot_req[slot]
        for new in plan.new_reqs:
            assert new.slot not in self.tables, "slot reused without being freed"
            self.tables[new.slot], self.history[new.slot] = [], []
            self.slot_req[new.slot] = new.req_id
        for slot, block_id in plan.block_appends.tolist():
            self.tables[slot].append(block_id)
        assert plan.input_ids.dtype == np.int32 and plan.slots.dtype == np.int32
        assert int(plan.num_new_tokens.sum()) == len(plan.input_ids)
        sampled, offset = [], 0
        for slot, req_id, start, n, do_sample in zip(
                plan.slots.tolist(), plan.req_ids, plan.num_computed_tokens.tolist(),
                plan.num_new_tokens.tolist(), plan.do_sample.tolist()):
            assert self.slot_req[slot] == req_id
            assert len(self.history[slot]) == start, "chunk does not start at the cached length"
            self.history[slot] += plan.input_ids[offset:offset + n].tolist()
            offset += n
            assert len(self.tables[slot]) * self.core.block_size >= start + n
            if do_sample:
                sampled.append(self.model(self.history[slot]))
        assert self.tables == self.core.block_tables(), "diffs do not reproduce the tables"
        return sampled


def step(core: SchedulerCore, worker: FakeWorker) -> tuple[StepPlan | None, list[RequestOutput]]:
    plan = core.schedule()
    if plan is None:
        return None, []
    assert len(plan.req_ids) <= core.max_num_seqs
    assert 0 < int(plan.num_new_tokens.sum()) <= core.max_num_batched_tokens
    core.check_invariants()
    outputs = core.update(plan, worker.apply(plan))
    core.check_invariants()
    return plan, outputs


def run_all(core: SchedulerCore, worker: FakeWorker | None = None,
            max_steps: int = 10_000) -> dict[int, list[int]]:
    """Run until idle; return the generated tokens per request."""
    worker, tokens = worker or FakeWorker(core), {}
    for _ in range(max_steps):
        plan, outputs = step(core, worker)
        if plan is None:
            break
        for out in outputs:
            tokens.setdefault(out.req_id, []).append(out.token_id)
    assert not core.has_unfinished()
    assert core.blocks.num_free == core.blocks.num_blocks
    return tokens


def run_all_with(core, workload):
    for req_id, prompt_ids, max_tokens in workload:
        core.add_request(req_id, prompt_ids, params(max_tokens=max_tokens))
    return run_all(core)


def expected_tokens(prompt_ids: list[int], max_tokens: int) -> list[int]:
    seq = list(prompt_ids)
    for _ in range(max_tokens):
        seq.append(fake_model(seq))
    return seq[len(prompt_ids):]


def test_mixed_prefill_and_decode_in_one_step():
    core = make_core(max_num_batched_tokens=16)
    worker = FakeWorker(core)
    core.add_request(0, prompt(5), params())
    plan, outputs = step(core, worker)
    assert plan.num_new_tokens.tolist() == [5] and plan.num_computed_tokens.tolist() == [0]
    assert outputs == [RequestOutput(0, expected_tokens(prompt(5), 1)[0], None)]
    first_token = outputs[0].token_id
    core.add_request(1, prompt(10, start=100), params())
    plan, outputs = step(core, worker)
    assert plan.req_ids == [0, 1]
    assert plan.num_new_tokens.tolist() == [1, 10]        # a decode and a prefill together
    assert plan.num_computed_tokens.tolist() == [5, 0]
    assert plan.input_ids.tolist() == [first_token] + prompt(10, start=100)
    assert plan.do_sample.tolist() == [True, True] and len(outputs) == 2


def test_chunked_prefill_alongside_running_decodes():
    core = make_core(max_num_batched_tokens=8)
    worker = FakeWorker(core)
    for req_id in (0, 1):
        core.add_request(req_id, prompt(3, start=10 * req_id + 1), params(max_tokens=20))
    step(core, worker)
    core.add_request(2, prompt(30, start=500), params(max_tokens=2))
    long_outputs = []
    for i in range(5):                                     # 30 tokens in chunks of 6
        plan, outputs = step(core, worker)
        assert plan.req_ids == [0, 1, 2]
        assert plan.num_new_tokens.tolist() == [1, 1, 6]
        assert plan.num_computed_tokens[2] == 6 * i
        assert plan.do_sample.tolist() == [True, True, i == 4]
        assert {o.req_id for o in outputs if o.req_id in (0, 1)} == {0, 1}  # decodes every step
        long_outputs += [o for o in outputs if o.req_id == 2]
    assert len(long_outputs) == 1                           # output only after the last chunk
    assert long_outputs[0].token_id == expected_tokens(prompt(30, start=500), 1)[0]
    run_all(core, worker)


def test_request_added_mid_run_joins_next_step():
    core = make_core()
    worker = FakeWorker(core)
    core.add_request(0, prompt(4), params(max_tokens=10))
    step(core, worker)
    step(core, worker)
    core.add_request(7, prompt(4, start=50), params(max_tokens=3))
    plan, _ = step(core, worker)
    assert plan.req_ids == [0, 7]
    assert [n.req_id for n in plan.new_reqs] == [7]


def test_max_num_seqs_is_respected():
    workload = [(i, prompt(3, start=i * 10 + 1), 4) for i in range(5)]
    core = make_core(max_num_seqs=2)
    for req_id, prompt_ids, max_tokens in workload:
        core.add_request(req_id, prompt_ids, params(max_tokens=max_tokens))
    worker = FakeWorker(core)
    plan, _ = step(core, worker)
    assert plan.req_ids == [0, 1] and core.num_running == 2 and core.num_waiting == 3
    run_all(core, worker)                                  # ``step`` checks the cap every step
    core = make_core(max_num_seqs=2)
    assert run_all_with(core, workload) == {i: expected_tokens(p, m) for i, p, m in workload}


def test_preemption_under_block_pressure_keeps_outputs_identical():
    workload = [(i, prompt(5 + 3 * i, start=1 + 40 * i), 12 + i) for i in range(6)]

    def run(num_blocks: int) -> tuple[dict[int, list[int]], int]:
        core = make_core(num_blocks=num_blocks, block_size=2, max_num_batched_tokens=16)
        for req_id, prompt_ids, max_tokens in workload:
            core.add_request(req_id, prompt_ids, params(max_tokens=max_tokens))
        return run_all(core), core.num_preemptions

    relaxed, relaxed_preemptions = run(num_blocks=256)
    largest = max(len(p) + m - 1 for _, p, m in workload)
    pressured, num_preemptions = run(num_blocks=(largest + 1) // 2)
    assert relaxed_preemptions == 0 and num_preemptions > 0
    assert pressured == relaxed
    assert relaxed == {i: expected_tokens(p, m) for i, p, m in workload}


def test_preemption_by_recompute_step_by_step():
    core = make_core(num_blocks=4, block_size=2)
    worker = FakeWorker(core)
    core.add_request(0, prompt(4), params(max_tokens=4))
    core.add_request(1, prompt(3, start=9), params(max_tokens=2))
    _, outputs = step(core, worker)                        # both prefilled: all 4 blocks in use
    first_token_1 = outputs[1].token_id
    assert core.blocks.num_free == 0
    plan, _ = step(core, worker)                           # req 0 needs a 3rd block
    assert plan.req_ids == [0] and plan.freed_slots.tolist() == [1]
    assert core.num_preemptions == 1 and core.num_waiting == 1
    step(core, worker)                                     # req 1 waits: 1 block free, 2 needed
    _, outputs = step(core, worker)
    assert outputs[0].finish_reason == "length" and core.num_running == 0
    plan, outputs = step(core, worker)                     # req 1 readmitted, recomputed
    assert [(n.slot, n.req_id) for n in plan.new_reqs] == [(0, 1)]
    assert plan.freed_slots.tolist() == [0] and plan.num_computed_tokens.tolist() == [0]
    assert plan.input_ids.tolist() == prompt(3, start=9) + [first_token_1]
    assert outputs == [RequestOutput(1, expected_tokens(prompt(3, start=9), 2)[1], "length")]
    assert core.schedule() is None and core.blocks.num_free == 4


def test_abort_frees_blocks_and_is_idempotent():
    core = make_core()
    worker = FakeWorker(core)
    core.add_request(0, prompt(9), params())
    core.add_request(1, prompt(3), params())
    step(core, worker)
    assert core.blocks.num_free < core.blocks.num_blocks
    slot = next(s for s, req_id in worker.slot_req.items() if req_id == 0)
    assert core.abort(0) is True
    assert core.abort(0) is False
    assert core.abort(12345) is False
    core.check_invariants()
    plan, _ = step(core, worker)
    assert slot in plan.freed_slots.tolist() and plan.req_ids == [1]
    assert core.abort(1) and not core.has_unfinished()
    assert core.blocks.num_free == core.blocks.num_blocks
    core.add_request(2, prompt(3), params())               # a waiting request aborts too
    assert core.abort(2) and core.num_waiting == 0 and core.schedule() is None
    core.check_invariants()


def test_abort_or_schedule_while_a_plan_is_in_flight_is_an_error():
    core = make_core()
    core.add_request(0, prompt(3), params())
    plan = core.schedule()
    with pytest.raises(RuntimeError):
        core.abort(0)
    with pytest.raises(RuntimeError):
        core.schedule()
    with pytest.raises(ValueError, match="expected 1 sampled tokens"):
        core.update(plan, [])
    core.update(plan, [5])
    with pytest.raises(RuntimeError):
        core.update(plan, [5])


@pytest.mark.parametrize("prompt_ids, max_tokens, match", [
    ([], 4, "empty prompt"),
    (prompt(250), 10, "exceeds max_model_len"),
    (prompt(30), 20, "KV blocks"),
])
def test_rejected_requests(prompt_ids, max_tokens, match):
    core = make_core(num_blocks=12, block_size=4)          # at most 48 cached tokens
    with pytest.raises(ValueError, match=match):
        core.add_request(0, prompt_ids, params(max_tokens=max_tokens))
    assert not core.has_unfinished()


def test_duplicate_id_is_rejected_and_boundaries_accepted():
    core = make_core(num_blocks=12, block_size=4, max_model_len=49)
    core.add_request(0, prompt(30), params(max_tokens=19))  # 48 cached tokens: fits exactly
    with pytest.raises(ValueError, match="already in use"):
        core.add_request(0, prompt(3), params())


def test_invalid_sampling_params():
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1),
                dict(min_tokens=9)):
        with pytest.raises(ValueError):
            SamplingParams(**{"max_tokens": 8, **bad})


def scripted(req_params: SamplingParams, script: list[int], **core_overrides):
    """Run one request whose model emits ``script`` in order; return (num_outputs, reason)."""
    core = make_core(**core_overrides)
    core.add_request(0, prompt(3), req_params)
    outputs, it = [], iter(script)
    while (plan := core.schedule()) is not None:
        outputs += core.update(plan, [next(it) for _ in range(int(plan.do_sample.sum()))])
        core.check_invariants()
    assert all(o.finish_reason is None for o in outputs[:-1])
    return len(outputs), outputs[-1].finish_reason


def test_stop_conditions():
    script = [5, 6, EOS, 7, 8, 9, 10, 11]
    assert scripted(params(8), script) == (3, "stop")
    assert scripted(params(8, ignore_eos=True), script) == (8, "length")
    assert scripted(params(8, ignore_eos=True, stop_token_ids=(7,)), script) == (4, "stop")
    assert scripted(params(8, stop_token_ids=(7,)), script) == (3, "stop")
    assert scripted(params(2), script) == (2, "length")
    assert scripted(params(8), [6], eos_token_ids=(5, 6)) == (1, "stop")


def test_min_tokens_holds_back_eos_and_stop_ids():
    script = [5, 6, EOS, 7, 8, 9, 10, 11]
    assert scripted(params(8, min_tokens=2), script) == (3, "stop")   # EOS is the 3rd token
    assert scripted(params(8, min_tokens=3), script) == (8, "length")
    assert scripted(params(8, min_tokens=3, stop_token_ids=(9,)), script) == (6, "stop")
    assert scripted(params(8, min_tokens=6, stop_token_ids=(9,)), script) == (8, "length")


def test_token_budget_smaller_than_the_batch_serves_oldest_first():
    workload = [(i, prompt(2, start=1 + 5 * i), 6) for i in range(4)]
    core = make_core(max_num_batched_tokens=3)
    worker = FakeWorker(core)
    for req_id, prompt_ids, max_tokens in workload:
        core.add_request(req_id, prompt_ids, params(max_tokens=max_tokens))
    plan, first = step(core, worker)
    assert plan.req_ids == [0, 1] and plan.num_new_tokens.tolist() == [2, 1]
    assert [o.req_id for o in first] == [0]                # req 1 got only half its prompt
    plan, second = step(core, worker)
    assert plan.req_ids == [0, 1, 2] and plan.num_new_tokens.tolist() == [1, 1, 1]
    tokens = run_all(core, worker)
    for out in reversed(first + second):
        tokens[out.req_id].insert(0, out.token_id)
    assert tokens == {i: expected_tokens(p, m) for i, p, m in workload}


def test_check_invariants_detects_a_leaked_block():
    core = make_core()
    core.add_request(0, prompt(5), params())
    core.update(core.schedule(), [3])
    core.check_invariants()
    core.blocks.allocate(1)                                # referenced by no block table
    with pytest.raises(InvariantError, match="table references"):
        core.check_invariants()


def test_randomized_run_keeps_invariants():
    seed = int(os.environ.get("MI_TEST_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with MI_TEST_SEED={seed})")
    rng = random.Random(seed)
    core = make_core(num_blocks=14, block_size=4, max_num_seqs=4, max_num_batched_tokens=12,
                     max_model_len=64)
    worker = FakeWorker(core, model=lambda toks: EOS if fake_model(toks) % 13 == 0
                        else fake_model(toks))
    num_rejected = 0
    live: set[int] = set()
    next_id = num_finished = 0
    for _ in range(1000):
        if rng.random() < 0.3:
            prompt_len = rng.randint(1, 40)
            max_tokens = rng.randint(1, 64 - prompt_len)
            try:
                core.add_request(next_id, prompt(prompt_len, start=rng.randint(1, 900)),
                                 params(max_tokens=max_tokens, ignore_eos=rng.random() < 0.5))
                live.add(next_id)
            except ValueError:                            # would never fit in 14 blocks
                assert prompt_len + max_tokens - 1 > 14 * 4
                num_rejected += 1
            next_id += 1
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            assert core.abort(victim) and not core.abort(victim)
            live.discard(victim)
            core.check_invariants()
        _, outputs = step(core, worker)
        for out in outputs:
            assert out.req_id in live
            if out.finish_reason is not None:
                live.discard(out.req_id)
                num_finished += 1
        assert core.num_running + core.num_waiting == len(live)
    print(f"seed={seed} finished={num_finished} rejected={num_rejected} "
          f"preemptions={core.num_preemptions}")
    assert num_finished > 0, f"seed={seed}"
    run_all(core, worker, max_steps=5_000)                # no livelock: the rest drains

