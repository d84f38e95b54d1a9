"""The frontend's routes besides generation: health, models, version, OpenAPI document,
metrics, and the tokenizer endpoints vLLM serves (/tokenize, /detokenize, /tokenizer_info)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from mi.actors.frontend.metrics import CONTENT_TYPE
from mi.actors.frontend.state import STATE, json_response, read_json
from mi.api.chat import template_messages
from mi.api.errors import ApiError, decode_body, invalid
from mi.api.info import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from mi.api.openai_common import ModelCard, check_model, model_list
from mi.api.openapi import openapi_document

__all__ = ["ROUTES"]


async def health(request: web.Request) -> web.Response:
    """200 when the backend's /health is 200, else 503 with the backend's status word."""
    status, body = await request.app[STATE].backend.health()
    if status == 200:
        return json_response(HealthResponse("ok"))
    word = body.get("status") if isinstance(body, dict) else None
    return json_response(
        HealthResponse(word if isinstance(word, str) else "unavailable"), 503, {"Retry-After": "1"}
    )


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await state.backend.model_info()
    return json_response(model_list(await state.served_names(), state.created, info.max_model_len))


async def model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await state.backend.model_info()
    name = check_model(request.match_info["model"], await state.served_names())
    return json_response(ModelCard(id=name, created=state.created, max_model_len=info.max_model_len))


async def version(request: web.Request) -> web.Response:
    from mi import __version__

    return json_response(VersionResponse(__version__))


async def openapi(request: web.Request) -> web.Response:
    from mi import __version__

    return json_response(openapi_document(__version__))


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        stats = await state.backend.stats()
    except ApiError:
        stats = None
    return web.Response(body=state.metrics.render(stats), headers={"Content-Type": CONTENT_TYPE})


async def tokenize(request: web.Request) -> web.Response:
    """A prompt, or chat messages rendered with the template, as token ids."""
    state = request.app[STATE]
    req = decode_body(await read_json(request), TokenizeRequest)
    info = await state.backend.model_info()
    check_model(req.model, await state.served_names())
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "Exactly one of 'prompt' and 'messages' must be given.", "prompt")
    tok = await state.tokenizers.get()
    if req.prompt is not None:
        ids = await asyncio.to_thread(tok.encode, req.prompt, req.add_special_tokens)
    else:
        add_generation_prompt = req.add_generation_prompt
        if add_generation_prompt is None:
            add_generation_prompt = not req.continue_final_message
        ids = await asyncio.to_thread(
            tok.render_chat,
            template_messages(req.messages),
            add_generation_prompt,
            req.continue_final_message,
            req.chat_template_kwargs,
        )
    token_strs = [tok.token_str(i) for i in ids] if req.return_token_strs else None
    return json_response(TokenizeResponse(len(ids), info.max_model_len, ids, token_strs))


async def detokenize(request: web.Request) -> web.Response:
    """Token ids as text."""
    state = request.app[STATE]
    req = decode_body(await read_json(request), DetokenizeRequest)
    info = await state.backend.model_info()
    check_model(req.model, await state.served_names())
    bad = next((token_id for token_id in req.tokens if token_id >= info.vocab_size), None)
    if bad is not None:
        raise invalid("tokens", f"Token id {bad} in 'tokens' is out of range [0, {info.vocab_size}).")
    tok = await state.tokenizers.get()
    return json_response(DetokenizeResponse(tok.decode(req.tokens, req.skip_special_tokens)))


async def tokenizer_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await state.backend.model_info()
    tok = await state.tokenizers.get()
    return json_response(tok.info(info.max_model_len))


ROUTES = [
    ("GET", "/health", health),
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{model}", model),
    ("GET", "/version", version),
    ("GET", "/openapi.json", openapi),
    ("GET", "/metrics", metrics),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/tokenizer_info", tokenizer_info),
]
