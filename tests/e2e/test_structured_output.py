"""Structured output through the real servers (tiny random Llama: its text is meaningless, but it
must obey the constraint): JSON schemas, regex, choice and grammars by every name a request can
use, streamed and not, n > 1 with seeds, beside free requests, across preemption and prefix-cache
hits; and a 400 naming the field for what does not compile.

Constraints here describe finite languages (bounded strings, arrays and numbers), so every
output ends with finish_reason "stop" well within max_tokens, and is then checked in full:
jsonschema for JSON, re.fullmatch for regex, membership for choice.
"""

import asyncio
import json
import random
import re

import aiohttp
import jsonschema
import openai
import pytest

from servers import backend_headers, start_backend

PROMPT = "Reply in the format asked:"
MAX_TOKENS = 160

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
}
REGEX = r"(cat|dog)-[0-9]{2,4}"
CHOICES = ["yes", "no", "it depends"]
GRAMMAR = 'root ::= "(" item ("," item)? ")"\nitem ::= [a-c] | [0-9] [0-9]?'
GRAMMAR_REGEX = r"\((?:[a-c]|[0-9][0-9]?)(?:,(?:[a-c]|[0-9][0-9]?))?\)"


def check_output(constraint: dict, text: str) -> None:
    """The whole text obeys `constraint` (a structured_outputs object)."""
    ((kind, value),) = constraint.items()
    if kind == "json":
        jsonschema.validate(json.loads(text), value)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(value, text), (value, text)
    elif kind == "choice":
        assert text in value, (value, text)
    elif kind == "grammar":
        assert re.fullmatch(GRAMMAR_REGEX, text), text


async def complete(session, url, body) -> tuple[int, dict]:
    async with session.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json()


def body_for(constraint: dict, **extra) -> dict:
    return {
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "structured_outputs": constraint,
        **extra,
    }


CONSTRAINTS = {
    "json_schema": {"json": PERSON},
    "json_schema_text": {"json": json.dumps(PERSON)},
    "regex": {"regex": REGEX},
    "choice": {"choice": CHOICES},
    "grammar": {"grammar": GRAMMAR},
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_each_kind_of_constraint_is_obeyed(served_model, name, temperature):
    constraint = CONSTRAINTS[name]

    async def run():
        async with aiohttp.ClientSession() as session:
            return await complete(
                session, served_model.frontend_url, body_for(constraint, temperature=temperature, seed=7, n=3)
            )

    status, answer = asyncio.run(run())
    assert status == 200, answer
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop", choice
        check_output({"json": PERSON} if name == "json_schema_text" else constraint, choice["text"])


def test_the_openai_ways_of_asking_are_the_same_constraint(served_model):
    """response_format json_schema / json_object, guided_* and structured_outputs: one engine."""
    client = openai.OpenAI(base_url=served_model.frontend_url + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "A person, please."}]
    by_schema = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    by_extension = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"guided_json": PERSON},
    )
    text = by_schema.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert by_extension.choices[0].message.content == text
    assert by_schema.choices[0].finish_reason == "stop"
    any_object = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_object"},
    )
    choice = any_object.choices[0]
    if choice.finish_reason == "stop":  # any object: unbounded, the random model may not close it
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")
    completion = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"guided_choice": CHOICES},
    )
    assert completion.choices[0].text in CHOICES


def test_openai_parse_with_a_pydantic_model(served_model):
    """The openai package's `parse` sends the model's JSON schema (strict) and parses the answer."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog", "fish"]
        legs: int = Field(ge=0, le=8)
        name: str = Field(max_length=6)

    client = openai.OpenAI(base_url=served_model.frontend_url + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    answer = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe a pet."}],
        response_format=Pet,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    pet = answer.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_a_streamed_constrained_answer_equals_the_unstreamed_one(served_model):
    async def run():
        async with aiohttp.ClientSession() as session:
            _, plain = await complete(session, served_model.frontend_url, body_for({"json": PERSON}))
            body = body_for({"json": PERSON}, stream=True)
            pieces = []
            async with session.post(served_model.frontend_url + "/v1/completions", json=body) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
            return plain["choices"][0]["text"], "".join(pieces)

    plain, streamed = asyncio.run(run())
    assert streamed == plain
    jsonschema.validate(json.loads(plain), PERSON)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A schema of a finite language: objects (required fields), arrays (maxItems), enums,
    bounded strings, integers and numbers, booleans, patterns, nesting up to depth 2."""
    kinds = ["string", "integer", "number", "boolean", "enum", "pattern"] + (
        ["object", "array"] if depth < 2 else []
    )
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "x", "y z", "null"], rng.randint(1, 4))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-f]{3}$", "^[0-9]{2}-[A-Z]$", "^(on|off)$"])}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    names = rng.sample(["id", "name", "size", "color", "child", "items", "ok"], rng.randint(1, 3))
    return {
        "type": "object",
        "properties": {n: random_schema(rng, depth + 1) for n in names},
        "required": names,
    }


def test_a_hundred_assorted_schemas_validate(served_model):
    rng = random.Random(1234)
    schemas = [random_schema(rng) for _ in range(100)]

    async def run():
        async with aiohttp.ClientSession() as session:
            limit = asyncio.Semaphore(16)

            async def one(schema, i):
                async with limit:
                    body = body_for({"json": schema}, temperature=1.0, seed=i)
                    return await complete(session, served_model.frontend_url, body)

            return await asyncio.gather(*(one(s, i) for i, s in enumerate(schemas)))

    for schema, (status, answer) in zip(schemas, asyncio.run(run())):
        assert status == 200, (schema, answer)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", (schema, choice)
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_constrained_rows_beside_free_ones_leave_the_free_ones_unchanged(served_model):
    """64 at once, every other one constrained: each free one gets its greedy output alone."""
    prompts = [f"{PROMPT} {i} " * (1 + i % 3) for i in range(32)]

    async def run():
        async with aiohttp.ClientSession() as session:
            url = served_model.frontend_url
            alone = [
                await complete(session, url, {"prompt": p, "max_tokens": 8, "temperature": 0})
                for p in prompts
            ]
            mixed = await asyncio.gather(
                *(complete(session, url, {"prompt": p, "max_tokens": 8, "temperature": 0}) for p in prompts),
                *(complete(session, url, body_for(CONSTRAINTS["regex"], prompt=p)) for p in prompts),
            )
            return alone, mixed

    alone, mixed = asyncio.run(run())
    free, constrained = mixed[:32], mixed[32:]
    assert [a["choices"][0]["text"] for _, a in free] == [a["choices"][0]["text"] for _, a in alone]
    for status, answer in constrained:
        assert status == 200 and re.fullmatch(REGEX, answer["choices"][0]["text"]), answer


def test_grammars_survive_preemption_and_prefix_cache_hits(converted):
    """A KV cache too small for the batch preempts (recompute), and a repeated prompt hits the
    prefix cache: the matchers are rebuilt from the tokens, so the outputs equal those of one
    request at a time."""
    backend, port = start_backend(converted("llama", 1), "--num-kv-blocks", "24", "--max-num-seqs", "8")
    url = f"http://127.0.0.1:{port}"
    long_prompt = "the quick brown fox jumps over the lazy dog " * 6
    bodies = [
        {
            "prompt": f"{i} {long_prompt}",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "structured_outputs": {"json": PERSON},
        }
        for i in range(8)
    ]
    try:

        async def run():
            async with aiohttp.ClientSession(headers=backend_headers()) as session:

                async def generate(body):
                    async with session.post(url + "/v1/generate", json=body) as resp:
                        assert resp.status == 200, await resp.text()
                        return await resp.json()

                alone, again = [], []
                for body in bodies[:3]:
                    alone.append(await generate(body))
                    again.append(await generate(body))  # its prompt's blocks are cached now
                together = await asyncio.gather(*(generate(b) for b in bodies))
                async with session.get(url + "/v1/stats") as resp:
                    stats = await resp.json()
                return alone, again, together, stats

        alone, again, together, stats = asyncio.run(run())
    finally:
        backend.stop()
    assert stats["num_preemptions"] > 0, stats
    assert all(r["usage"]["cached_tokens"] > 0 for r in again)
    assert [r["ids"] for r in again] == [r["ids"] for r in alone]
    assert [r["ids"] for r in together[:3]] == [r["ids"] for r in alone]
    for result in together:
        assert result["finish_reason"] == "stop"
        jsonschema.validate(json.loads(result["text"]), PERSON)


BAD = [
    # (body fields, param named in the 400)
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": {"properties": 5}}, "guided_json"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
        "response_format.json_schema.schema",
    ),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    (
        {"structured_outputs": {"json_object": True}, "response_format": {"type": "json_object"}},
        "response_format",
    ),
]


@pytest.mark.parametrize("fields, param", BAD, ids=[p for _, p in BAD])
def test_what_cannot_be_compiled_is_a_400_naming_the_field(served_model, fields, param):
    async def run():
        async with aiohttp.ClientSession() as session:
            body = {"prompt": PROMPT, "max_tokens": 4, **fields}
            return await complete(session, served_model.frontend_url, body)

    status, answer = asyncio.run(run())
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "/project/" not in error["message"] and ".cc:" not in error["message"], error


def test_the_backend_refuses_what_does_not_compile_and_serves_on(served_model):
    async def run():
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            url = served_model.backend_url + "/v1/generate"
            bad = {"prompt": PROMPT, "max_tokens": 4, "structured_outputs": {"regex": "[z-a]"}}
            async with session.post(url, json=bad) as resp:
                refused = resp.status, await resp.json()
            good = {
                "prompt": PROMPT,
                "max_tokens": 16,
                "temperature": 0,
                "structured_outputs": {"choice": CHOICES},
            }
            async with session.post(url, json=good) as resp:
                served = resp.status, await resp.json()
            return refused, served

    (status, answer), (ok_status, ok) = asyncio.run(run())
    assert (status, answer["error"]["param"]) == (400, "structured_outputs.regex"), answer
    assert ok_status == 200 and ok["text"] in CHOICES, ok
