"""The offline client: the same workload sent straight to mi-backend's /v1/generate, no frontend.

The SDK has no in-process engine (the engine is the backend's processes), so "offline" is one
`mi.sdk.transport.Backend` session over the backend's unix socket, the very path the frontend
uses; serve / offline throughput is then what the frontend and its OpenAI HTTP/SSE cost.
Output tokens are the ids of the NDJSON lines (exact), a chunk is a line that carries ids.
"""

from __future__ import annotations

import time

from mi.api.backend import GenerateRequest, StreamDelta, StreamStart
from mi.bench.metrics import RequestRecord
from mi.bench.workload import Prompt
from mi.config import cert_path
from mi.sdk.transport import Backend, address
from mi.sdk.types import MIError


class BackendClient:
    """One transport session to the backend at `spec` (PORT or HOST:PORT); `send` is a `Send`."""

    def __init__(
        self, spec: str, *, cert: str | None = None, ignore_eos: bool = False, temperature: float = 0.0
    ) -> None:
        url, unix_socket = address(spec)
        self._backend = Backend(url, cert_path(cert), unix_socket=unix_socket, read_timeout=600)
        self._ignore_eos, self._temperature = ignore_eos, temperature

    async def __aenter__(self) -> BackendClient:
        await self._backend.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._backend.close()

    async def served_model(self) -> str | None:
        try:
            return (await self._backend.model_info()).model_name
        except MIError:
            return None

    async def send(self, prompt: Prompt) -> RequestRecord:
        record = RequestRecord(start=time.perf_counter(), prompt_tokens=prompt.prompt_len, output_tokens=0)
        req = GenerateRequest(
            prompt=prompt.text,
            max_tokens=prompt.output_len,
            temperature=self._temperature,
            ignore_eos=self._ignore_eos,
            stream=True,
        )
        try:
            resp = await self._backend.stream(req)
            try:
                async for item in self._backend.lines(resp):
                    if isinstance(item, StreamStart):
                        record.prompt_tokens = len(item.prompt_ids)
                    elif isinstance(item, StreamDelta) and item.ids:
                        record.chunk_times.append(time.perf_counter())
                        record.output_tokens += len(item.ids)
            finally:
                resp.release()
        except MIError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        record.end = time.perf_counter()
        return record
