"""Property test: requests generated from the public OpenAI spec (tests/data/openai-subset.yaml)
never get a 5xx from mi-frontend, and every 4xx carries the OpenAI error body.

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

import pytest

import schemathesis
import hypothesis

from schemathesis import GenerationMode  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "data" / "openai-subset.yaml"
MAX_EXAMPLES = int(os.environ.get("MI_SCHEMATHESIS_EXAMPLES", "100"))


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

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def check(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            # NOTE: a served name, so that valid cases reach the backend instead of a 404.
            case.body["model"] = secured_frontend.model_names[len(case.body["model"]) % 2]
        response = case.call(base_url=secured_frontend.url + "/v1", headers=secured_frontend.headers, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text[:500]
        else:
            assert response.status_code == 200

    check()
    assert seen, "no case was sent"
