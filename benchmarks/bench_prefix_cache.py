"""Time to first token of a repeated long prompt, with and without prefix caching.

    python benchmarks/bench_prefix_cache.py [--prompt-tokens 1500]

Serves the ~104M-parameter random Llama of bench_tp.py (tp=1) twice: with prefix caching (the
default) and with --no-prefix-caching. Each time it sends the same long prompt three times, one
after another, and prints each request's time to first token and the cached tokens it reports.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_tp import MODEL_100M  # noqa: E402

from servers import backend_headers, start_backend  # noqa: E402


async def ttft(port: int, prompt_ids: list[int]) -> tuple[float, int]:
    body = {"prompt_ids": prompt_ids, "max_tokens": 2, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        start = time.perf_counter()
        first = None
        async with session.post(f"http://127.0.0.1:{port}/v1/generate", json=body) as resp:
            async for line in resp.content:
                event = orjson.loads(line)
                if event.get("ids") and first is None:
                    first = time.perf_counter() - start
                if event.get("usage"):
                    return first, event["usage"]["cached_tokens"]
    raise RuntimeError("stream ended without usage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    args = parser.parse_args()

    from mi.convert import convert
    from mi.models.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="mi-bench-prefix-"))
    hf_dir = build_tiny_model(root / "hf", arch="llama", overrides=MODEL_100M)
    mi_dir = convert(hf_dir, root / "mi", tp=1, progress=False)
    prompt_ids = [(7 * i) % 480 + 10 for i in range(args.prompt_tokens)]
    print(f"~104M Llama, float32, prompt of {args.prompt_tokens} tokens sent 3 times in a row")
    print(f"{'prefix caching':>15} {'request':>8} {'TTFT ms':>9} {'cached tokens':>14}")
    for flags in ([], ["--no-prefix-caching"]):
        backend, port = start_backend(mi_dir, *flags)
        try:
            for i in range(3):
                seconds, cached = asyncio.run(ttft(port, prompt_ids))
                print(f"{'off' if flags else 'on':>15} {i + 1:>8} {seconds * 1e3:>9.1f} {cached:>14}")
        finally:
            backend.stop()


if __name__ == "__main__":
    main()
