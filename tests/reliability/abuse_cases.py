"""The abuse corpus of tests/reliability/test_abuse_corpus.py: kinds of bad input, each a list of
HTTP requests generated from a few rules and a seeded random, for both servers.

A `Case` is one request as bytes on the wire (method, path, headers, body); `kinds()` maps a kind's
name to its cases. Every case is bad input: its answer must be a 4xx with the OpenAI error body.
The raw-socket kinds (slow clients, broken HTTP framing) live in the test module.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

VOCAB_SIZE = 500  # the tiny models' (mi.models.tiny)
MAX_MODEL_LEN = 256  # the corpus's backend: --max-model-len
KV_TOKENS = 12 * 16  # the corpus's backend: --num-kv-blocks 12, block size 16
FRONTEND_BODY_LIMIT = 2 << 20  # mi-frontend --max-body-bytes default
BACKEND_BODY_LIMIT = 64 << 20  # mi/actors/supervisor/server.py

JSON = {"Content-Type": "application/json"}

# The valid body of each route; the kinds break one thing in it.
BASE = {
    ("frontend", "/v1/completions"): {"prompt": "hello there", "max_tokens": 2},
    ("frontend", "/v1/chat/completions"): {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ("frontend", "/tokenize"): {"prompt": "hello there"},
    ("frontend", "/detokenize"): {"tokens": [5, 6]},
    ("backend", "/v1/generate"): {"prompt": "hello there", "max_tokens": 2},
    ("backend", "/v1/abort"): {"request_id": "some-request"},
}
GENERATE_ROUTES = [
    ("frontend", "/v1/completions"),
    ("frontend", "/v1/chat/completions"),
    ("backend", "/v1/generate"),
]


@dataclass(frozen=True)
class Case:
    target: str  # "frontend" or "backend"
    path: str
    body: bytes = b""
    method: str = "POST"
    headers: dict = field(default_factory=lambda: dict(JSON))
    auth: bool = True  # send the backend secret (the backend only)

    def describe(self) -> str:
        return f"{self.target} {self.method} {self.path[:80]} {self.body[:160]!r}"


def dumps(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def with_field(route: tuple[str, str], name: str, value: object) -> Case:
    return Case(*route, dumps({**BASE[route], name: value}))


# -- the fields of the generate routes, by type ---------------------------------------------------

INT_FIELDS = ["max_tokens", "min_tokens", "top_k", "seed"]
FLOAT_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
]
BOOL_FIELDS = ["stream", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output"]
WRONG_FOR = {
    "int": ["7", True, 1.5, [7], {"v": 7}, "", "0x10"],
    "float": ["0.5", True, [0.5], {"v": 0.5}, "NaN", ""],
    "bool": [1, 0, "true", "false", [True], {}, 1.0],
}
OUT_OF_RANGE = {
    "max_tokens": [-1, -(2**31), 2**31, 2**63, 10**30],
    "min_tokens": [-1, 2**31, 10**25],
    "top_k": [-2, -(2**40), 2**31, 2**64],
    "seed": [2**63, -(2**63) - 1, 10**40, -(10**40)],
    "temperature": [-0.001, 2.001, 1e308, -1e308, 1e400],
    "top_p": [-0.1, 1.0001, 1e300],
    "min_p": [-1e-9, 1.1, 1e400],
    "repetition_penalty": [0, -1, 1e-7, 1e7, 1e400],
    "presence_penalty": [-2.01, 2.01, -1e400],
    "frequency_penalty": [-2.01, 2.01, 1e400],
}


def _route_fields(route: tuple[str, str]) -> dict[str, str]:
    fields = {name: "int" for name in INT_FIELDS}
    fields |= {name: "float" for name in FLOAT_FIELDS}
    fields |= {name: "bool" for name in BOOL_FIELDS}
    if route[0] == "frontend":
        fields["n"] = "int"
    if route[1] == "/v1/completions":
        fields["echo"] = "bool"
    if route[1] != "/v1/chat/completions":
        fields["logprobs"] = "int"
    return fields


def wrong_types() -> list[Case]:
    cases = []
    for route in GENERATE_ROUTES:
        for name, kind in _route_fields(route).items():
            cases += [with_field(route, name, value) for value in WRONG_FOR[kind]]
        for name, values in {
            "stop": [5, [5], [["x"]], {"x": 1}, True, [None]],
            "stop_token_ids": ["5", [5.5], [[5]], {"5": 5}, ["a"], 5],
            "logit_bias": [[1, 2], "5:1", 5, True, [[5, 1]]],
        }.items():
            cases += [with_field(route, name, value) for value in values]
    for route in GENERATE_ROUTES[:2]:
        cases += [with_field(route, "model", value) for value in [5, ["x"], {"m": 1}, True]]
    prompt_routes = [("frontend", "/v1/completions"), ("backend", "/v1/generate"), ("frontend", "/tokenize")]
    for route in prompt_routes:
        cases += [with_field(route, "prompt", value) for value in [5, True, {"p": 1}, [True], [1.5], [{}]]]
    cases += [with_field(("backend", "/v1/generate"), "prompt_ids", v) for v in ["5", [[5]], ["a"], {}]]
    cases += [with_field(("frontend", "/detokenize"), "tokens", v) for v in ["5", [[5]], ["a"], 5, {}]]
    return cases


def out_of_range() -> list[Case]:
    return [
        with_field(route, name, value)
        for route in GENERATE_ROUTES
        for name, values in OUT_OF_RANGE.items()
        for value in values
    ]


def huge_n() -> list[Case]:
    values = [0, -1, 65, 1000, 2**31, 2**63, 10**20]
    return [with_field(route, "n", v) for route in GENERATE_ROUTES[:2] for v in values]


def huge_max_tokens() -> list[Case]:
    values = [MAX_MODEL_LEN, 10**6, 2**31 - 1]
    cases = [with_field(route, "max_tokens", v) for route in GENERATE_ROUTES for v in values]
    cases += [with_field(GENERATE_ROUTES[1], "max_completion_tokens", v) for v in values + [0, -1]]
    return cases


def huge_logprobs() -> list[Case]:
    values = [21, 1000, 10**12, -1]
    cases = [
        with_field(route, "logprobs", v) for route in (GENERATE_ROUTES[0], GENERATE_ROUTES[2]) for v in values
    ]
    cases += [with_field(GENERATE_ROUTES[2], "prompt_logprobs", v) for v in values]
    chat = GENERATE_ROUTES[1]
    cases += [Case(*chat, dumps({**BASE[chat], "logprobs": True, "top_logprobs": v})) for v in values]
    cases += [with_field(chat, "logprobs", v) for v in [5, "yes", [True]]]
    cases.append(with_field(chat, "top_logprobs", 2))  # without logprobs: true
    return cases


def huge_stop_lists(rng: random.Random) -> list[Case]:
    cases = []
    for route in GENERATE_ROUTES:
        for count in (17, 100, 10_000):
            stops = ["".join(rng.choices("abcdefgh", k=rng.randint(1, 8))) for _ in range(count)]
            cases.append(with_field(route, "stop", stops))
        cases += [with_field(route, "stop", v) for v in ["", [""], ["a", ""]]]
    return cases


def huge_logit_bias() -> list[Case]:
    cases = []
    for route in GENERATE_ROUTES:
        for count in (1025, 5000, 50_000):
            cases.append(with_field(route, "logit_bias", {str(i % VOCAB_SIZE + i): 1 for i in range(count)}))
    return cases


# "-0" is left out: JSON's integer grammar allows it, and it is token 0 (a valid request).
ODD_KEYS = ["²", " 1", "1 ", "1e3", "9" * 30, "", "0x10", "1.0", "+1", "١", "1_000", "NaN", "-1", "５", "01"]
ODD_KEYS += ["\u0000", "1\u00002", str(2**31), str(2**64), str(VOCAB_SIZE), "x" * 10_000, "\u202e5"]


def odd_logit_bias_keys() -> list[Case]:
    return [with_field(route, "logit_bias", {key: 1}) for route in GENERATE_ROUTES for key in ODD_KEYS]


def logit_bias_values() -> list[Case]:
    values = [101, -100.5, 1e400, -1e400, "x", [1], True, {"v": 1}]
    return [with_field(route, "logit_bias", {"5": v}) for route in GENERATE_ROUTES for v in values]


def unknown_fields(rng: random.Random) -> list[Case]:
    names = ["max_token", "temprature", "__proto__", "constructor", "", "a" * 5000, "prompt\u0000", "Prompt"]
    names += ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz_", k=rng.randint(1, 20))) for _ in range(6)]
    return [with_field(route, name, 1) for route in BASE for name in names if route[1] != "/v1/abort"]


def missing_required() -> list[Case]:
    cases = [
        Case("frontend", "/v1/completions", dumps({"max_tokens": 2})),
        Case("frontend", "/v1/chat/completions", dumps({"max_tokens": 2})),
        Case("frontend", "/v1/chat/completions", dumps({"messages": [{"content": "hi"}]})),
        Case("frontend", "/v1/chat/completions", dumps({"messages": [{"role": "user"}]})),
        Case("frontend", "/tokenize", dumps({})),
        Case("frontend", "/tokenize", dumps({"prompt": "a", "messages": [{"role": "user", "content": "a"}]})),
        Case("frontend", "/detokenize", dumps({})),
        Case("backend", "/v1/generate", dumps({"max_tokens": 2})),
        Case("backend", "/v1/generate", dumps({"prompt": "a", "prompt_ids": [5]})),
        Case("backend", "/v1/abort", dumps({})),
    ]
    return cases + [Case(*route, b"") for route in BASE]  # an empty body


def invalid_json(rng: random.Random) -> list[Case]:
    cases = []
    for route, body in BASE.items():
        raw = dumps(body)
        cuts = sorted(rng.sample(range(1, len(raw)), min(6, len(raw) - 1)))
        cases += [Case(*route, raw[:cut]) for cut in cuts]
        cases += [Case(*route, raw[:-1] + b",}"), Case(*route, raw.replace(b'"', b"'"))]
        cases += [Case(*route, b"{/* comment */}"), Case(*route, b"undefined"), Case(*route, raw + b"}")]
    return cases


def invalid_utf8(rng: random.Random) -> list[Case]:
    bad = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80"]
    bad += [bytes(rng.randrange(128, 256) for _ in range(8)) for _ in range(3)]
    cases = []
    for route in BASE:
        key = "request_id" if route[1] == "/v1/abort" else "tokens" if route[1] == "/detokenize" else None
        for chunk in bad:
            if route[1] == "/v1/chat/completions":
                body = b'{"messages": [{"role": "user", "content": "a' + chunk + b'"}]}'
            else:
                body = b'{"%s": "a%sb"}' % ((key or "prompt").encode(), chunk)
            cases.append(Case(*route, body))
    return cases


def lone_surrogates() -> list[Case]:
    escapes = [r"\ud800", r"\udfff", r"a\ud83d", r"\ude00b"]
    cases = []
    for esc in escapes:
        s = esc.encode()
        cases += [
            Case("frontend", "/v1/completions", b'{"prompt": "' + s + b'"}'),
            Case("frontend", "/v1/completions", b'{"prompt": "a", "stop": ["' + s + b'"]}'),
            Case(
                "frontend",
                "/v1/chat/completions",
                b'{"messages": [{"role": "user", "content": "' + s + b'"}]}',
            ),
            Case("frontend", "/tokenize", b'{"prompt": "' + s + b'"}'),
            Case("backend", "/v1/generate", b'{"prompt": "' + s + b'"}'),
            Case("backend", "/v1/generate", b'{"prompt": "a", "stop": "' + s + b'"}'),
            Case("backend", "/v1/generate", b'{"prompt": "a", "request_id": "' + s + b'"}'),
            Case("backend", "/v1/abort", b'{"request_id": "' + s + b'"}'),
        ]
    return cases


def nan_infinity() -> list[Case]:
    cases = []
    for route in GENERATE_ROUTES:
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf"):
            for name in (b"temperature", b"top_p", b"presence_penalty"):
                cases.append(Case(*route, dumps(BASE[route])[:-1] + b', "' + name + b'": ' + literal + b"}"))
            cases.append(Case(*route, dumps(BASE[route])[:-1] + b', "logit_bias": {"5": ' + literal + b"}}"))
    return cases


def duplicated_keys() -> list[Case]:
    """The last of two equal keys wins (as in every JSON parser here); here the last is bad."""
    cases = []
    for route in GENERATE_ROUTES:
        head = dumps(BASE[route])[:-1]
        for dup in (
            b'"max_tokens": 2, "max_tokens": -1',
            b'"temperature": 0, "temperature": 9',
            b'"n": 1, "n": 0',
        ):
            if route[0] == "backend" and dup.startswith(b'"n"'):
                dup = b'"top_k": 1, "top_k": -5'
            cases.append(Case(*route, head + b", " + dup + b"}"))
    cases.append(Case("frontend", "/v1/completions", b'{"prompt": "a", "prompt": 5}'))
    cases.append(Case("backend", "/v1/generate", b'{"prompt": "a", "prompt": 5}'))
    cases.append(Case("backend", "/v1/abort", b'{"request_id": "a", "request_id": 5}'))
    return cases


def depth_bombs() -> list[Case]:
    cases = []
    for depth in (100, 1025, 10_000, 200_000):
        arrays, objects = b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth
        for route in BASE:
            cases.append(Case(*route, b'{"prompt": ' + arrays + b"}"))
            cases.append(Case(*route, objects))
        if depth > 1024:  # deeper than JSON parsers go (a shallower one is valid input)
            cases.append(
                Case(
                    "frontend",
                    "/tokenize",
                    b'{"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": '
                    + objects
                    + b"}",
                )
            )
    return cases


def not_an_object() -> list[Case]:
    bodies = [b"[]", b'"x"', b"1", b"null", b"true", b"[{}]", b'[{"prompt": "a"}]', b"   "]
    return [Case(*route, body) for route in BASE for body in bodies]


def wrong_content_types() -> list[Case]:
    types = [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "image/png",
        "application/jsonx",
        "text/json",
    ]
    return [Case(*route, dumps(BASE[route]), headers={"Content-Type": t}) for route in BASE for t in types]


def too_large_bodies() -> list[Case]:
    """A 64 MiB body (and a little more) to both servers: 413 before anything is parsed."""
    frontend = b'{"prompt": "' + b"a" * (64 << 20) + b'"}'
    backend = b'{"prompt": "' + b"a" * (BACKEND_BODY_LIMIT) + b'"}'
    return [
        Case("frontend", "/v1/completions", frontend),
        Case(
            "frontend",
            "/v1/chat/completions",
            b'{"messages": [' + b'{"role":"user","content":"a"},' * (1 << 16) + b"{}]}",
        ),
        Case("frontend", "/v1/completions", b'{"prompt": "' + b"a" * (FRONTEND_BODY_LIMIT) + b'"}'),
        Case("backend", "/v1/generate", backend),
    ]


def out_of_vocab() -> list[Case]:
    ids = [VOCAB_SIZE, VOCAB_SIZE + 1, 2**31 - 1, 2**31, -1, 2**63]
    cases = []
    for i in ids:
        cases += [
            Case("frontend", "/v1/completions", dumps({"prompt": [5, i], "max_tokens": 2})),
            Case("frontend", "/v1/completions", dumps({"prompt": [[5], [6, i]], "max_tokens": 2})),
            Case("frontend", "/detokenize", dumps({"tokens": [5, i]})),
            Case("backend", "/v1/generate", dumps({"prompt_ids": [5, i], "max_tokens": 2})),
        ]
        cases += [with_field(route, "stop_token_ids", [i]) for route in GENERATE_ROUTES]
    return cases


def too_long_prompts() -> list[Case]:
    """Longer than --max-model-len, or than the KV cache (12 blocks of 16 < 256 positions)."""
    cases = []
    for length, max_tokens in (
        (MAX_MODEL_LEN + 1, 1),
        (MAX_MODEL_LEN - 1, 2),
        (KV_TOKENS + 1, 1),
        (100, 100),
    ):
        ids = [5 + i % 400 for i in range(length)]
        cases += [
            Case("frontend", "/v1/completions", dumps({"prompt": ids, "max_tokens": max_tokens})),
            Case("backend", "/v1/generate", dumps({"prompt_ids": ids, "max_tokens": max_tokens})),
        ]
    text = "hello world " * 2000
    cases += [
        Case("frontend", "/v1/completions", dumps({"prompt": text})),
        Case("frontend", "/v1/completions", dumps({"prompt": [text, "a"], "n": 2})),
        Case("frontend", "/v1/chat/completions", dumps({"messages": [{"role": "user", "content": text}]})),
        Case("backend", "/v1/generate", dumps({"prompt": text})),
        Case("backend", "/v1/generate", dumps({"prompt": text, "stream": True})),
        Case("frontend", "/v1/completions", dumps({"prompt": text, "stream": True})),
    ]
    return cases


def bad_chat_messages() -> list[Case]:
    route = ("frontend", "/v1/chat/completions")
    messages = [
        [],
        "hi",
        [{"role": "wizard", "content": "a"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": [{"text": "a"}]}],
        [{"role": "user", "content": [{"type": "nope", "text": "a"}]}],
        [None],
        [[]],
        ["user"],
        [{"role": "user", "content": "a", "extra": 1}],
        [{"role": 5, "content": "a"}],
    ]
    cases = [Case(*route, dumps({"messages": m})) for m in messages]
    others = {
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required",
        "response_format": {"type": "xml"},  # json_object and json_schema are served (issue 12)
        "audio": {"voice": "x"},
        "modalities": ["audio"],
        "echo": True,
        "best_of": 2,
        "prompt": "x",
        "stream_options": {"include_usage": True},
    }
    cases += [with_field(route, name, value) for name, value in others.items()]
    cases += [Case("frontend", "/tokenize", dumps({"messages": m})) for m in messages[:6]]
    return cases


def bad_model_names() -> list[Case]:
    names = ["nope", "", "x" * 100_000, "../../etc/passwd", "tiny\u0000", "%s%s%n"]
    return [with_field(route, "model", name) for route in BASE if route[0] == "frontend" for name in names]


def wrong_routes() -> list[Case]:
    cases = [
        Case("frontend", path, b"", method="GET") for path in ("/v1/completions", "/v1/chat/completions")
    ]
    cases += [Case("backend", path, b"", method="GET") for path in ("/v1/generate", "/v1/abort")]
    for target in ("frontend", "backend"):
        for method in ("PUT", "DELETE", "PATCH"):
            cases.append(
                Case(target, "/v1/completions" if target == "frontend" else "/v1/generate", b"{}", method)
            )
        for path in (
            "/v1/nothing",
            "/v1/../../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/v1/completions/",
            "/%00",
            "/v1/" + "a" * 4000,
            "/v1/models/%ff%fe",
            "//v1//completions",
        ):
            cases.append(Case(target, path, b"{}"))
    cases.append(Case("frontend", "/v1/models/nope", b"", method="GET"))
    return cases


def empty_inputs() -> list[Case]:
    return [
        Case("frontend", "/v1/completions", dumps({"prompt": ""})),
        Case("frontend", "/v1/completions", dumps({"prompt": []})),
        Case("frontend", "/v1/completions", dumps({"prompt": [[]]})),
        Case("frontend", "/v1/completions", dumps({"prompt": ["a", ""]})),
        Case("frontend", "/v1/completions", dumps({"prompt": ["a", [5]]})),  # a mix
        Case("frontend", "/v1/completions", dumps({"prompt": "", "add_special_tokens": False})),
        Case("backend", "/v1/generate", dumps({"prompt_ids": []})),
        Case("backend", "/v1/generate", dumps({"prompt": "", "add_special_tokens": False})),
        Case("backend", "/v1/generate", dumps({"prompt": "a", "request_id": ""})),
        Case("backend", "/v1/generate", dumps({"prompt": "a", "request_id": "r" * 257})),
        Case("backend", "/v1/abort", dumps({"request_id": 5})),
        Case("backend", "/v1/abort", dumps({"request_id": None})),
    ]


def unsupported_combinations() -> list[Case]:
    c, g = ("frontend", "/v1/completions"), ("backend", "/v1/generate")
    return [
        with_field(c, "best_of", 2),
        with_field(c, "best_of", 0),
        with_field(c, "suffix", "x"),
        with_field(c, "stream_options", {"include_usage": True}),
        with_field(c, "max_tokens", 0),
        with_field(c, "prompt_logprobs", 2),
        Case(*c, dumps({"prompt": "a", "max_tokens": 2, "min_tokens": 3})),
        with_field(g, "max_tokens", 0),
        Case(*g, dumps({"prompt": "a", "max_tokens": 2, "min_tokens": 3})),
        with_field(c, "stream_options", {"include_usage": True, "x": 1}),
        Case(*c, dumps({"prompt": "a", "stream": True, "stream_options": {"include_usage": 5}})),
        Case(*c, dumps({"prompt": ["a"] * 300})),
        Case(*c, dumps({"prompt": ["a"] * 100, "n": 3})),
    ]


def backend_auth() -> list[Case]:
    headers = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic eA=="},
        {"Authorization": "Bearer " + "x" * 4000},
        {"Authorization": "bearer"},
    ]
    return [
        Case(
            "backend",
            path,
            dumps(BASE["backend", path]) if method == "POST" else b"",
            method,
            headers={**JSON, **h},
            auth=False,
        )
        for h in headers
        for method, path in (
            ("POST", "/v1/generate"),
            ("POST", "/v1/abort"),
            ("GET", "/v1/stats"),
            ("GET", "/v1/model"),
            ("GET", "/v1/tokenizer"),
        )
    ]


def kinds(seed: int = 10) -> dict[str, list[Case]]:
    rng = random.Random(seed)
    return {
        "wrong types": wrong_types(),
        "out of range": out_of_range(),
        "huge n": huge_n(),
        "huge max_tokens": huge_max_tokens(),
        "huge logprobs": huge_logprobs(),
        "huge stop lists": huge_stop_lists(rng),
        "huge logit_bias": huge_logit_bias(),
        "odd logit_bias keys": odd_logit_bias_keys(),
        "bad logit_bias values": logit_bias_values(),
        "unknown fields": unknown_fields(rng),
        "missing required fields": missing_required(),
        "invalid JSON": invalid_json(rng),
        "invalid UTF-8": invalid_utf8(rng),
        "lone surrogates": lone_surrogates(),
        "NaN and Infinity": nan_infinity(),
        "duplicated keys": duplicated_keys(),
        "nesting depth bombs": depth_bombs(),
        "not an object": not_an_object(),
        "wrong content types": wrong_content_types(),
        "64 MiB bodies": too_large_bodies(),
        "token ids out of vocabulary": out_of_vocab(),
        "prompts beyond the context or the KV cache": too_long_prompts(),
        "bad chat messages": bad_chat_messages(),
        "bad model names": bad_model_names(),
        "wrong methods and routes": wrong_routes(),
        "empty inputs": empty_inputs(),
        "unsupported combinations": unsupported_combinations(),
        "backend auth": backend_auth(),
    }
