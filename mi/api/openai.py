"""The OpenAI `/v1/completions` protocol: the request Struct and the one conversion
from a request to backend `GenerateRequest`s.

`parse_completion_request` decodes a body into a `CompletionRequest` (types and bounds, checked
by msgspec), checks what depends on this server (served names, vocabulary, `Limits`) and builds
one `GenerateRequest` per choice, choice `index` = prompt index * n + i. Field names follow the
OpenAI spec (tests/data/openai-subset.yaml); the common policy is in openai_common.py.

Completions specifics:
- unknown fields are rejected, as OpenAI itself does ("Unrecognized request argument supplied"):
  a typo such as `max_token` must not silently fall back to a default;
- `best_of` (other than 1) and a non-empty `suffix` are a 400 "not supported";
- `echo` puts the prompt first, and with `logprobs` the prompt's tokens first (the first one's
  logprob null); `max_tokens: 0` is allowed only with `echo` (scoring, as lm-evaluation-harness
  does), and then the backend is asked for prompt logprobs;
- a token-id prompt is used as given (no BOS added); an empty prompt is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from mi.api import structured
from mi.api.backend import GenerateRequest
from mi.api.errors import ApiError, decode_body, invalid
from mi.api.openai_common import (
    Limits,
    StreamOptions,
    check_limits,
    check_model,
    sampling_base,
    seed_for_choice,
    to_generate_request,
)
from mi.api.sampling import INT32_MAX, SamplingParams, TokenId

__all__ = [
    "CompletionPlan",
    "CompletionRequest",
    "parse_completion_request",
]

Text = Annotated[str, Meta(min_length=1)]
TokenIds = Annotated[list[TokenId], Meta(min_length=1)]
Prompt = Text | Annotated[list[Text | TokenId | TokenIds], Meta(min_length=1)]


def not_supported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported.", param, code="unsupported_parameter")


class CompletionRequest(
    sampling_base("CompletionSampling", keep=frozenset({"logprobs"})),
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
):
    """A `POST /v1/completions` body: the sampling fields plus these."""

    prompt: Annotated[
        Prompt,
        Meta(
            description="A string, an array of strings, an array of token ids or an array of such "
            "arrays; each prompt gets `n` choices.",
        ),
    ]
    model: Annotated[str | None, Meta(description="A served model name; absent: the first one.")] = None
    max_tokens: (
        Annotated[
            int,
            Meta(
                ge=0,
                le=INT32_MAX,
                description="Tokens to generate per choice; default 16 (or the server's --max-tokens if "
                "lower). 0 only with `echo`: the answer scores the prompt.",
            ),
        ]
        | None
    ) = None
    n: Annotated[int, Meta(ge=1, description="Choices per prompt.")] = 1
    stream: Annotated[bool, Meta(description="Answer with server-sent events as tokens arrive.")] = False
    stream_options: Annotated[StreamOptions | None, Meta(description="Only with stream.")] = None
    echo: Annotated[
        bool, Meta(description="Put the prompt (and its logprobs) before each choice's text.")
    ] = False
    best_of: (
        Annotated[int, Meta(ge=1, description="Only 1 is supported.", extra_json_schema={"enum": [1]})] | None
    ) = None
    suffix: (
        Annotated[
            str,
            Meta(
                description="Only an empty suffix is supported.",
                extra_json_schema={"maxLength": 0},
            ),
        ]
        | None
    ) = None
    user: Annotated[str, Meta(description="Accepted and ignored.")] | None = None
    add_special_tokens: Annotated[
        bool,
        Meta(
            description="Tokenizing a text prompt adds the model's special tokens (e.g. BOS).",
        ),
    ] = True

    def __post_init__(self) -> None:
        # ValueError here becomes a 400 naming the quoted field (mi.api.errors.validation_error).
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("'max_tokens' may be 0 only with 'echo' (to score the prompt).")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true.")

    def to_generate_requests(
        self,
        completion_id: str,
        *,
        vocab_size: int,
        limits: Limits,
    ) -> tuple[tuple[str | tuple[int, ...], ...], tuple[GenerateRequest, ...]]:
        """The prompts and one backend request per choice, ids `{completion_id}-{index}` (so an
        abort can name them); `ApiError` when this server's limits or vocabulary say no."""
        if self.best_of not in (None, 1):
            raise not_supported("best_of", "best_of other than 1")
        if self.suffix:
            raise not_supported("suffix", "suffix")
        check_limits(
            limits,
            n=self.n,
            stop=self.stop,
            logprobs=self.logprobs,
            logprobs_param="logprobs",
            max_tokens=self.max_tokens,
            max_tokens_param="max_tokens",
        )
        SamplingParams.check_vocab(self, vocab_size)  # the sampling fields are SamplingParams' own
        prompts = _prompts(self.prompt, vocab_size)
        if len(prompts) * self.n > limits.max_choices:
            raise invalid(
                "prompt",
                f"At most {limits.max_choices} choices (prompts x n) per request, "
                f"got {len(prompts)} x {self.n}.",
            )
        max_tokens = self.max_tokens if self.max_tokens is not None else min(16, limits.max_tokens or 16)
        # NOTE: echo with logprobs (or scoring with max_tokens 0) needs the prompt's logprobs.
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        elif max_tokens == 0:
            prompt_logprobs = 0
        template = to_generate_request(
            self,
            prompt=prompts[0] if isinstance(prompts[0], str) else None,
            prompt_ids=None if isinstance(prompts[0], str) else prompts[0],
            add_special_tokens=self.add_special_tokens,
            max_tokens=max_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=prompt_logprobs,
            stream=self.stream,
        )
        reqs = []
        for prompt_index, prompt in enumerate(prompts):
            is_text = isinstance(prompt, str)
            for i in range(self.n):
                reqs.append(
                    msgspec.structs.replace(
                        template,
                        request_id=f"{completion_id}-{prompt_index * self.n + i}",
                        prompt=prompt if is_text else None,
                        prompt_ids=None if is_text else prompt,
                        seed=seed_for_choice(self.seed, i),
                    )
                )
        return tuple(prompts), tuple(reqs)


def _prompts(prompt: str | list, vocab_size: int) -> list[str | tuple[int, ...]]:
    """The prompts of a decoded `prompt`: an array must hold one kind of element."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, int) for p in prompt):
        prompts = [tuple(prompt)]
    elif all(isinstance(p, list) for p in prompt):
        prompts = [tuple(p) for p in prompt]
    else:
        raise ApiError(
            400,
            "'prompt' must be a string, an array of strings, an array of token ids or an "
            "array of token id arrays, not a mix.",
            "prompt",
            code="invalid_type",
        )
    bad = next((token_id for ids in prompts for token_id in ids if token_id >= vocab_size), None)
    if bad is not None:
        raise invalid("prompt", f"Token id {bad} in 'prompt' is out of range [0, {vocab_size}).")
    return prompts


@dataclass(frozen=True)
class CompletionPlan:
    """A checked completion request: what to answer with and one `GenerateRequest` per choice."""

    request: CompletionRequest
    model: str  # the name to answer with
    prompts: tuple[str | tuple[int, ...], ...]
    generate_requests: tuple[GenerateRequest, ...]  # in choice order

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def echo(self) -> bool:
        return self.request.echo

    @property
    def logprobs(self) -> int | None:
        return self.request.logprobs

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage: a last chunk with usage and no choices."""
        return self.request.stream_options is not None and self.request.stream_options.include_usage


def parse_completion_request(
    body: object,
    *,
    served_names: tuple[str, ...],
    vocab_size: int,
    completion_id: str,
    limits: Limits = Limits(),
) -> CompletionPlan:
    """Check a decoded body; raise `ApiError` (400, or 404 for an unknown model) on the first problem."""
    req = decode_body(body, CompletionRequest)
    model = check_model(req.model, served_names)
    structured.resolve(req)  # one output constraint at most (each choice's request resolves it again)
    prompts, reqs = req.to_generate_requests(completion_id, vocab_size=vocab_size, limits=limits)
    return CompletionPlan(req, model, prompts, reqs)
