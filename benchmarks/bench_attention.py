"""The reference paged attention on CPU: one padded box per step against the per-step plan of
groups (mi/ops/attention.py), side by side in one run.

    python benchmarks/bench_attention.py [--repeats 11]

12 query / 4 KV heads, head_dim 64, block_size 16 (the 125M Llama shape), float32. For each step
shape, ms per call of: one box for the whole step (the pre-plan reference), the planned groups,
and "apart": every sequence run alone with the plan, summed (the cost of the work itself,
without padding, plus one call per sequence).
"""

import argparse
import statistics
import time

import numpy as np
import torch

from mi.ops.attention import AttentionMetadata, paged_attention, plan_attention_groups

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 4, 64, 16
STEPS = {
    "32 decodes at L=512": ([1] * 32, [512] * 32),
    "256-token chunk (L=768) + 31 decodes at L=512": ([256] + [1] * 31, [768] + [512] * 31),
    "one 2048 context + 31 decodes at L=64": ([1] * 32, [2048] + [64] * 31),
    "32 decodes, L spread 16..512": ([1] * 32, list(range(16, 528, 16))),
    "batch-1 decode at L=128": ([1], [128]),
    "batch-1 decode at L=1024": ([1], [1024]),
    "one 512-token prefill": ([512], [512]),
}


def metadata(query_lens, seq_lens, planned: bool) -> tuple[AttentionMetadata, int]:
    query_lens, seq_lens = np.asarray(query_lens, np.int64), np.asarray(seq_lens, np.int64)
    blocks = -(-seq_lens // BLOCK)
    tables = np.zeros((len(seq_lens), int(blocks.max())), np.int64)
    for b, n in enumerate(blocks):
        tables[b, :n] = np.arange(n) + blocks[:b].sum()
    num_tokens = int(query_lens.sum())
    token_seq_idx = np.repeat(np.arange(len(seq_lens)), query_lens)
    token_query_idx = np.arange(num_tokens) - (np.cumsum(query_lens) - query_lens)[token_seq_idx]
    positions = (seq_lens - query_lens)[token_seq_idx] + token_query_idx
    groups, order = None, None
    if planned:
        groups, order = plan_attention_groups(query_lens, seq_lens, tables, BLOCK, torch.device("cpu"))
    t = torch.from_numpy
    meta = AttentionMetadata(
        slot_mapping=t(tables[token_seq_idx, positions // BLOCK] * BLOCK + positions % BLOCK),
        block_tables=t(tables),
        seq_lens=t(seq_lens),
        token_seq_idx=t(token_seq_idx),
        token_query_idx=t(token_query_idx),
        positions=t(positions),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        groups=groups,
        group_order=order,
    )
    return meta, int(blocks.sum())


def ms_per_call(query_lens, seq_lens, planned: bool, repeats: int) -> float:
    meta, num_blocks = metadata(query_lens, seq_lens, planned)
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    q = torch.randn(int(sum(query_lens)), HEADS, HEAD_DIM)
    with torch.inference_mode():
        paged_attention(q, k_cache, v_cache, meta, 0.125)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            paged_attention(q, k_cache, v_cache, meta, 0.125)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (one layer)")
    print(f"{'step':48s} {'one box':>8s} {'planned':>8s} {'apart':>8s} {'box/planned':>12s}")
    for name, (query_lens, seq_lens) in STEPS.items():
        one_box = ms_per_call(query_lens, seq_lens, False, args.repeats)
        planned = ms_per_call(query_lens, seq_lens, True, args.repeats)
        apart = sum(ms_per_call([q], [s], True, args.repeats) for q, s in zip(query_lens, seq_lens))
        print(f"{name:48s} {one_box:8.2f} {planned:8.2f} {apart:8.2f} {one_box / planned:11.2f}×")


if __name__ == "__main__":
    main()
