"""A streaming client for any OpenAI-compatible server (ours, vLLM, llama.cpp's server).

Each request asks for `stream_options.include_usage`: output tokens are the server's own count
(`usage.completion_tokens`); a server that sends no usage has its text-carrying chunks counted
instead. `ignore_eos` goes in the body as an extra field (our server and vLLM take it).
Every failure (refused connection, HTTP error, an `error` event, a stream cut before `[DONE]`)
ends up in the record's `error`; nothing here raises for a request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import orjson

from mi.bench.metrics import RequestRecord
from mi.bench.workload import Prompt

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:13000 (a trailing /v1 is dropped)
    endpoint: str = "completions"  # a key of ENDPOINTS
    model: str | None = None  # None: the server's first /v1/models entry, or none at all
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = 600.0  # the longest wait for the next bytes of a stream

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/").removesuffix("/v1")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _body(target: Target, prompt: Prompt) -> dict:
    body: dict = {
        "max_tokens": prompt.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if target.model is not None:
        body["model"] = target.model
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


def _error_message(status: int, raw: bytes) -> str:
    try:
        message = orjson.loads(raw)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}: {message}"


class OpenAIClient:
    """One aiohttp session to `target`; `send` is a `mi.bench.load.Send`."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._url = target.root + ENDPOINTS[target.endpoint]
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.target.timeout)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def served_model(self) -> str | None:
        """The first model the server lists, or None when it lists none (or cannot be asked)."""
        try:
            async with self._session.get(
                self.target.root + "/v1/models", headers=self.target.headers
            ) as resp:
                data = orjson.loads(await resp.read())["data"]
                return data[0]["id"] if resp.status == 200 and data else None
        except (
            aiohttp.ClientError,
            OSError,
            asyncio.TimeoutError,
            orjson.JSONDecodeError,
            KeyError,
            TypeError,
        ):
            return None

    async def send(self, prompt: Prompt) -> RequestRecord:
        record = RequestRecord(start=time.perf_counter(), prompt_tokens=prompt.prompt_len)
        try:
            async with self._session.post(
                self._url, data=orjson.dumps(_body(self.target, prompt)), headers=self._post_headers
            ) as resp:
                if resp.status != 200:
                    record.error = _error_message(resp.status, await resp.read())
                else:
                    await self._read_stream(resp, record)
        except asyncio.TimeoutError:
            record.error = f"no answer within {self.target.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        record.end = time.perf_counter()
        return record

    @property
    def _post_headers(self) -> dict:
        return {"Content-Type": "application/json", **self.target.headers}

    async def _read_stream(self, resp: aiohttp.ClientResponse, record: RequestRecord) -> None:
        is_chat = self.target.endpoint == "chat"
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            now = time.perf_counter()
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                record.error = f"malformed SSE event: {payload[:80]!r}"
                return
            if "error" in event:
                error = event["error"]
                record.error = f"stream error: {error.get('message') if isinstance(error, dict) else error}"
                return
            choices = event.get("choices") or ()
            if choices:
                choice = choices[0]
                text = (choice.get("delta") or {}).get("content") if is_chat else choice.get("text")
                if text:
                    record.chunk_times.append(now)
            usage = event.get("usage")
            if usage:
                record.output_tokens = usage.get("completion_tokens")
                record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.error = "the stream ended before [DONE]"
