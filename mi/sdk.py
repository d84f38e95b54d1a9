"""The Python SDK: `Model` talks to a running `mi-backend` over its token-level API.

    from mi import Model
    model = Model(endpoint="http://localhost:12222")
    outputs = model.generate(["hello, my name is", "Welcome to"], do_sample=False, max_new_tokens=200)
    model.tokenizer.decode(outputs[0].ids)

`generate` is synchronous: it runs the prompts concurrently on a private event loop (in a helper
thread when the calling thread already runs one). `agenerate` is the same call for async code.
Failures raise `MIError` subclasses: `BackendUnavailable`, `InvalidRequest` (4xx), `ServerError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from mi.api.backend import GenerateRequest, GenerateResult, ModelInfo
from mi.api.errors import ApiError

__all__ = [
    "BackendUnavailable",
    "GenerationOutput",
    "InvalidRequest",
    "MIError",
    "Model",
    "ServerError",
]


class MIError(Exception):
    """Base class of every error the SDK raises."""


class BackendUnavailable(MIError):
    """The backend cannot be reached (not running, wrong endpoint, starting or stopping)."""


class InvalidRequest(MIError):
    """The backend refused the request (HTTP 4xx); `param` names the offending field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class ServerError(MIError):
    """The backend failed while serving a valid request (HTTP 5xx or a malformed answer)."""


@dataclass(frozen=True)
class GenerationOutput:
    prompt_ids: list[int]  # the prompt as the model saw it (BOS included for a text prompt)
    ids: list[int]  # the generated tokens only
    text: str  # the generated text (stop strings excluded)
    finish_reason: str  # "stop" | "length" | "abort"


Prompts = str | list[str] | list[int] | list[list[int]]


class Model:
    """A served model, reached at `endpoint` (e.g. "http://localhost:12222").

    `timeout` bounds one `generate` call in seconds. Nothing is contacted until first use.
    """

    def __init__(self, endpoint: str, timeout: float = 600) -> None:
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http:// URL, got {endpoint!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.endpoint = endpoint.rstrip("/")
        self.timeout = float(timeout)
        self._tokenizer = None
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Model(endpoint={self.endpoint!r})"

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompts,
        do_sample: bool = True,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> list[GenerationOutput]:
        """Complete each prompt; one output per prompt, in order (a single prompt gives a list of one).

        A prompt is a string (tokenized by the backend, BOS added) or a list of token ids (used
        as given). `do_sample=False` is greedy decoding (temperature 0).
        """
        return _run_sync(
            self.agenerate(prompts, do_sample, max_new_tokens, temperature, top_p, top_k, stop, seed)
        )

    async def agenerate(
        self,
        prompts: Prompts,
        do_sample: bool = True,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> list[GenerationOutput]:
        """`generate` for code that already runs an event loop."""
        reqs = [
            GenerateRequest(
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_ids=None if isinstance(prompt, str) else tuple(prompt),
                max_tokens=max_new_tokens,
                temperature=float(temperature) if do_sample else 0.0,
                top_p=float(top_p),
                top_k=top_k,
                seed=seed,
                stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            )
            for prompt in _normalize_prompts(prompts)
        ]
        async with self._session() as session:
            results = await asyncio.gather(*(self._generate_one(session, req) for req in reqs))
        return [
            GenerationOutput(list(r.prompt_ids), list(r.ids), r.text, r.finish_reason)
            for r in results
        ]

    async def _generate_one(self, session: Any, req: GenerateRequest) -> GenerateResult:
        body = await self._call(session, "POST", "/v1/generate", req.to_json())
        try:
            return GenerateResult.from_json(body)
        except ApiError as err:
            raise ServerError(err.message) from None

    # -- model metadata ------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        """`GET /v1/model`: name, context length, vocabulary size, ... (fetched once)."""
        with self._lock:
            if self._info is None:
                body = _run_sync(self._get("/v1/model"))
                try:
                    self._info = ModelInfo.from_json(body)
                except ApiError as err:
                    raise ServerError(err.message) from None
            return self._info

    @property
    def tokenizer(self):
        """The served model's Hugging Face tokenizer, fetched from the backend on first use."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _load_tokenizer(_run_sync(self._get("/v1/tokenizer")))
            return self._tokenizer

    def health(self) -> bool:
        """True when the backend answers `/health` with 200."""
        try:
            _run_sync(self._get("/health"))
        except MIError:
            return False
        return True

    # -- HTTP ----------------------------------------------------------------------------------

    def _session(self):
        import aiohttp

        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(10.0, self.timeout)),
        )

    async def _get(self, path: str) -> Any:
        async with self._session() as session:
            return await self._call(session, "GET", path, None)

    async def _call(self, session: Any, method: str, path: str, body: dict | None) -> Any:
        import aiohttp
        import orjson

        data = None if body is None else orjson.dumps(body)
        headers = None if body is None else {"Content-Type": "application/json"}
        try:
            async with session.request(method, self.endpoint + path, data=data, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise ServerError(f"No answer from {self.endpoint} within {self.timeout:g} s.") from None
        except aiohttp.ClientConnectionError as exc:
            raise BackendUnavailable(
                f"Cannot connect to the backend at {self.endpoint} ({exc.__class__.__name__}). "
                "Check that mi-backend is running and listening on that port."
            ) from None
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if status == 200 and obj is not None:
            return obj
        err = ApiError.from_body(status, obj)
        if status == 503:
            raise BackendUnavailable(f"The backend at {self.endpoint} is not ready: {err.message}")
        if 400 <= status < 500:
            raise InvalidRequest(err.message, status, err.param, err.code)
        raise ServerError(f"The backend failed (HTTP {status}): {err.message}")


def _normalize_prompts(prompts: Prompts) -> list[str | list[int]]:
    """One entry per prompt; raise TypeError/ValueError on anything else."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a str, a list of str, a list of token ids or a list of such lists")
    if all(_is_int(p) for p in prompts):
        return [list(prompts)]
    normalized = []
    for prompt in prompts:
        if isinstance(prompt, str):
            normalized.append(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(_is_int(i) for i in prompt):
            normalized.append(list(prompt))
        else:
            raise TypeError(f"each prompt must be a str or a non-empty list of token ids, got {prompt!r:.80}")
    return normalized


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _run_sync(coro):
    """Run `coro` to completion from synchronous code, also when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # NOTE: asyncio.run refuses to nest; a helper thread gets its own loop (e.g. in Jupyter).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _load_tokenizer(body: Any):
    """Write the backend's tokenizer files to a private temp dir and load them (no remote code)."""
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict) or not files:
        raise ServerError("The backend sent no tokenizer files.")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mi-tokenizer-") as tmp:
        for name, text in files.items():
            # NOTE: names come from the network: plain file names only, nothing outside tmp.
            if not isinstance(name, str) or not isinstance(text, str) or name != os.path.basename(name) \
                    or name.startswith(".") or not name:
                raise ServerError(f"The backend sent an invalid tokenizer file name: {name!r:.80}")
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
