"""Tests of the Python SDK (`mi.Model`): the seed example verbatim, generation, errors.

Tests marked with `served_model` (tests/conftest.py) talk to the real backend; the rest need none.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading

import aiohttp
import orjson
import pytest

import mi
from mi import BackendUnavailable, GenerationOutput, InvalidRequest, Model
from mi.sdk.async_model import normalize_prompts as _normalize_prompts

# The product's quick-start (shared/seed), only the port differs.
SEED_EXAMPLE = """\
from mi import Model

model = Model(endpoint='http://localhost:12222')

inputs = [
    "hello, my name is",
    "Welcome to"
]

outputs = model.generate(inputs, do_sample=False, max_new_tokens=200)

# Print the outputs.
for output in outputs:
    prompt = model.tokenizer.decode(output.prompt_ids)
    complete_text = model.tokenizer.decode(output.ids)
    print(f"Prompt: {prompt!r}, complete text: {complete_text!r}")
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- no backend needed ----------------------------------------------------------------------------


def test_import_mi_is_light():
    code = "import sys, mi; assert 'aiohttp' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert mi.Model is Model


@pytest.mark.parametrize(
    "prompts, expected",
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        (["a", [3]], ["a", [3]]),
    ],
)
def test_prompt_forms(prompts, expected):
    assert _normalize_prompts(prompts) == expected


@pytest.mark.parametrize("prompts", [[], None, 5, [[]], [1.5], [["a"]], [True]])
def test_bad_prompt_forms(prompts):
    with pytest.raises(TypeError):
        _normalize_prompts(prompts)


def test_a_misspelt_sampling_keyword_is_a_type_error_naming_it():
    from mi.sdk.async_model import make_request

    with pytest.raises(TypeError, match="tempreature"):
        make_request("hi", tempreature=0.5)
    assert make_request("hi", do_sample=False, stop="x", seed=None).stop == ("x",)


@pytest.mark.parametrize("kw", [{"endpoint": "localhost:12222"}, {"endpoint": "http://x", "timeout": 0}])
def test_bad_constructor_arguments(kw):
    with pytest.raises(ValueError):
        Model(**kw)


def test_backend_unavailable_names_the_endpoint():
    endpoint = f"http://127.0.0.1:{closed_port()}"
    model = Model(endpoint=endpoint)
    with pytest.raises(BackendUnavailable) as info:
        model.generate("hello")
    assert endpoint in str(info.value) and "mi-backend" in str(info.value)
    with pytest.raises(BackendUnavailable):
        model.tokenizer
    assert model.health() is False


# -- against the real backend ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(served_model) -> Model:
    return Model(endpoint=served_model.backend_url)


def test_seed_example_runs_verbatim(served_model):
    code = SEED_EXAMPLE.replace("12222", str(served_model.backend_port))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Prompt: ") and "hello, my name is" in lines[0]
    assert lines[1].startswith("Prompt: ") and "Welcome to" in lines[1]
    assert all(", complete text: " in line for line in lines)


def test_generate_outputs(model):
    outputs = model.generate(["hello, my name is", "Welcome to"], do_sample=False, max_new_tokens=8)
    assert len(outputs) == 2 and all(isinstance(o, GenerationOutput) for o in outputs)
    for output in outputs:
        assert output.prompt_ids and 0 < len(output.ids) <= 8
        assert output.finish_reason in ("stop", "length")
        assert output.text == model.tokenizer.decode(output.ids, skip_special_tokens=True)
    assert model.tokenizer.decode(outputs[1].prompt_ids, skip_special_tokens=True).endswith("Welcome to")


def test_single_prompt_and_token_ids_give_a_list_of_one(model):
    (text_out,) = model.generate("hello, my name is", do_sample=False, max_new_tokens=5)
    (ids_out,) = model.generate(list(text_out.prompt_ids), do_sample=False, max_new_tokens=5)
    assert ids_out.prompt_ids == text_out.prompt_ids and ids_out.ids == text_out.ids


def test_greedy_matches_the_frontend(model, served_model):
    (output,) = model.generate("Say this is a test", do_sample=False, max_new_tokens=7)

    async def complete():
        body = {"prompt": "Say this is a test", "max_tokens": 7, "temperature": 0}
        async with aiohttp.ClientSession() as session:
            async with session.post(served_model.frontend_url + "/v1/completions", json=body) as resp:
                return resp.status, await resp.read()

    status, raw = asyncio.run(complete())
    assert status == 200 and orjson.loads(raw)["choices"][0]["text"] == output.text


def test_seeded_sampling_repeats(model):
    first = model.generate("Welcome to", max_new_tokens=8, temperature=1.0, seed=1234)
    second = model.generate("Welcome to", max_new_tokens=8, temperature=1.0, seed=1234)
    assert first == second


def test_tokenizer_matches_the_model_dir(model, served_model):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(served_model.hf_dir)
    text = "hello, my name is Welcome to"
    assert model.tokenizer.encode(text) == reference.encode(text)


def test_invalid_request(model):
    with pytest.raises(InvalidRequest) as info:
        model.generate("hello", max_new_tokens=0)
    assert info.value.status == 400 and info.value.param == "max_tokens"
    with pytest.raises(InvalidRequest):
        model.generate([10**9])  # token id out of the vocabulary
    assert model.generate("hello", max_new_tokens=1)


def test_works_inside_a_running_loop_and_a_thread(model):
    async def inside_loop():
        sync = model.generate("hello", do_sample=False, max_new_tokens=3)
        via_async = await model.agenerate("hello", do_sample=False, max_new_tokens=3)
        return sync, via_async

    sync, via_async = asyncio.run(inside_loop())
    assert sync == via_async
    results = []
    thread = threading.Thread(
        target=lambda: results.append(model.generate("hello", do_sample=False, max_new_tokens=3))
    )
    thread.start()
    thread.join(timeout=120)
    assert results == [sync]


def test_health_and_info(model):
    assert model.health() is True
    assert model.info.vocab_size > 0 and model.info.max_model_len > 0


# -- streams, async, abort, timeouts ---------------------------------------------------------------


def test_stream_equals_generate(model):
    (full,) = model.generate("hello, my name is", do_sample=False, max_new_tokens=12)
    with model.stream("hello, my name is", do_sample=False, max_new_tokens=12) as stream:
        deltas = list(stream)
    assert stream.prompt_ids == full.prompt_ids
    assert "".join(d.text for d in deltas) == full.text
    assert [i for d in deltas for i in d.ids] == full.ids
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [full.finish_reason]
    assert stream.finish_reason == full.finish_reason and stream.usage.completion_tokens == len(full.ids)


def test_closing_a_stream_early_aborts_it(model):
    stream = model.stream("hello", max_new_tokens=1500, ignore_eos=True)
    for n, _ in enumerate(stream):
        if n == 2:
            break
    stream.close()
    assert stream.finish_reason is None
    assert model.abort(stream.request_id) is False  # already gone from the backend


def test_abort_ends_the_stream(model):
    with model.stream("hello", max_new_tokens=1500, ignore_eos=True) as stream:
        deltas = []
        for delta in stream:
            deltas.append(delta)
            if len(deltas) == 3:
                assert stream.abort() is True
    assert deltas[-1].finish_reason == "abort" and stream.finish_reason == "abort"
    assert stream.usage.completion_tokens < 1500
    assert model.abort(stream.request_id) is False


def test_async_model(served_model):
    from mi import AsyncModel

    async def run():
        async with AsyncModel(served_model.backend_url) as amodel:
            outputs = await amodel.generate(["hello", [5, 6, 7]], do_sample=False, max_new_tokens=6)
            assert [len(o.ids) for o in outputs] == [len(o.ids) for o in outputs] and len(outputs) == 2

            async def stream_text(prompt):
                async with amodel.stream(prompt, do_sample=False, max_new_tokens=6) as stream:
                    return "".join([d.text async for d in stream])

            texts = await asyncio.gather(stream_text("hello"), stream_text([5, 6, 7]))
            assert texts == [o.text for o in outputs]

            stream = amodel.stream("hello", max_new_tokens=1500, ignore_eos=True)
            reader = asyncio.ensure_future(stream.__anext__())
            await reader
            await stream.aclose()
            assert await amodel.abort(stream.request_id) is False
            assert (await amodel.get_info()).vocab_size > 0
            assert (await amodel.get_tokenizer()).decode(outputs[1].ids, skip_special_tokens=True) == outputs[
                1
            ].text

    asyncio.run(run())


def test_timeout_is_a_typed_error_and_the_request_is_dropped(served_model, model):
    from mi import RequestTimeout

    impatient = Model(endpoint=served_model.backend_url, timeout=0.2)
    with pytest.raises(RequestTimeout) as info:
        impatient.generate("hello", max_new_tokens=1500, ignore_eos=True)
    assert isinstance(info.value, TimeoutError) and served_model.backend_url in str(info.value)
    assert model.generate("hello", max_new_tokens=2)  # the backend serves on


def test_typed_errors_name_the_field(model):
    with pytest.raises(InvalidRequest) as info:
        model.generate("hello", top_p=1.5)
    assert info.value.param == "top_p"
    with pytest.raises(InvalidRequest) as info:
        list(model.stream("hello", max_new_tokens=-1))
    assert info.value.param == "max_tokens"


def test_generate_with_logprobs(model):
    (output,) = model.generate(
        "hello, my name is", do_sample=False, max_new_tokens=4, logprobs=2, prompt_logprobs=1, ignore_eos=True
    )
    assert len(output.logprobs) == len(output.ids) == 4
    assert all(
        lp.token_id == i and len(lp.top) == 2 and lp.logprob <= 0
        for lp, i in zip(output.logprobs, output.ids)
    )
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(output.prompt_ids)
    assert [lp.token_id for lp in output.prompt_logprobs[1:]] == output.prompt_ids[1:]


def test_stats(model):
    stats = model.stats()
    assert stats.num_kv_blocks > 0 and stats.num_requests_running >= 0
