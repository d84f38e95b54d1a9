"""Acceptance: the real `openai` package (sync and async) against mi-frontend and the real backend.

Completions and chat, streamed and not, n=3, logprobs=5, echo with max_tokens=0 (scoring),
stop strings, seed reproducibility, usage arithmetic, exactly one finish_reason per choice, and
streamed text equal to non-streamed text. Uses the session fixture `served_model`.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import openai
import orjson
import pytest

PROMPT = "hello, my name is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say this is a test"}]


@pytest.fixture(scope="module")
def client(served_model):
    return openai.OpenAI(base_url=served_model.frontend_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(served_model):
    return openai.AsyncOpenAI(base_url=served_model.frontend_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def post(url: str, body: dict) -> dict:
    async def call():
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                return orjson.loads(await resp.read())

    return asyncio.run(call())


def num_prompt_tokens(served_model, prompt: str) -> int:
    return post(served_model.frontend_url + "/tokenize", {"prompt": prompt})["count"]


def collect_completion_stream(stream) -> tuple[dict[int, str], dict[int, list[str]], list]:
    """Text and finish_reasons per choice index, and the usage chunks, of a streamed completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, list[str]] = {}
    usages = []
    for chunk in stream:
        assert chunk.object == "text_completion"
        if not chunk.choices:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            assert choice.index not in reasons, "a chunk after finish_reason"
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, reasons, usages


def collect_chat_stream(stream) -> tuple[dict[int, str], dict[int, list[str]], list]:
    texts: dict[int, str] = {}
    reasons: dict[int, list[str]] = {}
    first_delta: dict[int, object] = {}
    usages = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            assert choice.index not in reasons, "a chunk after finish_reason"
            first_delta.setdefault(choice.index, choice.delta)
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                reasons.setdefault(choice.index, []).append(choice.finish_reason)
    assert all(d.role == "assistant" for d in first_delta.values()), "the role chunk comes first"
    return texts, reasons, usages


# -- completions --------------------------------------------------------------------------------


def test_completion_usage_arithmetic(client, model, served_model):
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=9, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    usage = completion.usage
    assert usage.prompt_tokens == num_prompt_tokens(served_model, PROMPT)
    assert usage.completion_tokens == 9 and completion.choices[0].finish_reason == "length"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_n3_stream_equals_non_stream(client, model, served_model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, n=3)
    full = client.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert len({c.text for c in full.choices}) == 1  # greedy: three equal choices
    assert full.usage.prompt_tokens == num_prompt_tokens(served_model, PROMPT)  # the prompt counts once
    texts, reasons, usages = collect_completion_stream(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert texts == {c.index: c.text for c in full.choices}
    assert reasons == {c.index: [c.finish_reason] for c in full.choices}
    (usage,) = usages
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens,
        full.usage.completion_tokens,
    )


def test_list_prompts_times_n_index_order(client, model):
    prompts = ["hello, my name is", "Welcome to"]
    full = client.completions.create(model=model, prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    singles = [
        client.completions.create(model=model, prompt=p, max_tokens=5, temperature=0).choices[0].text
        for p in prompts
    ]
    assert [c.text for c in full.choices] == [singles[0], singles[0], singles[1], singles[1]]


def test_seed_reproducibility(client, model):
    kw = dict(model=model, prompt="Welcome to", max_tokens=16, temperature=1.0, seed=1234, n=2)
    first = [c.text for c in client.completions.create(**kw).choices]
    second = [c.text for c in client.completions.create(**kw).choices]
    assert first == second
    texts, _, _ = collect_completion_stream(client.completions.create(**kw, stream=True))
    assert [texts[0], texts[1]] == first


def test_stop_string(client, model):
    full = (
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    match = re.search(r"[A-Za-z]{2}", full[2:])
    assert match, f"no ASCII pair to stop on in {full!r}"
    stop = match.group(0)
    cut = full.index(stop)
    stopped = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert (stopped.text, stopped.finish_reason) == (full[:cut], "stop")
    texts, reasons, _ = collect_completion_stream(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=32,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert texts == {0: full[:cut]} and reasons == {0: ["stop"]}


def test_include_stop_str_in_output(client, model):
    full = (
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = re.search(r"[A-Za-z]{2}", full[2:]).group(0)
    kept = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=32,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)]


def test_logprobs_5(client, model):
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5, extra_body={"ignore_eos": True}
    )
    (choice,) = completion.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 6 and token in top
        assert max(top.values()) == top[token]  # greedy: the chosen token is the most likely
    assert lp.text_offset == sorted(lp.text_offset)


def test_logprobs_0_gives_the_sampled_token(client, model):
    lp = (
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .logprobs
    )
    assert len(lp.token_logprobs) == 3 and all(len(top) == 1 for top in lp.top_logprobs)


def test_echo_with_max_tokens_0_scores_the_prompt(client, model, served_model):
    n = num_prompt_tokens(served_model, PROMPT)
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    (choice,) = completion.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 0 and completion.usage.prompt_tokens == n
    lp = choice.logprobs
    assert len(lp.tokens) == n and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])


def test_echo_max_tokens_1_gives_prompt_plus_one_entries(client, model):
    ids = [0, 287, 83, 394]  # token ids are used as given (no BOS added)
    completion = client.completions.create(
        model=model, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens == 1


def test_logit_bias_forces_a_token(client, model, served_model):
    forced = post(served_model.frontend_url + "/detokenize", {"tokens": [65]})["prompt"]
    completion = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logit_bias={"65": 100},
        extra_body={"ignore_eos": True},
    )
    assert completion.choices[0].text == forced * 4


def test_sampling_extras_are_accepted(client, model):
    completion = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=3,
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "min_tokens": 8,
            "skip_special_tokens": False,
        },
    )
    assert completion.usage.completion_tokens == 8  # min_tokens = max_tokens: no early EOS


# -- chat ---------------------------------------------------------------------------------------


def test_chat_n3_stream_equals_non_stream(client, model, served_model):
    kw = dict(model=model, messages=MESSAGES, max_tokens=10, temperature=0, n=3)
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in full.choices)
    texts, reasons, usages = collect_chat_stream(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert texts == {c.index: c.message.content for c in full.choices}
    assert reasons == {c.index: [c.finish_reason] for c in full.choices}
    (usage,) = usages
    assert usage.total_tokens == full.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    rendered = post(served_model.frontend_url + "/tokenize", {"messages": MESSAGES})["count"]
    assert full.usage.prompt_tokens == rendered


def test_chat_max_completion_tokens_and_seed(client, model):
    kw = dict(
        model=model,
        messages=MESSAGES,
        max_completion_tokens=6,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    first = client.chat.completions.create(**kw)
    assert first.usage.completion_tokens == 6 and first.choices[0].finish_reason == "length"
    assert client.chat.completions.create(**kw).choices[0].message.content == first.choices[0].message.content


def test_chat_logprobs(client, model):
    kw = dict(
        model=model,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    content = client.chat.completions.create(**kw, top_logprobs=3).choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0 and isinstance(item.bytes, list)
    content = client.chat.completions.create(**kw, top_logprobs=0).choices[0].logprobs.content
    assert all(item.top_logprobs == [] for item in content)


def test_chat_errors(client, model):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)


# -- async --------------------------------------------------------------------------------------


def test_async_client_completions_and_chat(aclient, model):
    async def run():
        kw = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        many = await asyncio.gather(*(aclient.completions.create(**kw) for _ in range(4)))
        assert len({c.choices[0].text for c in many}) == 1
        text = ""
        async for chunk in await aclient.completions.create(**kw, stream=True):
            text += "".join(c.text for c in chunk.choices)
        assert text == many[0].choices[0].text
        chat = await aclient.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=6, temperature=0
        )
        streamed, finishes = "", []
        async for chunk in await aclient.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=6, temperature=0, stream=True
        ):
            for choice in chunk.choices:
                streamed += choice.delta.content or ""
                finishes += [choice.finish_reason] if choice.finish_reason else []
        assert streamed == chat.choices[0].message.content and finishes == [chat.choices[0].finish_reason]
        await aclient.close()

    asyncio.run(run())
