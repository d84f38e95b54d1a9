"""`SamplingParams`: how one request samples and when it stops, declared once for every hop.

The OpenAI requests (mi/api/openai.py, chat.py), the backend's `GenerateRequest`
(mi/api/backend.py), the SDK, and the ring messages (mi/actors/messages.py) all carry this one
Struct or extend it; the bounds below are the only ones, and msgspec checks them in C wherever a
request is decoded (JSON at the HTTP edge, msgpack on the rings). The OpenAPI document takes its
schema, descriptions included, from here.

After construction the values are canonical, so the engine reads them without special cases:
`stop` is a tuple, `top_k` -1 (vLLM's "off") becomes 0, and `top_p` 0 (allowed by the OpenAI
spec) becomes `top_k` 1 with `top_p` 1, which keeps the most likely token only. What depends
on the model (token ids below the vocabulary size) is `check_vocab`'s job.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from mi.api.errors import ApiError
from mi.api.structured import StructuredOutputs

__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "INT64_MIN",
    "LOGIT_BIAS_LIMIT",
    "MAX_LOGIT_BIAS_ENTRIES",
    "MAX_LOGPROBS",
    "MAX_STOP",
    "SamplingParams",
]

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives per position, for logprobs and prompt_logprobs
MAX_STOP = 16  # stop strings per request (mi-frontend --max-stop may lower it)
MAX_LOGIT_BIAS_ENTRIES = 1024  # entries in logit_bias
LOGIT_BIAS_LIMIT = 100.0  # |bias| of one logit_bias entry

TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]
StopString = Annotated[str, Meta(min_length=1)]
Bias = Annotated[float, Meta(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]
NumLogprobs = Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How one request samples and when it stops (vLLM's names, OpenAI's bounds)."""

    max_tokens: Annotated[
        int,
        Meta(
            ge=0,
            le=INT32_MAX,
            description="Tokens to generate. 0 only scores the prompt, and needs prompt_logprobs.",
        ),
    ] = 16
    min_tokens: Annotated[
        int,
        Meta(
            ge=0,
            le=INT32_MAX,
            description="EOS and stop_token_ids cannot end the request before this many tokens.",
        ),
    ] = 0
    temperature: Annotated[
        float,
        Meta(
            ge=0.0,
            le=2.0,
            description="Sampling temperature; 0 is greedy.",
        ),
    ] = 1.0
    top_p: Annotated[
        float,
        Meta(
            ge=0.0,
            le=1.0,
            description="Nucleus sampling: keep the most likely tokens whose probabilities sum to "
            "top_p; 1 is off, 0 keeps the most likely token only.",
        ),
    ] = 1.0
    top_k: Annotated[
        int,
        Meta(
            ge=-1,
            le=INT32_MAX,
            description="Keep the k most likely tokens; 0 or -1 is off.",
        ),
    ] = 0
    min_p: Annotated[
        float,
        Meta(
            ge=0.0,
            le=1.0,
            description="Drop tokens less likely than min_p times the most likely one; 0 is off.",
        ),
    ] = 0.0
    repetition_penalty: Annotated[
        float,
        Meta(
            # Bounded so that no float32 logit below ~1e32 is divided or multiplied into infinity:
            # outside these bounds a request could only fail at sampling time, as a 500.
            ge=1e-6,
            le=1e6,
            description="Divides positive (multiplies negative) logits of tokens in the prompt or "
            "the output; 1 is off.",
        ),
    ] = 1.0
    presence_penalty: Annotated[
        float,
        Meta(
            ge=-2.0,
            le=2.0,
            description="Subtracted once from the logit of each generated token.",
        ),
    ] = 0.0
    frequency_penalty: Annotated[
        float,
        Meta(
            ge=-2.0,
            le=2.0,
            description="Subtracted from a token's logit once per time it was generated.",
        ),
    ] = 0.0
    logit_bias: Annotated[
        dict[TokenId, Bias],
        Meta(
            max_length=MAX_LOGIT_BIAS_ENTRIES,
            description="Token id -> bias in [-100, 100], added to its logit before sampling.",
        ),
    ] = {}
    seed: (
        Annotated[
            int,
            Meta(
                ge=INT64_MIN,
                le=INT64_MAX,
                description="Seed of this request's random numbers: the same seed samples the same "
                "tokens. Absent: a random one.",
            ),
        ]
        | None
    ) = None
    logprobs: (
        Annotated[
            int,
            Meta(
                ge=0,
                le=MAX_LOGPROBS,
                description="Return the logprob of each generated token and of this many alternatives.",
            ),
        ]
        | None
    ) = None
    prompt_logprobs: (
        Annotated[
            int,
            Meta(
                ge=0,
                le=MAX_LOGPROBS,
                description="Return the logprob of each prompt token and of this many alternatives.",
            ),
        ]
        | None
    ) = None
    stop: (
        Annotated[
            tuple[StopString, ...],
            Meta(
                max_length=MAX_STOP,
                description="Strings that end the text where they appear (the string is not returned, "
                "unless include_stop_str_in_output).",
            ),
        ]
        | StopString
    ) = ()
    include_stop_str_in_output: Annotated[
        bool,
        Meta(
            description="Keep the matched stop string at the end of the text.",
        ),
    ] = False
    stop_token_ids: Annotated[
        tuple[TokenId, ...],
        Meta(
            description="Token ids that end the request (the token is returned).",
        ),
    ] = ()
    ignore_eos: Annotated[
        bool,
        Meta(
            description="Keep generating after EOS, until max_tokens or a stop condition.",
        ),
    ] = False
    skip_special_tokens: Annotated[
        bool,
        Meta(
            description="Leave special tokens out of the returned text.",
        ),
    ] = True
    structured_outputs: Annotated[
        StructuredOutputs | None,
        Meta(description="Constrain the output to a JSON schema, a regex, a choice or a grammar."),
    ] = None

    def __post_init__(self) -> None:
        # ValueError here is a msgspec.ValidationError when decoding, naming no field: say it.
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("'max_tokens' 0 only scores the prompt: it needs 'prompt_logprobs'.")
        if 0 <= self.max_tokens < self.min_tokens:  # a negative max_tokens is its own error
            raise ValueError(
                f"'min_tokens' ({self.min_tokens}) must not exceed 'max_tokens' ({self.max_tokens})."
            )
        if isinstance(self.stop, str):
            msgspec.structs.force_setattr(self, "stop", (self.stop,))
        if self.top_k == -1:
            msgspec.structs.force_setattr(self, "top_k", 0)
        if self.top_p == 0.0:
            msgspec.structs.force_setattr(self, "top_p", 1.0)
            msgspec.structs.force_setattr(self, "top_k", 1)

    def check_vocab(self, vocab_size: int) -> None:
        """`ApiError` 400 naming the field when a token id is not below `vocab_size`."""
        for param, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = next((token_id for token_id in ids if token_id >= vocab_size), None)
            if bad is not None:
                raise ApiError(
                    400,
                    f"Token id {bad} in '{param}' is out of range [0, {vocab_size}).",
                    param,
                    code="invalid_value",
                )

    def sampling_params(self) -> SamplingParams:
        """Only the sampling fields, as a plain `SamplingParams` (for a subclass, e.g. a ring
        message must not carry a backend request's prompt)."""
        if type(self) is SamplingParams:
            return self
        return SamplingParams(**{name: getattr(self, name) for name in SamplingParams.__struct_fields__})

    @property
    def is_penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
