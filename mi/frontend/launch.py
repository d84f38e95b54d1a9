"""`mi-frontend` / `python -m mi.frontend.launch`: parse flags, install uvloop, serve.

    python -m mi.frontend.launch --backend 12222 --server-port 13000 [--host 127.0.0.1]

Prints `frontend start at http://HOST:PORT` once listening; SIGTERM or SIGINT drains (see
--drain-timeout) and exits 0, a second one at once. A backend
cert file that must not be used (empty, unreadable, open to others: `mi.auth.check_cert`) is a
one-line error at start, exit 2; an absent one is fine (the backend creates it).
Environment (read once, by `mi.config.read_environment`): MI_API_KEY (the default of
--api-key), MI_CERT (the default of --backend-cert).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from mi.actors.frontend.app import FrontendConfig, serve
from mi.api.openai_common import Limits
from mi.auth import CertError, check_cert
from mi.config import Environment, cert_path, parse_bytes, read_environment


def _chat_template(value: str | None) -> str | None:
    """A file holding a Jinja chat template, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template: no such file, and not a Jinja template: {value!r}")
    return value


def _origins(values: list[str]) -> tuple[str, ...]:
    return tuple(o.strip() for value in values for o in value.split(",") if o.strip())


def build_parser(env: Environment) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mi-frontend", description="OpenAI-compatible HTTP frontend for an mi backend."
    )
    p.add_argument(
        "--backend",
        required=True,
        help="backend PORT (local: its unix socket when present, else 127.0.0.1:PORT) or HOST:PORT",
    )
    p.add_argument("--server-port", type=int, default=13000, help="port to serve on (13000)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (127.0.0.1; a public address must be given explicitly)",
    )
    p.add_argument(
        "--api-key",
        default=env.api_key,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $MI_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="model names clients may use (aliases; the first is reported by default); "
        "default: the backend's model name",
    )
    p.add_argument(
        "--allowed-origins",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="CORS: origins allowed to call the API from a browser ('*' for any; comma lists ok)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="Jinja chat template (a file, or the template text) replacing the tokenizer's",
    )
    p.add_argument(
        "--backend-cert",
        default=None,
        help="the backend's shared-secret file (default: $MI_CERT or ~/.mi/cert)",
    )
    p.add_argument("--max-body-bytes", default="2MiB", help="largest accepted request body (2MiB)")
    p.add_argument("--max-n", type=int, default=Limits.max_n, help="most choices per prompt (n)")
    p.add_argument(
        "--max-choices",
        "--max-prompts",
        type=int,
        default=Limits.max_choices,
        help="most choices (prompts x n) in one request",
    )
    p.add_argument("--max-stop", type=int, default=Limits.max_stop, help="most stop strings per request")
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=Limits.max_logprobs,
        help="most logprobs / top_logprobs per position (at most 20)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="most tokens one choice may generate (default: what the context leaves)",
    )
    p.add_argument(
        "--drain-timeout",
        "--shutdown-timeout",
        type=float,
        default=FrontendConfig.drain_timeout,
        help="on SIGTERM/SIGINT, seconds requests in flight may run on (/health and new requests "
        "get 503 at once) before they end with an error; a second signal stops at once",
    )
    p.add_argument(
        "--backend-read-timeout",
        type=float,
        default=FrontendConfig.backend_read_timeout,
        help="seconds to wait for the backend's next bytes (a stream's next line) before the "
        "request fails with HTTP 504 backend_timeout and is aborted; keep it above the backend's "
        "--step-timeout and its longest prefill; 0: wait forever",
    )
    return p


def parse_args(argv: list[str] | None) -> FrontendConfig:
    try:
        env = read_environment()
    except ValueError as exc:
        print(f"mi-frontend: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    parser = build_parser(env)
    args = parser.parse_args(argv)
    try:
        return FrontendConfig(
            backend=args.backend,
            host=args.host,
            port=args.server_port,
            api_key=args.api_key,
            served_model_names=tuple(args.served_model_name),
            allowed_origins=_origins(args.allowed_origins),
            chat_template=_chat_template(args.chat_template),
            backend_cert=cert_path(args.backend_cert, env),
            max_body_bytes=parse_bytes(args.max_body_bytes),
            limits=Limits(
                max_n=args.max_n,
                max_choices=args.max_choices,
                max_stop=args.max_stop,
                max_logprobs=args.max_logprobs,
                max_tokens=args.max_tokens,
            ),
            drain_timeout=args.drain_timeout,
            backend_read_timeout=args.backend_read_timeout,
        )
    except (ValueError, OSError) as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        for warning in check_cert(config.backend_cert):
            print(f"mi-frontend: warning: {warning}", file=sys.stderr, flush=True)
    except CertError as exc:
        print(f"mi-frontend: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(config))
        else:
            asyncio.run(serve(config))
    except OSError as exc:  # e.g. the port is taken
        print(
            f"mi-frontend: cannot serve on {config.host}:{config.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
