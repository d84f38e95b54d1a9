"""Linear layers on CPU: torch's nn.Linear against oneDNN-packed weights, side by side in one run.

    python benchmarks/bench_cpu_linear.py [--rows 1 2 4 8 16 32 128] [--layers 12] [--mixed-steps 300]

1. One projection at a time, for the matrices of the 125M Llama shape (hidden 768, 12 query / 4
   KV heads, intermediate 2048, vocabulary 32000): `--layers` distinct copies are cycled so every
   call reads its weight from memory, not from cache, as in a forward pass. Prints GB/s of weight
   streamed and the packed / torch speed ratio per row count.
2. The whole forward pass of that model (random weights, one decode token per row at context 160,
   the reference paged attention), both ways, in tokens per second.
3. `--mixed-steps N`: N steps of random row counts (1 to 600, as a server's steps are) through
   the five projections, oneDNN called with the exact row count against the bucketed count
   PackedLinear uses, each in a fresh process: seconds and peak RSS (oneDNN keeps one primitive
   per row count).
"""

import argparse
import multiprocessing
import random
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from mi.models.llama import CausalLM, ModelConfig
from mi.models.parallel import TensorParallel
from mi.models.tiny import tiny_config
from mi.ops import AttentionMetadata, rotary_cos_sin
from mi.ops.cpu_linear import PackedLinear


def bench_125m_config() -> ModelConfig:
    """The model `python -m mi.models.tiny --size bench-125m` builds, as the worker sees it."""
    hf = tiny_config("llama", "bench-125m")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        padded_vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=hf.rope_parameters["rope_theta"],
        rope_scaling=None,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=hf.tie_word_embeddings,
        attention_bias=hf.attention_bias,
        qk_norm=False,
    )


BENCH_125M = bench_125m_config()
_QKV_ROWS = (BENCH_125M.num_attention_heads + 2 * BENCH_125M.num_key_value_heads) * BENCH_125M.head_dim
SHAPES = {  # [out, in] of each projection
    "qkv_proj": (_QKV_ROWS, BENCH_125M.hidden_size),
    "o_proj": (BENCH_125M.hidden_size, BENCH_125M.num_attention_heads * BENCH_125M.head_dim),
    "gate_up_proj": (2 * BENCH_125M.intermediate_size, BENCH_125M.hidden_size),
    "down_proj": (BENCH_125M.hidden_size, BENCH_125M.intermediate_size),
}
HEAD = (BENCH_125M.vocab_size, BENCH_125M.hidden_size)


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def projections(rows_list: list[int], num_copies: int, repeats: int) -> None:
    print(f"## one projection, weights cycled over {num_copies} copies (GB/s of weight read)")
    print(f"{'matrix':14s} {'MB':>6s} " + " ".join(f"{f'rows={m}':>20s}" for m in rows_list))
    for name, (out_dim, in_dim) in {**SHAPES, "lm_head": HEAD}.items():
        copies = num_copies if name != "lm_head" else 2
        weights = [torch.randn(out_dim, in_dim) for _ in range(copies)]
        packed = [PackedLinear(w, None) for w in weights]
        megabytes = out_dim * in_dim * 4 / 1e6
        cells = []
        for rows in rows_list:
            x = torch.randn(rows, in_dim)
            plain = median_seconds(lambda x=x, ws=weights: [F.linear(x, w) for w in ws], repeats) / copies
            fast = median_seconds(lambda x=x, ps=packed: [p(x) for p in ps], repeats) / copies
            cells.append(
                f"{megabytes / 1e3 / plain:5.1f}→{megabytes / 1e3 / fast:5.1f} ({plain / fast:4.2f}×)"
            )
        print(f"{name:14s} {megabytes:6.1f} " + " ".join(f"{c:>20s}" for c in cells))


def forward_passes(rows_list: list[int], repeats: int) -> None:
    cfg = BENCH_125M
    torch.manual_seed(0)
    model = CausalLM(cfg, TensorParallel()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    block_size, context = 16, 160
    blocks_per_seq = context // block_size
    num_blocks = max(rows_list) * blocks_per_seq
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    cos_sin = rotary_cos_sin(cfg.head_dim, 2048, cfg.rope_theta)

    def step(rows: int) -> None:
        tables = torch.arange(rows * blocks_per_seq).view(rows, blocks_per_seq)
        meta = AttentionMetadata(
            slot_mapping=tables[:, -1] * block_size + block_size - 1,
            block_tables=tables,
            seq_lens=torch.full((rows,), context),
            token_seq_idx=torch.arange(rows),
            token_query_idx=torch.zeros(rows, dtype=torch.int64),
            positions=torch.full((rows,), context - 1),
            max_query_len=1,
            max_seq_len=context,
        )
        with torch.inference_mode():
            model.compute_logits(model(torch.randint(0, cfg.vocab_size, (rows,)), caches, meta, cos_sin))

    plain = {rows: rows / median_seconds(lambda rows=rows: step(rows), repeats) for rows in rows_list}
    model.pack_for_cpu()
    packed = {rows: rows / median_seconds(lambda rows=rows: step(rows), repeats) for rows in rows_list}
    print("\n## forward pass of the 125M shape, decode tokens/s (one token per row, context 160)")
    print(f"{'rows':>5s} {'nn.Linear':>10s} {'oneDNN':>10s} {'ratio':>6s}")
    for rows in rows_list:
        print(f"{rows:5d} {plain[rows]:10.1f} {packed[rows]:10.1f} {packed[rows] / plain[rows]:5.2f}×")


def _mixed_row_counts(exact: bool, steps: int, results) -> None:
    torch.set_num_threads(results["threads"])
    layers = [PackedLinear(torch.randn(*shape), None) for shape in SHAPES.values()]
    head = PackedLinear(torch.randn(*HEAD), None)
    rng = random.Random(0)
    rows_list = [rng.randint(1, 600) for _ in range(steps)]
    sequences_list = [rng.randint(1, 32) for _ in range(steps)]  # the head sees one row a sequence
    start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for rows, sequences in zip(rows_list, sequences_list):
        for layer in (*layers, head):
            x = torch.randn(rows if layer is not head else sequences, layer.in_features)
            if exact:
                torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, None, "none", [], "")
            else:
                layer(x)
    results["seconds"] = time.perf_counter() - start
    results["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb) / 1024
    results["distinct"] = len(set(rows_list))


def mixed_row_counts(steps: int) -> None:
    print(f"\n## {steps} steps of random row counts (1-600; 1-32 for the LM head), fresh process each way")
    context = multiprocessing.get_context("spawn")
    figures = {}
    for exact in (True, False):
        with context.Manager() as manager:
            results = manager.dict(threads=torch.get_num_threads())
            child = context.Process(target=_mixed_row_counts, args=(exact, steps, results))
            child.start()
            child.join()
            figures[exact] = dict(results)
    print(f"{figures[True]['distinct']} distinct row counts")
    print(f"{'oneDNN called with':>22s} {'seconds':>8s} {'peak RSS growth, MB':>20s}")
    for exact, label in ((True, "exact row count"), (False, "bucketed (row_bucket)")):
        print(f"{label:>22s} {figures[exact]['seconds']:8.1f} {figures[exact]['rss_growth_mb']:20.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 128])
    parser.add_argument("--layers", type=int, default=12, help="distinct weight copies per matrix")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--mixed-steps", type=int, default=0, help="run only part 3, with this many steps")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.mixed_steps:
        mixed_row_counts(args.mixed_steps)
        return
    projections(args.rows, args.layers, args.repeats)
    forward_passes([r for r in args.rows if r <= 32], args.repeats)


if __name__ == "__main__":
    main()
