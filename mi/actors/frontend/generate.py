"""`POST /v1/completions` and `POST /v1/chat/completions`: one backend generate per choice.

Both endpoints run the same machinery; a `Format` (completions or chat) turns backend results
and stream pieces into the endpoint's answer Structs (mi/api/openai.py, chat.py).

Invariants:
- every backend call the frontend gives up on (client gone, sibling choice failed, shutdown) is
  closed and aborted with `POST /v1/abort` (handler cancellation is on, so a closed client
  cancels us);
- every backend stream is opened (status checked) before our 200 goes out, so a backend 4xx such
  as a too-long prompt is still an HTTP error, not an event;
- in a stream, `finish_reason` rides on the chunk with the last text, exactly once per choice:
  one text piece per choice is held back until the next one (or the end) arrives;
- usage counts each prompt once (choice `index % n == 0`) and every choice's generated tokens;
- tokenizing and chat templating run in a worker thread, never on the loop, each distinct text
  prompt once, after the size check; the backend gets token ids (n copies of a long prompt are
  neither tokenized nor sent as text n times);
- every backend generate is read as a stream, so the backend client's read timeout
  (--backend-read-timeout) also ends a non-streamed request whose backend went silent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
from aiohttp import web

from mi.actors.frontend.formats import ChatFormat, CompletionFormat, Format, Piece, UsageTotal
from mi.actors.frontend.state import SHUTTING_DOWN, STATE, FrontendState, json_response, read_json
from mi.api import structured
from mi.api.backend import (
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamDelta,
    StreamStart,
    Usage,
    check_context_len,
    check_prompt_bytes,
)
from mi.api.chat import parse_chat_request
from mi.api.errors import ApiError
from mi.api.openai import parse_completion_request
from mi.api.openai_common import new_id
from mi.api.sse import DONE, encode_event
from mi.sdk.transport import Backend

__all__ = ["chat_completions", "completions"]

log = logging.getLogger("mi.frontend")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- handlers -----------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    start = time.monotonic()
    body = await read_json(request)
    info = await state.backend.model_info()
    cid = new_id("cmpl")
    creq = parse_completion_request(
        body,
        served_names=await state.served_names(),
        vocab_size=info.vocab_size,
        completion_id=cid,
        limits=state.config.limits,
    )
    needs_tokenizer = creq.logprobs is not None or (
        creq.echo and not all(isinstance(p, str) for p in creq.prompts)
    )
    tok = await state.tokenizers.get() if needs_tokenizer else None
    reqs = await _tokenized(state, info, creq.prompts, creq.generate_requests)
    try:
        return await _generate(request, state, CompletionFormat(creq, cid, tok), reqs, creq.stream, start)
    except ApiError as err:
        structured.rename_param(err, creq.request)
        raise


async def _tokenized(
    state: FrontendState, info: ModelInfo, prompts: tuple, reqs: tuple[GenerateRequest, ...]
) -> tuple[GenerateRequest, ...]:
    """`reqs` with each text prompt replaced by its token ids (see the module invariants)."""
    texts = list(dict.fromkeys(p for p in prompts if isinstance(p, str)))
    if not texts:
        return reqs
    for text in texts:
        check_prompt_bytes(text, info.max_prompt_bytes, info.max_model_len)
    tok = await state.tokenizers.get()
    add_special_tokens = reqs[0].add_special_tokens
    encoded = await asyncio.to_thread(lambda: [tuple(tok.encode(t, add_special_tokens)) for t in texts])
    ids_of = dict(zip(texts, encoded))
    for ids in encoded:
        check_context_len(len(ids), reqs[0].max_tokens, info.max_model_len)
    return tuple(
        req
        if req.prompt is None
        else msgspec.structs.replace(req, prompt=None, prompt_ids=ids_of[req.prompt])
        for req in reqs
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    start = time.monotonic()
    body = await read_json(request)
    info = await state.backend.model_info()
    creq = parse_chat_request(
        body, served_names=await state.served_names(), vocab_size=info.vocab_size, limits=state.config.limits
    )
    tok = await state.tokenizers.get()
    try:
        prompt_ids = await asyncio.to_thread(
            tok.render_chat,
            creq.messages,
            creq.add_generation_prompt,
            creq.continue_final_message,
            creq.chat_template_kwargs,
            max_prompt_bytes=info.max_prompt_bytes,
            max_model_len=info.max_model_len,
        )
        max_tokens = creq.max_tokens
        if max_tokens is None:  # the rest of the context (the backend reports a prompt that fills it)
            max_tokens = max(1, info.max_model_len - len(prompt_ids))
            if state.config.limits.max_tokens is not None:
                max_tokens = min(max_tokens, state.config.limits.max_tokens)
        check_context_len(len(prompt_ids), max_tokens, info.max_model_len)
        cid = new_id("chatcmpl")
        reqs = creq.generate_requests(prompt_ids, cid, max_tokens)
        return await _generate(request, state, ChatFormat(creq, cid, tok), reqs, creq.stream, start)
    except ApiError as err:
        if err.param == "prompt":  # the backend's name for what the messages rendered to
            err.param = "messages"
        structured.rename_param(err, creq.request)
        raise


async def _generate(
    request: web.Request,
    state: FrontendState,
    fmt: Format,
    reqs: tuple[GenerateRequest, ...],
    stream: bool,
    start: float,
) -> web.StreamResponse:
    if stream:
        return await _stream(request, state, fmt, reqs, start)
    results = await _until_shutdown(
        state, _run_all(state.backend, reqs, lambda req: _collect(state.backend, req))
    )
    usage = UsageTotal(fmt.n)
    for index, result in enumerate(results):
        _check_not_aborted(result.finish_reason)
        usage.add(index, result.usage)
    choices = [fmt.choice(index, result) for index, result in enumerate(results)]
    state.metrics.observe_finished(usage.prompt_tokens, usage.completion_tokens, time.monotonic() - start)
    return json_response(fmt.response(choices, usage.info()))


async def _collect(backend: Backend, req: GenerateRequest) -> GenerateResult:
    """One non-streamed generate, read as the backend's stream (a silent backend then trips the
    read timeout between lines, not once for the whole generation)."""
    resp = await backend.stream(msgspec.structs.replace(req, stream=True))
    is_done = False
    try:
        start, ids, texts, logprobs = None, [], [], []
        async for item in backend.lines(resp):
            if isinstance(item, StreamStart):
                start = item
                continue
            ids += item.ids
            texts.append(item.text)
            logprobs += item.logprobs or []
            if item.finish_reason is not None:
                is_done = True
                return GenerateResult(
                    start.request_id,
                    start.prompt_ids,
                    tuple(ids),
                    "".join(texts),
                    item.finish_reason,
                    item.usage or Usage(len(start.prompt_ids), len(ids)),
                    logprobs=tuple(logprobs) if req.logprobs is not None else None,
                    prompt_logprobs=start.prompt_logprobs,
                )
        raise ApiError(502, "The backend closed the stream unexpectedly.")
    finally:
        resp.release()
        if not is_done:  # a read timeout, a cut stream, our cancellation: free its KV blocks now
            backend.abort(req.request_id)


async def _until_shutdown(state: FrontendState, work: Awaitable):
    """`work`'s result, or 503 shutting_down (and `work` cancelled: its backend calls aborted)
    once the frontend's drain is over."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(state.stop_requests.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise SHUTTING_DOWN
        return task.result()
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _check_not_aborted(finish_reason: str | None) -> None:
    if finish_reason == "abort":
        raise ApiError(503, "The request was aborted by the server.", code="aborted", retry_after=1)


async def _run_all(
    backend: Backend,
    reqs: tuple[GenerateRequest, ...],
    call: Callable[[GenerateRequest], Awaitable],
    release: Callable[[object], None] | None = None,
) -> list:
    """`call(req)` for every request concurrently, results in request order.

    The first failure (or our cancellation) cancels and aborts the calls still running, and
    hands the results already in to `release` (and aborts them too: they may still be running).
    """
    tasks = [asyncio.ensure_future(call(req)) for req in reqs]
    is_ok = False
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()
        results = [task.result() for task in tasks]
        is_ok = True
        return results
    finally:
        if not is_ok:
            for req, task in zip(reqs, tasks):
                if not task.done():
                    task.cancel()
                    backend.abort(req.request_id)
                elif not task.cancelled() and task.exception() is None and release is not None:
                    release(task.result())
                    backend.abort(req.request_id)


class _HoldBack:
    """Per choice, the last text piece not yet written (see the module invariant)."""

    def __init__(self) -> None:
        self._held: dict[int, Piece] = {}

    def hold(self, index: int, piece: Piece) -> None:
        self._held[index] = piece

    def add(self, index: int, piece: Piece, finish_reason: str | None) -> list[tuple[Piece, str | None]]:
        """The pieces to write now, in order, each with its finish_reason."""
        held = self._held.pop(index, None)
        if held is None:
            if finish_reason is not None:
                return [(piece, finish_reason)]
            self._held[index] = piece
            return []
        if piece.text and held.text:
            if finish_reason is not None:
                return [(held, None), (piece, finish_reason)]
            self._held[index] = piece
            return [(held, None)]
        if finish_reason is not None:
            return [(held + piece, finish_reason)]
        self._held[index] = held + piece
        return []


async def _stream(
    request: web.Request, state: FrontendState, fmt: Format, reqs: tuple[GenerateRequest, ...], start: float
) -> web.StreamResponse:
    backend, metrics = state.backend, state.metrics
    streams = await _run_all(backend, reqs, backend.stream, lambda resp: resp.release())
    response = web.StreamResponse(headers=SSE_HEADERS)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, resp: aiohttp.ClientResponse) -> None:
        try:
            async for item in backend.lines(resp):
                await queue.put((index, item))
        except ApiError as err:
            await queue.put((index, err))
        finally:
            resp.release()
            queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, resp)) for i, resp in enumerate(streams)]
    state.open_streams.add(queue)  # the drain's end puts its error here
    finished: set[int] = set()
    held = _HoldBack()
    usage = UsageTotal(fmt.n)
    last_token_at: dict[int, float] = {}
    try:
        await response.prepare(request)
        for chunk in fmt.opening_chunks():
            await response.write(encode_event(chunk))
        num_open = len(pumps)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
                if index not in finished:  # the stream ended without finish_reason
                    raise ApiError(502, "The backend closed the stream unexpectedly.")
            elif isinstance(item, ApiError):
                raise item
            elif isinstance(item, StreamStart):
                prompt = fmt.prompt_piece(index, item.prompt_ids, item.prompt_logprobs)
                if prompt is not None:
                    held.hold(index, prompt)
            elif isinstance(item, StreamDelta):
                _check_not_aborted(item.finish_reason)
                if item.ids:
                    now = time.monotonic()
                    if not last_token_at:
                        metrics.ttft.observe(now - start)
                    if index in last_token_at:
                        metrics.observe_tokens(len(item.ids), now - last_token_at[index])
                    last_token_at[index] = now
                piece = fmt.piece(item.ids, item.logprobs, item.text)
                for out, finish_reason in held.add(index, piece, item.finish_reason):
                    await response.write(encode_event(fmt.chunk(index, out, finish_reason)))
                if item.finish_reason is not None:
                    finished.add(index)
                    usage.add(index, item.usage)
        tail = DONE
        if fmt.include_usage:
            tail = encode_event(fmt.usage_chunk(usage.info())) + DONE
        await response.write(tail)
        await response.write_eof()
        metrics.observe_finished(usage.prompt_tokens, usage.completion_tokens, time.monotonic() - start)
    except ApiError as err:
        await _write_quietly(response, encode_event(err.body()) + DONE)
    except ConnectionResetError:
        pass  # the client went away; the finally block aborts the backend work
    except Exception:
        log.exception("unexpected error in a stream")
        err = ApiError(500, "The server had an error processing your request.")
        await _write_quietly(response, encode_event(err.body()) + DONE)
    finally:
        state.open_streams.discard(queue)
        for index, (req, task) in enumerate(zip(reqs, pumps)):
            task.cancel()
            if index not in finished:
                backend.abort(req.request_id)
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    try:
        if not response.prepared:
            return
        await response.write(data)
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass
