"""Unit tests for the synchronous scheduler core, driven by a fake worker and a fake model.

The fake worker rebuilds each slot's block table and token history from the plan diffs alone
(``freed_slots``, ``new_reqs``, ``block_appends``, ``input_ids``) and checks them against the
scheduler after every step. Its fake KV cache holds, per token slot, the model state after that
token — a function of every token before it, as real KV is — and a row starts from the state it
reads in the cache, so feeding wrong tokens or serving KV from a wrong block changes the output.
"""

import os
import random

import msgspec
import numpy as np
import pytest

from mi.actors import messages as m
from mi.actors.scheduler.block_manager import InvariantError, peak_blocks
from mi.actors.scheduler.core import FREED, RequestOutput, SamplingParams, SchedulerCore, StepPlan
from mi.shm import CodecError

EOS = 0
INITIAL_STATE = 7


def make_core(**overrides) -> SchedulerCore:
    config = dict(
        num_blocks=64,
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        max_model_len=256,
        eos_token_ids=(EOS,),
    )
    config.update(overrides)
    return SchedulerCore(**config)


def params(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)


def prompt(n: int, start: int = 1) -> list[int]:
    return [start + i for i in range(n)]


def fold(state: int, token: int) -> int:
    return (state * 31 + token) % 1_000_003


def fold_all(tokens: list[int], state: int = INITIAL_STATE) -> int:
    for t in tokens:
        state = fold(state, t)
    return state


def next_token(state: int) -> int:
    """The fake model's next token after ``state``; never EOS."""
    return 1 + state % 997


def eos_model(state: int) -> int:
    """Like ``next_token``, but EOS about one time in 13."""
    token = next_token(state)
    return EOS if token % 13 == 0 else token


def fake_model(tokens: list[int]) -> int:
    """Deterministic next token from all previous ones; never EOS."""
    return next_token(fold_all(tokens))


class FakeWorker:
    """Mirror of the worker side, from diffs only: per-slot block tables, token histories, a fake
    KV cache (block id -> model state after each of its token slots) and the prompt targets seen
    (req_id -> {position: token id}, restarted when a row starts at position 0)."""

    def __init__(self, core: SchedulerCore, model=next_token):
        self.core, self.model = core, model
        self.tables: dict[int, list[int]] = {}
        self.history: dict[int, list[int]] = {}
        self.slot_req: dict[int, int] = {}
        self.num_prompt: dict[int, int] = {}
        self.kv: dict[int, list[int | None]] = {}
        self.prompt_targets: dict[int, dict[int, int]] = {}

    def apply(self, plan: StepPlan) -> list[int]:
        bs = self.core.block_size
        for slot in plan.freed_slots.tolist():
            del self.tables[slot], self.history[slot], self.slot_req[slot], self.num_prompt[slot]
        for new in plan.new_reqs:
            assert new.slot not in self.tables, "slot reused without being freed"
            assert new.cached_token_ids.dtype == np.int32 and len(new.cached_token_ids) % bs == 0
            self.tables[new.slot], self.history[new.slot] = [], new.cached_token_ids.tolist()
            self.slot_req[new.slot], self.num_prompt[new.slot] = new.req_id, new.num_prompt_tokens
        for slot, block_id in plan.block_appends.tolist():
            self.tables[slot].append(block_id)
        assert plan.input_ids.dtype == np.int32 and plan.slots.dtype == np.int32
        assert int(plan.num_new_tokens.sum()) == len(plan.input_ids)
        rows = list(
            zip(
                plan.slots.tolist(),
                plan.req_ids,
                plan.num_computed_tokens.tolist(),
                plan.num_new_tokens.tolist(),
                plan.do_sample.tolist(),
                plan.prompt_logprobs_rows.tolist(),
            )
        )
        # NOTE: every row reads its cached prefix before any row writes: KV written in a step must
        # not be read by another row of the same step.
        core_tables = self.core.block_tables()
        for slot, _, start, n, *_ in rows:
            self.check_window_held(slot, start, n, core_tables[slot])
        states = [self.read_state(slot, start) for slot, _, start, *_ in rows]
        sampled, offset, num_targets = [], 0, 0
        for (slot, req_id, start, n, do_sample, wants_targets), state in zip(rows, states):
            assert self.slot_req[slot] == req_id
            assert len(self.history[slot]) == start, "chunk does not start at the cached length"
            assert state == fold_all(self.history[slot]), "cached KV holds other tokens"
            new_ids = plan.input_ids[offset : offset + n].tolist()
            offset += n
            assert len(self.tables[slot]) * bs >= start + n
            for pos, token in enumerate(new_ids, start):
                block_id = self.tables[slot][pos // bs]
                assert self.core.blocks.ref_count(block_id) == 1, "writes into a shared block"
                state = fold(state, token)
                self.kv.setdefault(block_id, [None] * bs)[pos % bs] = state
            self.history[slot] += new_ids
            if do_sample:
                sampled.append(self.model(state))
            if wants_targets:
                targets = plan.prompt_targets[num_targets : num_targets + n].tolist()
                num_targets += n
                self.record_targets(slot, req_id, start, targets)
        assert num_targets == len(plan.prompt_targets) and plan.prompt_targets.dtype == np.int32
        assert self.tables.keys() == core_tables.keys(), "diffs do not reproduce the slots"
        for slot, table in self.tables.items():  # the mirror keeps the ids of freed entries
            assert len(table) == len(core_tables[slot]), "diffs do not reproduce the tables"
            assert all(c in (FREED, b) for b, c in zip(table, core_tables[slot])), "tables differ"
        return sampled

    def check_window_held(self, slot: int, start: int, num_new: int, core_table: list[int]) -> None:
        """Every block this row's queries can see is still the row's own (never FREED, never
        handed to someone else): under a window, keys [start - window + 1, start + num_new)."""
        window, bs = self.core.sliding_window, self.core.block_size
        first = 0 if window is None else max(0, start - window + 1)
        for i in range(first // bs, -(-(start + num_new) // bs)):
            block_id = self.tables[slot][i]
            assert core_table[i] == block_id, f"block #{i} is freed while position {first} is visible"
            assert self.core.blocks.ref_count(block_id) >= 1

    def read_state(self, slot: int, start: int) -> int:
        if start == 0:
            return INITIAL_STATE
        bs = self.core.block_size
        state = self.kv[self.tables[slot][(start - 1) // bs]][(start - 1) % bs]
        assert state is not None, "reads a KV slot never written"
        return state

    def record_targets(self, slot: int, req_id: int, start: int, targets: list[int]) -> None:
        assert start < self.num_prompt[slot], "a prompt-logprobs row past the prompt"
        if start == 0:
            self.prompt_targets[req_id] = {}
        seen = self.prompt_targets[req_id]
        for pos, target in enumerate(targets, start):
            if pos + 1 >= self.num_prompt[slot]:
                assert target == -1
                continue
            assert pos + 1 not in seen, "prompt target reported twice"
            if pos + 1 < len(self.history[slot]):
                assert target == self.history[slot][pos + 1]
            seen[pos + 1] = target


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


def run_all(
    core: SchedulerCore, worker: FakeWorker | None = None, max_steps: int = 10_000
) -> dict[int, list[int]]:
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
    return seq[len(prompt_ids) :]


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
    assert plan.num_new_tokens.tolist() == [1, 10]  # a decode and a prefill together
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
    for i in range(5):  # 30 tokens in chunks of 6
        plan, outputs = step(core, worker)
        assert plan.req_ids == [0, 1, 2]
        assert plan.num_new_tokens.tolist() == [1, 1, 6]
        assert plan.num_computed_tokens[2] == 6 * i
        assert plan.do_sample.tolist() == [True, True, i == 4]
        assert {o.req_id for o in outputs if o.req_id in (0, 1)} == {0, 1}  # decodes every step
        long_outputs += [o for o in outputs if o.req_id == 2]
    assert len(long_outputs) == 1  # output only after the last chunk
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
    run_all(core, worker)  # ``step`` checks the cap every step
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
    _, outputs = step(core, worker)  # both prefilled: all 4 blocks in use
    first_token_1 = outputs[1].token_id
    assert core.blocks.num_free == 0
    plan, _ = step(core, worker)  # req 0 needs a 3rd block
    assert plan.req_ids == [0] and plan.freed_slots.tolist() == [1]
    assert core.num_preemptions == 1 and core.num_waiting == 1
    step(core, worker)  # req 1 waits: 1 block free, 2 needed
    _, outputs = step(core, worker)
    assert outputs[0].finish_reason == "length" and core.num_running == 0
    plan, outputs = step(core, worker)  # req 1 readmitted, recomputed
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
    core.add_request(2, prompt(3), params())  # a waiting request aborts too
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


@pytest.mark.parametrize(
    "prompt_ids, max_tokens, match",
    [
        ([], 4, "empty prompt"),
        (prompt(250), 10, "exceeds max_model_len"),
        (prompt(30), 20, "KV blocks"),
    ],
)
def test_rejected_requests(prompt_ids, max_tokens, match):
    core = make_core(num_blocks=12, block_size=4)  # at most 48 cached tokens
    with pytest.raises(ValueError, match=match):
        core.add_request(0, prompt_ids, params(max_tokens=max_tokens))
    assert not core.has_unfinished()


def test_duplicate_id_is_rejected_and_boundaries_accepted():
    core = make_core(num_blocks=12, block_size=4, max_model_len=49)
    core.add_request(0, prompt(30), params(max_tokens=19))  # 48 cached tokens: fits exactly
    with pytest.raises(ValueError, match="already in use"):
        core.add_request(0, prompt(3), params())


def ring_params(fields: dict) -> SamplingParams:
    """``fields`` as the scheduler receives them: decoded from an AddRequest on the ring."""
    tag, req_id, prompt_ids, _ = msgspec.msgpack.decode(
        m.CODEC.encode(
            m.AddRequest(req_id=1, prompt_ids=np.arange(3, dtype=np.int32), params=SamplingParams())
        )
    )
    return m.CODEC.decode(msgspec.msgpack.encode([tag, req_id, prompt_ids, fields])).params


# The bounds are SamplingParams' (mi/api/sampling.py), checked wherever it is decoded: by the
# HTTP layer and on the ring. logit_bias is a {token_id: bias} dict, so the pair forms of the
# old core (duplicate ids, a dict where pairs were expected) have no wire form any more.
BAD_SAMPLING_FIELDS = (
    dict(max_tokens=0),
    dict(temperature=-1.0),
    dict(min_tokens=9),
    dict(min_p=1.5),
    dict(repetition_penalty=0.0),
    dict(presence_penalty=2.5),
    dict(frequency_penalty=-3.0),
    dict(temperature=float("nan")),
    dict(logit_bias={5: 101.0}),
    dict(logit_bias={-1: 1.0}),
    dict(logprobs=21),
    dict(prompt_logprobs=-1),
    dict(max_tokens=0, prompt_logprobs=0, min_tokens=1),
    dict(top_k=-2),
    dict(top_p=1.5),
    dict(seed=2**63),
    dict(max_tokens="8"),
    dict(unknown=1),
)


@pytest.mark.parametrize("bad", BAD_SAMPLING_FIELDS, ids=str)
def test_invalid_sampling_params(bad):
    fields = {"max_tokens": 8, **bad}
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(fields, SamplingParams)
    with pytest.raises(CodecError):
        ring_params(fields)


def test_valid_sampling_params_at_their_bounds():
    fields = dict(
        max_tokens=1,
        temperature=0.0,
        top_p=1.0,
        min_p=1.0,
        repetition_penalty=0.01,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        logprobs=20,
        prompt_logprobs=20,
        logit_bias={0: -100.0, 7: 100},
        seed=-(2**63),
    )
    for decode in (lambda f: msgspec.convert(f, SamplingParams), ring_params):
        assert decode(fields) == SamplingParams(**fields)
        assert decode(dict(max_tokens=0, prompt_logprobs=0)).max_tokens == 0
        # OpenAI's top_p 0 and vLLM's top_k -1 are valid, and arrive canonical.
        assert (decode(dict(top_p=0.0)).top_k, decode(dict(top_p=0.0)).top_p) == (1, 1.0)
        assert decode(dict(top_k=-1)).top_k == 0


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
    assert scripted(params(8, min_tokens=2), script) == (3, "stop")  # EOS is the 3rd token
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
    assert [o.req_id for o in first] == [0]  # req 1 got only half its prompt
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
    core.blocks.allocate(1)  # referenced by no block table
    with pytest.raises(InvariantError, match="table references"):
        core.check_invariants()


def reference_tokens(
    prompt_ids: list[int], p: SamplingParams, model, max_model_len: int, eos_token_ids=(EOS,)
) -> list[int]:
    """What a request must output, computed without any scheduler (-1 alone: prompt scored)."""
    if p.max_tokens == 0:
        return [-1]
    state, out = fold_all(prompt_ids), []
    while True:
        token = model(state)
        out.append(token)
        is_eos = not p.ignore_eos and token in eos_token_ids
        if len(out) > p.min_tokens and (is_eos or token in p.stop_token_ids):
            return out
        if len(out) >= p.max_tokens or len(prompt_ids) + len(out) >= max_model_len:
            return out
        state = fold(state, token)


def random_prompt(rng: random.Random, bases: list[list[int]], recent: list[list[int]]) -> list[int]:
    """Mostly prompts sharing a prefix with others: a repeat, or a base's head plus a tail."""
    if recent and rng.random() < 0.15:
        return list(rng.choice(recent[-6:]))
    head = []
    if rng.random() < 0.6:
        base = rng.choice(bases)
        head = base[: rng.randint(0, len(base))]
    tail_len = rng.randint(0 if head else 1, 40 - len(head))
    return head + prompt(tail_len, start=rng.randint(1, 900))


@pytest.mark.parametrize(
    "enable_prefix_caching, sliding_window", [(True, None), (False, None), (True, 6), (False, 9)]
)
def test_randomized_run_keeps_invariants(enable_prefix_caching, sliding_window):
    seed = int(os.environ.get("MI_TEST_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with MI_TEST_SEED={seed})")
    rng = random.Random(seed)
    max_model_len = 64
    core = make_core(
        num_blocks=14,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=12,
        max_model_len=max_model_len,
        enable_prefix_caching=enable_prefix_caching,
        sliding_window=sliding_window,
    )
    worker = FakeWorker(core, model=eos_model)
    bases = [prompt(rng.randint(4, 24), start=rng.randint(1, 900)) for _ in range(3)]
    requests: dict[int, tuple[list[int], SamplingParams]] = {}
    generated: dict[int, list[int]] = {}
    live: set[int] = set()
    next_id = num_finished = num_rejected = 0
    for i in range(10_000):
        if i < 1000 and rng.random() < 0.3:
            prompt_ids = random_prompt(rng, bases, [p for p, _ in requests.values()])
            kind = rng.random()
            if kind < 0.05:
                req_params = params(0, prompt_logprobs=rng.randint(0, 3))
            else:
                req_params = params(
                    rng.randint(1, max_model_len - len(prompt_ids)),
                    ignore_eos=rng.random() < 0.5,
                    prompt_logprobs=2 if kind < 0.15 else None,
                )
            try:
                core.add_request(next_id, prompt_ids, req_params)
                requests[next_id] = (prompt_ids, req_params)
                live.add(next_id)
            except ValueError:  # would never fit in 14 blocks
                needed = len(prompt_ids) + req_params.max_tokens - 1
                assert peak_blocks(needed, 4, sliding_window, 12) > 14
                num_rejected += 1
            next_id += 1
        if i < 1000 and live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            assert core.abort(victim) and not core.abort(victim)
            live.discard(victim)
            core.check_invariants()
        plan, outputs = step(core, worker)
        if plan is None and i >= 1000:
            break
        for out in outputs:
            assert out.req_id in live
            generated.setdefault(out.req_id, []).append(out.token_id)
            if out.finish_reason is None:
                continue
            live.discard(out.req_id)
            num_finished += 1
            prompt_ids, req_params = requests[out.req_id]
            assert generated[out.req_id] == reference_tokens(
                prompt_ids, req_params, eos_model, max_model_len
            ), f"seed={seed}"
            assert out.num_cached_tokens % 4 == 0 and out.num_cached_tokens < len(prompt_ids)
            if req_params.prompt_logprobs is not None:
                assert out.num_cached_tokens == 0
                assert worker.prompt_targets[out.req_id] == {
                    pos: prompt_ids[pos] for pos in range(1, len(prompt_ids))
                }, f"seed={seed}"
        assert core.num_running + core.num_waiting == len(live)
    stats = core.stats()
    print(f"seed={seed} finished={num_finished} rejected={num_rejected} {stats}")
    assert num_finished > 0 and not live and not core.has_unfinished(), f"seed={seed}"
    assert core.blocks.num_free == core.blocks.num_blocks and stats["num_kv_blocks_used"] == 0
    assert (stats["prefix_cache_hit_tokens"] > 0) == enable_prefix_caching, f"seed={seed}"
