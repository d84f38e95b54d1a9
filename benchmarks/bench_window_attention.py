"""Sliding-window attention on CPU: a windowed layer's cost follows the window, not the sequence.

    python benchmarks/bench_window_attention.py [--keys 4096] [--window 256] [--rounds 30] [--threads 2]

One attention layer of the 125M Llama shape (12 query / 4 KV heads, head dim 64, float32, block
size 16) on two steps over sequences of `--keys` keys: a decode of 8 sequences, and a 256-token
chunk of one sequence beside 7 decodes. Each step runs with full attention and with a window of
`--window` keys, the step's plan built first as the worker does (its build time included: paid
once per step, not per layer); calls alternate round after round and the best of each is kept.
Before the window started each box at its first visible key (issue 11), a windowed layer cost
what full attention costs; the ratio column is that saving.
"""

import argparse
import time

import numpy as np
import torch

from mi.ops.attention import AttentionMetadata, paged_attention
from mi.ops.attention_plan import build_plan

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 12, 4, 64, 16


def make_step(specs, rng):
    """specs [(cached_len, query_len)] -> (q, k_cache, v_cache, meta, query_lens, seq_lens, tables)."""
    seq_lens = np.array([c + n for c, n in specs])
    query_lens = np.array([n for _, n in specs])
    blocks = -(-seq_lens // BLOCK_SIZE)
    order = rng.permutation(int(blocks.sum())) + 1
    width = int(blocks.max())
    tables = np.zeros((len(specs), width), dtype=np.int64)
    offset = 0
    for i, count in enumerate(blocks):
        tables[i, :count] = order[offset : offset + count]
        offset += count
    shape = (int(blocks.sum()) + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    seq_idx = np.repeat(np.arange(len(specs)), query_lens)
    positions = (seq_lens - query_lens)[seq_idx] + np.concatenate([np.arange(n) for n in query_lens])
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=t(tables[seq_idx, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE),
        block_tables=t(tables),
        seq_lens=t(seq_lens),
        token_seq_idx=t(seq_idx),
        token_query_idx=t(positions - (seq_lens - query_lens)[seq_idx]),
        positions=t(positions),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )
    q = torch.randn(len(positions), NUM_HEADS, HEAD_DIM)
    return q, k_cache, v_cache, meta, query_lens, seq_lens, tables


def call(step, window) -> float:
    q, k_cache, v_cache, meta, query_lens, seq_lens, tables = step
    start = time.perf_counter()
    plan = build_plan(
        query_lens, seq_lens, tables, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, torch.float32, window=window
    )
    meta = AttentionMetadata(**{**meta.__dict__, "plan": plan, "window_plan": plan})
    paged_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5, window)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    steps = {
        "decode x8": [(args.keys - 1, 1)] * 8,
        "chunk 256 + decode x7": [(args.keys - 256, 256)] + [(args.keys - 1, 1)] * 7,
    }
    print(f"keys {args.keys}, window {args.window}, best of {args.rounds} rounds, {args.threads} threads")
    print(f"{'step':<24}{'full ms':>10}{'window ms':>11}{'full / window':>15}")
    for name, specs in steps.items():
        step = make_step(specs, rng)
        best = {None: float("inf"), args.window: float("inf")}
        for _ in range(args.rounds):
            for window in best:
                best[window] = min(best[window], call(step, window))
        full, windowed = best[None] * 1e3, best[args.window] * 1e3
        print(f"{name:<24}{full:>10.2f}{windowed:>11.2f}{full / windowed:>14.1f}x")


if __name__ == "__main__":
    main()
