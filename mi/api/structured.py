"""Structured output: what a request's text must match (a JSON schema, a regex, a choice, a
grammar), in the request types of every hop.

`StructuredOutputs` is vLLM's `structured_outputs` object, a field of `SamplingParams`, so it
travels with the sampling parameters from the HTTP edge to the workers. The OpenAI ways of
asking for the same thing (`response_format`, and vLLM's older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`) are resolved into it by `resolve` at the OpenAI edge; asking
twice in one request is a 400. Whether a schema, regex or grammar compiles is the grammar
library's to say (mi/grammar.py), once the server has the tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mi.api.errors import ApiError, invalid

__all__ = [
    "GUIDED_FIELDS",
    "JsonSchemaFormat",
    "ResponseFormat",
    "StructuredOutputs",
    "rename_param",
    "resolve",
]

MAX_CHOICES = 1024
MAX_CONSTRAINT_CHARS = 1 << 20  # a schema, regex or grammar's text (a 1 MiB schema is no schema)

Choice = Annotated[str, Meta(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]
ConstraintText = Annotated[str, Meta(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]


class StructuredOutputs(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of the fields: the generated text must match it (vLLM's names)."""

    json: (
        Annotated[
            dict[str, Any] | str,
            Meta(description="A JSON schema (an object, or its JSON text) the output validates against."),
        ]
        | None
    ) = None
    regex: (
        Annotated[ConstraintText, Meta(description="A regular expression the whole output matches.")] | None
    ) = None
    choice: (
        Annotated[
            tuple[Choice, ...],
            Meta(
                min_length=1,
                max_length=MAX_CHOICES,
                description="The output is exactly one of these strings.",
            ),
        ]
        | None
    ) = None
    grammar: (
        Annotated[
            ConstraintText,
            Meta(description="A grammar in EBNF (xgrammar's dialect, GBNF-like; the start rule is `root`)."),
        ]
        | None
    ) = None
    json_object: Annotated[bool, Meta(description="true: the output is some JSON object.")] | None = None

    def __post_init__(self) -> None:
        given = [name for name in self.__struct_fields__ if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            # Nested: msgspec names the field, the message follows "Invalid 'structured_outputs': ".
            raise ValueError(
                "give exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) or 'none'}"
            )

    @property
    def kind(self) -> str:
        return next(name for name in self.__struct_fields__ if getattr(self, name) not in (None, False))

    def cache_key(self) -> bytes:
        """Equal for requests that compile to the same grammar (a schema's key order aside)."""
        return msgspec.json.encode(self, order="sorted")


class JsonSchemaFormat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`response_format.json_schema` (OpenAI)."""

    name: Annotated[str, Meta(max_length=64, description="The schema's name (not used for decoding).")]
    schema: Annotated[
        dict[str, Any] | None, Meta(description="The JSON schema; absent: any JSON object.")
    ] = None
    strict: Annotated[bool | None, Meta(description="Accepted: the output always follows the schema.")] = None
    description: Annotated[str | None, Meta(description="Not used for decoding.")] = None


class ResponseFormat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def __post_init__(self) -> None:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")

    def structured_outputs(self) -> StructuredOutputs | None:
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.type == "json_schema":
            schema = self.json_schema.schema
            return (
                StructuredOutputs(json=schema) if schema is not None else StructuredOutputs(json_object=True)
            )
        return None


# vLLM's older request fields -> the StructuredOutputs field each names.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def resolve(req: msgspec.Struct) -> StructuredOutputs | None:
    """The one constraint an OpenAI request asks for, from `structured_outputs`,
    `response_format` or a `guided_*` field; 400 naming the second one when it asks twice."""
    asked: list[tuple[str, StructuredOutputs]] = []
    if req.structured_outputs is not None:
        asked.append(("structured_outputs", req.structured_outputs))
    response_format = getattr(req, "response_format", None)
    if response_format is not None and (so := response_format.structured_outputs()) is not None:
        asked.append(("response_format", so))
    for field, kind in GUIDED_FIELDS.items():
        value = getattr(req, field, None)
        if value is not None:
            asked.append((field, StructuredOutputs(**{kind: value})))
    if len(asked) > 1:
        raise invalid(
            asked[1][0],
            f"Ask for one output constraint only: '{asked[0][0]}' and '{asked[1][0]}' are both given.",
        )
    return asked[0][1] if asked else None


def rename_param(err: ApiError, req: msgspec.Struct) -> None:
    """The backend names a constraint that does not compile `structured_outputs.<kind>`; name
    the field this OpenAI request used instead."""
    if not (err.param or "").startswith("structured_outputs."):
        return
    response_format = getattr(req, "response_format", None)
    if req.structured_outputs is not None:
        return
    if response_format is not None and response_format.type == "json_schema":
        err.param = "response_format.json_schema.schema"
    elif (field := next((f for f in GUIDED_FIELDS if getattr(req, f, None) is not None), None)) is not None:
        err.param = field
