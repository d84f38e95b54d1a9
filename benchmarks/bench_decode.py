"""Decode throughput of a tiny model: mi's server vs Hugging Face `generate`, in one run.

    python benchmarks/bench_decode.py [--arch llama] [--tokens 128] [--batch 1 8]

Builds the tiny random-weight model, converts it, starts a real mi-backend (and mi-frontend), and
times greedy decoding of `--tokens` tokens (EOS ignored) at each batch size:
  - HF: `model.generate` (float32, same weights, batch = copies of one prompt);
  - mi backend: that many concurrent streaming /v1/generate requests; decode rate is measured
    from each request's first token to its last, so prefill is excluded on both sides;
  - mi frontend: the same through the OpenAI /v1/completions SSE stream.
Prints the median tokens/s of --repeats runs and the ratio mi / HF.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import backend_headers, start_backend, start_frontend  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog"


def hf_decode_rate(hf_dir: Path, batch: int, tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tokenizer([PROMPT] * batch, return_tensors="pt").input_ids

    def run(n):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=tokenizer.pad_token_id,
            )
        return time.perf_counter() - start

    run(4)  # warm-up
    # Subtract a 1-token run so that prefill is excluded, as on the server side.
    elapsed = run(tokens) - run(1)
    return batch * (tokens - 1) / elapsed


async def _stream(session, url: str, tokens: int, is_token_line) -> tuple[float, float, int]:
    """(first token time, last token time, tokens) of one greedy streamed request."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    first = last = None
    count = 0
    async with session.post(url, json=body) as resp:
        async for line in resp.content:
            num_tokens = is_token_line(line)
            if num_tokens:
                last = time.perf_counter()
                first = first or last
                count += num_tokens
    return first, last, count


def _stream_backend(session, url, tokens):
    """The backend's NDJSON: each line lists its new token ids."""
    return _stream(
        session, url + "/v1/generate", tokens, lambda line: len(orjson.loads(line).get("ids") or ())
    )


def _stream_frontend(session, url, tokens):
    """The frontend's SSE: one chunk per token (a held-back piece may merge two)."""
    return _stream(session, url + "/v1/completions", tokens, lambda line: int(line.startswith(b"data: {")))


async def server_decode_rate(stream, url: str, batch: int, tokens: int) -> float:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        await stream(session, url, 4)  # warm-up
        results = await asyncio.gather(*(stream(session, url, tokens) for _ in range(batch)))
    first = min(r[0] for r in results)
    last = max(r[1] for r in results)
    # Each stream's first token is its prefill; count only the decoded ones.
    return sum(r[2] - 1 for r in results) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is shown")
    args = parser.parse_args()

    from mi.convert import convert
    from mi.models.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="mi-bench-"))
    hf_dir = build_tiny_model(root / "hf", arch=args.arch)
    mi_dir = convert(hf_dir, root / "mi", tp=1)
    backend, port = start_backend(mi_dir)
    frontend, url = start_frontend(port)
    try:
        print(
            f"tiny {args.arch}, greedy, {args.tokens} tokens per request, EOS ignored, "
            f"torch threads {torch.get_num_threads()}"
        )
        print(
            f"{'batch':>5} {'HF tok/s':>10} {'mi backend tok/s':>17} {'ratio':>6} "
            f"{'mi frontend tok/s':>18} {'ratio':>6}"
        )
        median = lambda run: statistics.median(run() for _ in range(args.repeats))  # noqa: E731
        for batch in args.batch:
            hf = median(lambda batch=batch: hf_decode_rate(hf_dir, batch, args.tokens))
            be = median(
                lambda batch=batch: asyncio.run(
                    server_decode_rate(_stream_backend, f"http://127.0.0.1:{port}", batch, args.tokens)
                )
            )
            fe = median(
                lambda batch=batch: asyncio.run(server_decode_rate(_stream_frontend, url, batch, args.tokens))
            )
            print(f"{batch:>5} {hf:>10.0f} {be:>17.0f} {be / hf:>6.2f} {fe:>18.0f} {fe / hf:>6.2f}")
    finally:
        frontend.stop()
        backend.stop()


if __name__ == "__main__":
    main()
