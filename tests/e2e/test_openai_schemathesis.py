"""Property tests of mi-frontend with schemathesis.

1. Requests generated from the public OpenAI spec (tests/data/openai-subset.yaml) never get a 5xx,
   and every 4xx carries the OpenAI error body.
2. Requests generated from OUR OWN /openapi.json (generated from the Structs that parse them) never
   get a 5xx, and every answer matches the schema our document gives for its status and media type
   (JSON bodies and each server-sent event), with a status the document lists.

The spec lists only 200 and 429; our documented answers to what it generates are: 400 for a field
we reject (unknown, out of range, not supported: tools, audio, json response formats, ...), 404 for
a model name we do not serve (the spec's `model` is any string; `secured_frontend` serves
"tiny-llama" and "gpt-3.5-turbo-instruct", and cases often name one of the spec's enum models),
413 for a body over 64 KiB. Both valid (positive) and invalid (negative) cases are generated, with a
fixed seed and a bounded number of examples, so the test stays within about a minute on 2 cores.
Runs against `secured_frontend` (API key, n <= 4, max_tokens <= 32).
"""

from __future__ import annotations

import os
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

SPEC = Path(__file__).resolve().parents[1] / "data" / "openai-subset.yaml"
MAX_EXAMPLES = int(os.environ.get("MI_SCHEMATHESIS_EXAMPLES", "100"))
OWN_MAX_EXAMPLES = int(os.environ.get("MI_SCHEMATHESIS_OWN_EXAMPLES", "40"))
SETTINGS = {
    "deadline": None,
    "database": None,
    "derandomize": True,
    "phases": [hypothesis.Phase.explicit, hypothesis.Phase.generate],
    "suppress_health_check": list(hypothesis.HealthCheck),
}


@pytest.fixture(scope="module")
def operations():
    if not SPEC.is_file():
        pytest.fail(f"the OpenAI spec subset is missing: {SPEC}")
    schema = schemathesis.openapi.from_path(SPEC)
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("operation", ["POST /completions", "POST /chat/completions", "GET /models"])
def test_no_input_gets_a_5xx(secured_frontend, operations, operation, mode):
    op = operations[operation]
    seen: dict[int, int] = {}

    @hypothesis.settings(max_examples=MAX_EXAMPLES, **SETTINGS)
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def check(case):
        if (
            mode is GenerationMode.POSITIVE
            and isinstance(case.body, dict)
            and isinstance(case.body.get("model"), str)
        ):
            # NOTE: a served name, so that valid cases reach the backend instead of a 404.
            case.body["model"] = secured_frontend.model_names[len(case.body["model"]) % 2]
        response = case.call(
            base_url=secured_frontend.url + "/v1", headers=secured_frontend.headers, timeout=60
        )
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text[:500]
        else:
            assert response.status_code == 200

    check()
    assert seen, "no case was sent"


# -- our own document ---------------------------------------------------------------------------

WITH_BODY = ["POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"]
OWN_OPERATIONS = [
    *WITH_BODY,
    "GET /v1/models",
    "GET /v1/models/{model}",
    "GET /health",
    "GET /version",
    "GET /tokenizer_info",
]
# Negative cases need an input that can be invalid (any path segment is a valid model name).
OWN_CASES = [(op, GenerationMode.POSITIVE) for op in OWN_OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in WITH_BODY
]


@pytest.fixture(scope="module")
def own_operations(secured_frontend):
    schema = schemathesis.openapi.from_url(
        secured_frontend.url + "/openapi.json", headers=secured_frontend.headers
    )
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_our_document_lists_every_route(own_operations):
    assert set(OWN_OPERATIONS) <= set(own_operations)


@pytest.mark.parametrize(
    "operation, mode", [pytest.param(op, mode, id=f"{op}-{mode.value}") for op, mode in OWN_CASES]
)
def test_our_document_holds(secured_frontend, own_operations, operation, mode):
    op = own_operations[operation]
    seen: dict[int, int] = {}

    @hypothesis.settings(max_examples=OWN_MAX_EXAMPLES, **SETTINGS)
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def check(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            # NOTE: a served name, so that valid cases reach the backend instead of a 404.
            case.body["model"] = secured_frontend.model_names[len(case.body["model"]) % 2]
        response = case.call(base_url=secured_frontend.url, headers=secured_frontend.headers, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(
            response,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
        )

    check()
    assert seen, "no case was sent"
