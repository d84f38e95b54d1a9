"""The frontend's routes besides generation: health, models, version, OpenAPI document,
metrics, and the tokenizer endpoints vLLM serves (/tokenize, /detokenize, /tokenizer_info)."""

from __future__ import annotations

from aiohttp import web

from mi.actors.frontend.metrics import CONTENT_TYPE
from mi.actors.frontend.state import STATE, json_response, read_json
from mi.api.chat import read_messages
from mi.api.errors import ApiError, read_bool, read_token_ids, reject_unknown, wrong_type
from mi.api.openai_common import check_model, model_card, model_list
from mi.api.openapi import openapi_document

__all__ = ["ROUTES"]


async def health(request: web.Request) -> web.Response:
    """200 when the backend's /health is 200, else 503 with the backend's status word."""
    status, body = await request.app[STATE].backend.health()
    if status == 200:
        return json_response({"status": "ok"})
    word = body.get("status") if isinstance(body, dict) else None
    return json_response({"status": word if isinstance(word, str) else "unavailable"}, 503,
                         {"Retry-After": "1"})


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await state.backend.model_info()
    return json_response(model_list(await state.served_names(), state.created, info.max_model_len))


async def model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await state.backend.model_info()
    name = request.match_info["model"]
    check_model({"model": name}, await state.served_names())
    return json_response(model_card(name, state.created, info.max_model_len))


async def version(request: web.Request) -> web.Response:
    from mi import __version__

    return json_response({"version": __version__})


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
    """`{"prompt": str}` or `{"messages": [...]}` -> `{"count", "max_model_len", "tokens", "token_strs"}`."""
    state = request.app[STATE]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise wrong_type("body", body, "a JSON object")
    reject_unknown(body, frozenset({"model", "prompt", "messages", "add_special_tokens",
                                    "add_generation_prompt", "continue_final_message",
                                    "chat_template_kwargs", "return_token_strs"}))
    info = await state.backend.model_info()
    check_model(body, await state.served_names())
    return_strs = read_bool(body, "return_token_strs", False)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise ApiError(400, "Exactly one of 'prompt' and 'messages' must be given.", "prompt")
    tok = await state.tokenizers.get()
    if has_prompt:
        if not isinstance(body["prompt"], str):
            raise wrong_type("prompt", body["prompt"], "a string")
        ids = tok.encode(body["prompt"], read_bool(body, "add_special_tokens", True))
    else:
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise wrong_type("chat_template_kwargs", kwargs, "an object")
        continue_final = read_bool(body, "continue_final_message", False)
        ids = tok.render_chat(read_messages(body["messages"]),
                              read_bool(body, "add_generation_prompt", not continue_final),
                              continue_final, kwargs)
    return json_response({
        "count": len(ids),
        "max_model_len": info.max_model_len,
        "tokens": ids,
        "token_strs": [tok.token_str(i) for i in ids] if return_strs else None,
    })


async def detokenize(request: web.Request) -> web.Response:
    """`{"tokens": [int]}` -> `{"prompt": str}`."""
    state = request.app[STATE]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise wrong_type("body", body, "a JSON object")
    reject_unknown(body, frozenset({"model", "tokens", "skip_special_tokens"}))
    info = await state.backend.model_info()
    check_model(body, await state.served_names())
    if body.get("tokens") is None:
        raise ApiError(400, "'tokens' is required.", "tokens", code="missing_required_parameter")
    ids = read_token_ids(body["tokens"], "tokens", info.vocab_size, allow_empty=True)
    tok = await state.tokenizers.get()
    return json_response({"prompt": tok.decode(ids, read_bool(body, "skip_special_tokens", False))})


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
