"""Tensor parallelism on CPU: decode tokens/s of tp=1 vs tp=2 for a ~100M-parameter model.

    python benchmarks/bench_tp.py [--tokens 64] [--batch 1 16]

Builds a random-weight Llama of ~104M parameters (hidden 768, 12 layers, 12 heads, 4 KV heads,
intermediate 3072, the tiny tokenizer's 500-token vocabulary), converts it for tp=1 and tp=2,
and for each serves it with `mi-backend --device TP` and times greedy decoding (EOS ignored) of
`batch` concurrent streams, from each stream's first token to its last; tp=2 runs twice, with
the shared-memory collectives (the default) and with gloo. With MI_PROFILE=1 the workers report
the time spent inside all-reduce / all-gather, printed as a share of step time.
On a 2-core machine tp=2 gives each rank one core, tp=1 one process with two threads.
"""

import argparse
import asyncio
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_decode import _stream_backend, server_decode_rate  # noqa: E402

from servers import start_backend  # noqa: E402

MODEL_100M = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    intermediate_size=3072,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()

    from mi.convert import convert
    from mi.models.tiny import build_tiny_model

    os.environ["MI_PROFILE"] = "1"
    root = Path(tempfile.mkdtemp(prefix="mi-bench-tp-"))
    hf_dir = build_tiny_model(root / "hf", arch="llama", overrides=MODEL_100M)
    with safetensors.safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        num_params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    print(
        f"llama {num_params / 1e6:.0f}M parameters, float32, greedy, {args.tokens} tokens per "
        f"stream, {os.cpu_count()} cores"
    )
    print(
        f"{'tp':>3} {'collectives':>12} {'batch':>5} {'tok/s':>8} {'vs tp=1':>8} "
        f"{'collectives / step time':>24}"
    )
    baseline = {}
    for tp, flags in ((1, []), (2, []), (2, ["--gloo-collectives"])):
        mi_dir = convert(hf_dir, root / f"tp{tp}", tp=tp, progress=False, force=True)
        kind = "-" if tp == 1 else ("gloo" if flags else "shm")
        for batch in args.batch:
            backend, port = start_backend(mi_dir, "--device", str(tp), *flags)
            try:
                rate = asyncio.run(
                    server_decode_rate(_stream_backend, f"http://127.0.0.1:{port}", batch, args.tokens)
                )
            finally:
                backend.stop()
            shares = re.findall(r"in collectives \(([\d.]+)%\)", backend.output)
            share = f"{max(map(float, shares)):.1f}%" if shares and tp > 1 else "-"
            baseline.setdefault(batch, rate)
            print(f"{tp:>3} {kind:>12} {batch:>5} {rate:>8.1f} {rate / baseline[batch]:>8.2f} {share:>24}")


if __name__ == "__main__":
    main()
