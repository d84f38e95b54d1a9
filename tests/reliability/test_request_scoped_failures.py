"""A request-scoped failure fails that one request, with a clear error, never silently; the rest
of the batch, and the backend, go on. Engine faults still fail the replica.

Real processes where the behaviour is about them (the session's tiny Llama backend and frontend);
the scheduler core and one worker step in process, on the real code.
"""

import asyncio
import json
import shutil
import time
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

import mi.actors.worker.model_runner as model_runner_module
from mi.actors import messages as m
from mi.actors.scheduler.core import SchedulerCore
from mi.actors.supervisor.server import make_app
from mi.actors.worker.model_runner import ModelRunner, RunnerConfig
from mi.actors.worker.row_faults import SAMPLING_FAILED
from mi.api.sampling import SamplingParams
from mi.models.parallel import TensorParallel
from mi.ops.sampling import PARAMS_NOT_FINITE

from servers import backend_headers, start_backend

VOCAB_SIZE = 500  # the tiny models' (mi.models.tiny)
PROMPT = "the quick brown fox jumps over the lazy dog, and then the dog runs after the fox"
# Real inputs that leave a row with no token to sample, from the real model's logits:
# (A repetition_penalty that made the logits infinite was one until the penalty was bounded: such
# a request is now a 400, tests/unit/test_api_validation.py.)
BROKEN = {
    # min_tokens bans the stop ids with -inf; these cover the whole vocabulary
    "all-banned": {"min_tokens": 1, "stop_token_ids": list(range(VOCAB_SIZE))},
}


async def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(url, json=body) as resp:
            return resp.status, await resp.json(content_type=None)


async def _lines(url: str, body: dict, headers: dict | None = None) -> list[bytes]:
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return [line.strip() async for line in resp.content if line.strip()]


def _assert_clean_error(error: dict) -> None:
    text = json.dumps(error)
    assert set(error) == {"message", "type", "param", "code"}, error
    assert "Traceback" not in text and "/" not in error["message"] and "0x" not in text, error


# --- item: temperature below the epsilon ---------------------------------------------------------


def test_a_tiny_temperature_answers_as_greedy(served_model):
    url = served_model.frontend_url + "/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True}
    status, greedy = asyncio.run(_post(url, {**body, "temperature": 0}))
    assert status == 200, greedy
    status, tiny = asyncio.run(_post(url, {**body, "temperature": 1e-40}))
    assert status == 200, tiny
    # Before: NaN probabilities, token 0 twelve times, an empty completion.
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"] != ""


# --- item: non-finite logits fail their request only ---------------------------------------------


@pytest.mark.parametrize("kind", list(BROKEN))
def test_logits_that_cannot_be_sampled_fail_that_request_only(served_model, kind):
    url = served_model.backend_url + "/v1/generate"
    headers = backend_headers()
    healthy = {"prompt": PROMPT, "max_tokens": 24, "ignore_eos": True, "temperature": 0.7, "seed": 3}

    async def together():
        # The healthy stream is running when the broken request joins its batch.
        healthy_lines = asyncio.create_task(_lines(url, {**healthy, "stream": True}, headers))
        broken = [
            _post(url, {"prompt": PROMPT, "max_tokens": 8, **BROKEN[kind], **extra}, headers)
            for extra in ({}, {"temperature": 0})
        ]
        return await asyncio.gather(healthy_lines, *broken)

    lines, *answers = asyncio.run(together())
    for status, body in answers:
        assert status == 500, body
        _assert_clean_error(body["error"])
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "request_failed"
        assert body["error"]["message"] == PARAMS_NOT_FINITE
    last = json.loads(lines[-1])
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 24, last
    # The same healthy request alone: the broken ones in its batch changed none of its tokens.
    status, alone = asyncio.run(_post(url, healthy, headers))
    assert status == 200 and tuple(alone["ids"]) == tuple(
        i for line in lines[1:] for i in json.loads(line)["ids"]
    )


def test_a_stream_whose_logits_cannot_be_sampled_ends_with_an_error_event(served_model):
    body = {"prompt": PROMPT, "max_tokens": 8, "stream": True, **BROKEN["all-banned"]}
    events = asyncio.run(_lines(served_model.frontend_url + "/v1/completions", body))
    assert events[-1] == b"data: [DONE]", events
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    _assert_clean_error(error)
    assert error["type"] == "server_error" and error["message"] == PARAMS_NOT_FINITE
    # The backend serves on, and once idle holds no KV block for the failed requests.
    status, ok = asyncio.run(_post(served_model.frontend_url + "/v1/completions", {"prompt": PROMPT}))
    assert status == 200, ok
    deadline = time.monotonic() + 30
    while (stats := asyncio.run(_get_stats(served_model.backend_url)))["num_kv_blocks_used"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0


async def _get_stats(url: str) -> dict:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        async with session.get(url + "/v1/stats") as resp:
            return await resp.json()


# --- the scheduler core ----------------------------------------------------------------------------


def test_the_core_drops_failed_rows_and_keeps_the_rest():
    core = SchedulerCore(
        num_blocks=32,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        max_model_len=64,
        eos_token_ids=(1,),
    )
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = {req_id: list(range(req_id * 20, req_id * 20 + 12)) for req_id in (7, 8, 9)}
    for req_id, prompt in prompts.items():
        core.add_request(req_id, prompt, params)
    plan = core.schedule()
    assert plan.req_ids == [7, 8, 9]
    outputs = core.update(plan, [5, 6, 5], failed_rows={1})
    assert [(o.req_id, o.token_id) for o in outputs] == [(7, 5), (9, 5)]
    core.check_invariants()
    assert core.num_running == 2 and core.abort(8) is False  # gone, its slot and blocks freed
    # A failed step may have written NaN into its KV: none of its blocks joined the prefix
    # index, while those of the requests that went on did.
    core.add_request(10, prompts[8], params)
    core.add_request(11, prompts[7], params)
    plan = core.schedule()
    assert plan.req_ids == [7, 9, 10, 11]
    core.update(plan, [5] * int(plan.do_sample.sum()))
    assert core.stats()["prefix_cache_hit_tokens"] == 8  # request 11's two full blocks, from 7
    core.check_invariants()


# --- one worker step, on the real model ------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(converted):
    cfg = RunnerConfig(
        model_dir=str(converted("llama", 1)),
        device="cpu",
        dtype="float32",
        block_size=16,
        max_num_seqs=4,
        max_model_len=64,
        num_kv_blocks=8,
        kv_cache_bytes=0,
    )
    return ModelRunner(cfg, TensorParallel())


def _prefill(step_id: int, seeds: list[int]) -> m.StepPlan:
    """Two fresh requests of 5 prompt tokens in slots 0 and 1, sampling with `seeds`."""
    params = [SamplingParams(temperature=0.8, seed=seed, logprobs=2) for seed in seeds]
    none = np.zeros(0, np.int32)
    return m.StepPlan(
        step_id=step_id,
        new_slots=[m.NewSlot(slot, 5, p, none, none) for slot, p in enumerate(params)],
        freed_slots=none,
        slots=np.array([0, 1], np.int32),
        num_new_tokens=np.array([5, 5], np.int32),
        num_computed_tokens=np.array([0, 0], np.int32),
        input_ids=np.array([3, 4, 5, 6, 7, 9, 8, 7, 6, 5], np.int32),
        do_sample=np.array([1, 1], np.uint8),
        block_appends=np.array([[0, 0], [1, 1]], np.int32),
        prompt_logprobs_rows=np.array([0, 0], np.uint8),
        prompt_targets=none,
    )


_FAULTY_SEED = 666


def _sampler_failing_for(seed: int | None):
    """The real sampler, raising as a request-scoped bug would: for any batch holding `seed`
    (None: every batch). No real input makes the sampler raise any more; this is the seam."""
    real = model_runner_module.sample

    def sample(logits, st):
        if seed is None or bool((st.seeds == seed).any()):
            raise IndexError("a bug that only this request's parameters reach")
        return real(logits, st)

    return sample


def test_a_sampling_exception_fails_only_the_row_that_raises(runner, monkeypatch):
    clean = runner.execute(_prefill(1, [11, 12]))
    monkeypatch.setattr(model_runner_module, "sample", _sampler_failing_for(_FAULTY_SEED))
    result = runner.execute(_prefill(2, [_FAULTY_SEED, 12]))
    assert result.failed_rows.tolist() == [0] and result.failure_reasons == [SAMPLING_FAILED]
    # The survivor, sampled alone, got what the batch would have given it.
    assert result.token_ids[1] == clean.token_ids[1]
    assert np.allclose(result.logprobs[1], clean.logprobs[1])
    assert result.top_ids[1].tolist() == clean.top_ids[1].tolist()
    assert m.CODEC.decode(m.CODEC.encode(result)).failed_rows.tolist() == [0]


def test_a_sampling_exception_of_every_row_still_fails_the_replica(runner, monkeypatch):
    monkeypatch.setattr(model_runner_module, "sample", _sampler_failing_for(None))
    with pytest.raises(IndexError):
        runner.execute(_prefill(3, [11, 12]))


def test_non_finite_model_logits_reach_the_step_result(runner, monkeypatch):
    """No real input makes the tiny model's logits non-finite (the NaN an input can cause is the
    parameters', tested through the server above), so the model's head is the seam here."""
    real = runner.model.compute_logits

    def poisoned(hidden):
        logits = real(hidden)
        logits[1, 3] = torch.nan
        return logits

    monkeypatch.setattr(runner.model, "compute_logits", poisoned)
    result = runner.execute(_prefill(4, [11, 12]))
    assert result.failed_rows.tolist() == [1]
    assert "NaN or infinite logits" in result.failure_reasons[0]


# --- the backend's catch-all -----------------------------------------------------------------------


def test_an_unexpected_error_in_a_backend_handler_is_an_error_body(converted, tmp_path):
    # A model directory whose tokenizer file an operator broke after start-up: GET /v1/tokenizer
    # reads it on each request and raises. Before: aiohttp's plain-text 500.
    model_dir = shutil.copytree(converted("llama", 1), tmp_path / "model")
    proc, port = start_backend(model_dir)
    try:
        (model_dir / "tokenizer_config.json").write_bytes(b"\xff\xfe not utf-8")
        url = f"http://127.0.0.1:{port}"

        async def get(path):
            async with aiohttp.ClientSession(headers=backend_headers()) as session:
                async with session.get(url + path) as resp:
                    return resp.status, resp.content_type, await resp.json(content_type=None)

        status, content_type, body = asyncio.run(get("/v1/tokenizer"))
        assert (status, content_type) == (500, "application/json"), body
        _assert_clean_error(body["error"])
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
        assert str(tmp_path) not in json.dumps(body)
        proc.wait_for_output("unexpected error in GET /v1/tokenizer", timeout=30)
        assert proc.output.count("Traceback") == 1, proc.output
        assert asyncio.run(get("/health"))[0] == 200
        status, _, body = asyncio.run(get("/v1/nothing"))
        assert status == 404 and body["error"]["type"] == "invalid_request_error"
    finally:
        proc.stop()


class _FailingEvents:
    async def get(self):
        raise RuntimeError("internal state at /srv/secret/path, object at 0x7f3a2c001e80")


class _SupervisorWithABug:
    """Just what the routes read of a Supervisor; its request's event queue raises. No input from
    outside makes a started stream raise any more, so this stands in, on the real app factory."""

    state, vocab_size = "ok", VOCAB_SIZE

    async def admit(self, req):  # the routes' entry since the admission branch
        return SimpleNamespace(
            request_id=req.request_id, prompt_ids=[5, 6], num_prompt_logprobs=None, events=_FailingEvents()
        )

    def cancel(self, live):
        pass


@pytest.mark.parametrize("stream", [False, True])
def test_an_unexpected_error_in_generate_is_an_error_body_or_the_last_line(stream, caplog):
    async def call():
        app = make_app(_SupervisorWithABug(), "tiny", "s3cret")
        async with TestClient(TestServer(app), headers={"Authorization": "Bearer s3cret"}) as client:
            resp = await client.post("/v1/generate", json={"prompt_ids": [5, 6], "stream": stream})
            return resp.status, await resp.read()

    status, raw = asyncio.run(call())
    if stream:
        assert status == 200  # the status line went out with the start line
        start, last = raw.splitlines()
        assert json.loads(start)["prompt_ids"] == [5, 6]
    else:
        assert status == 500
        last = raw
    error = json.loads(last)["error"]
    _assert_clean_error(error)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    [record] = [r for r in caplog.records if r.name == "mi.backend"]
    assert record.exc_info is not None  # the traceback is logged, once
