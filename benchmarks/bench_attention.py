"""CPU paged attention: the padded single box (before issue 9) against the grouped plan, per call.

    python benchmarks/bench_attention.py [--rounds 30] [--budget 3] [--threads 2] [--forward]
                                         [--skip-old-prefill] [--decode-kernels]

One attention layer of the 125M Llama shape (12 query / 4 KV heads, head dim 64, float32, the
backend's default block size 16, blocks handed out in a random order), on mixed steps:

  - "old": a copy of the reference as it was, one [B, max q, max L] box with a boolean mask;
  - "new": mi.ops.attention.paged_attention with the step's plan built beforehand, as the worker
    does once per step (the plan's build time is printed apart: it is paid once, not per layer);
  - "ideal": the new code on each homogeneous group of the step run alone, summed (what the
    step would cost if mixing added nothing).

The variants of a step are called in turn, round after round, and the best call of each is
kept (on a shared machine the minimum is the stablest figure); prints old / new and new / ideal.
The "plan" column is the time to build the step's plan (numpy), paid once per step.

With --forward, also the whole forward pass of the 125M model (random weights, oneDNN-packed
linear layers, all 12 layers over the same cache) on three of the steps, old vs new attention.
"""

import argparse
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from mi.models import llama
from mi.models.parallel import TensorParallel
from mi.ops import rotary_cos_sin
from mi.ops.attention import AttentionMetadata, _decode_by_matmul, paged_attention
from mi.ops.attention_plan import build_plan

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 12, 4, 64, 16

# name: groups, each [(cached_len, query_len)] of sequences that belong together
CASES = {
    "32 decodes at L=512": [[(511, 1)] * 32],
    "256 chunk (L=512) + 31 decodes at L=512": [[(256, 256)], [(511, 1)] * 31],
    "2048 prefill + 31 decodes at L=64": [[(0, 2048)], [(63, 1)] * 31],
    "2048 decode + 31 decodes at L=64": [[(2047, 1)], [(63, 1)] * 31],
    "decodes at L=16..2048 (32, log-spaced)": [[(int(n) - 1, 1) for n in np.geomspace(16, 2048, 32)]],
    "batch-1 decode at L=128": [[(127, 1)]],
    "batch-1 decode at L=1024": [[(1023, 1)]],
}


def old_paged_attention(q, k_cache, v_cache, meta, scale):
    """The reference before the plan (commit cb4fc40), kept as the baseline."""
    num_seqs = meta.seq_lens.shape[0]
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    num_blocks = -(-meta.max_seq_len // block_size)
    key_len = num_blocks * block_size
    tables = meta.block_tables[:, :num_blocks]
    keys = k_cache[tables].view(num_seqs, key_len, num_kv_heads, head_dim)
    values = v_cache[tables].view(num_seqs, key_len, num_kv_heads, head_dim)
    padded_q = q.new_zeros(num_seqs, meta.max_query_len, num_heads, head_dim)
    padded_q[meta.token_seq_idx, meta.token_query_idx] = q
    query_pos = torch.zeros(num_seqs, meta.max_query_len, dtype=torch.int64, device=q.device)
    query_pos[meta.token_seq_idx, meta.token_query_idx] = meta.positions
    key_pos = torch.arange(key_len, device=q.device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (
        key_pos[None, None, :] < meta.seq_lens[:, None, None]
    )
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, :, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    return out.transpose(1, 2)[meta.token_seq_idx, meta.token_query_idx]


def make_step(specs, gen):
    """q, k_cache, v_cache, meta (with its plan) for sequences [(cached_len, query_len)]."""
    query_lens = np.array([new for _, new in specs])
    seq_lens = np.array([cached + new for cached, new in specs])
    blocks_per_seq = -(-seq_lens // BLOCK_SIZE)
    num_blocks = int(blocks_per_seq.sum())
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(cache_shape, generator=gen), torch.randn(cache_shape, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).numpy()
    tables = np.zeros((len(specs), blocks_per_seq.max()), dtype=np.int64)
    starts = np.cumsum(blocks_per_seq) - blocks_per_seq
    for row, (start, count) in enumerate(zip(starts, blocks_per_seq)):
        tables[row, :count] = order[start : start + count]
    seq_idx = np.repeat(np.arange(len(specs)), query_lens)
    query_idx = np.arange(query_lens.sum()) - np.repeat(np.cumsum(query_lens) - query_lens, query_lens)
    positions = (seq_lens - query_lens)[seq_idx] + query_idx
    slots = tables[seq_idx, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    t = torch.from_numpy
    meta = AttentionMetadata(
        slot_mapping=t(slots),
        block_tables=t(tables),
        seq_lens=t(seq_lens),
        token_seq_idx=t(seq_idx),
        token_query_idx=t(query_idx),
        positions=t(positions),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )
    plan_args = (query_lens, seq_lens, tables, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, torch.float32)
    q = torch.randn(len(positions), NUM_HEADS, HEAD_DIM, generator=gen)
    return q, k_cache, v_cache, meta, plan_args


def best_ms(fns: dict, rounds: int, budget_s: float) -> dict:
    """Best time of each callable in ms, calling them in turn (round-robin, so that a burst of
    load from elsewhere hits all of them alike) for `rounds` rounds or `budget_s` seconds."""
    best = dict.fromkeys(fns, float("inf"))
    deadline = time.perf_counter() + budget_s
    for fn in fns.values():
        fn()  # warm-up
    for round_ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
        if round_ >= 2 and time.perf_counter() > deadline:
            break
    return best


def with_plan(meta, plan_args) -> AttentionMetadata:
    return AttentionMetadata(**{**meta.__dict__, "plan": build_plan(*plan_args)})


def time_step(name: str, groups: list, gen, args) -> None:
    scale = HEAD_DIM**-0.5
    q, k_cache, v_cache, meta, plan_args = make_step([s for g in groups for s in g], gen)
    fns = {
        "new": partial(paged_attention, q, k_cache, v_cache, with_plan(meta, plan_args), scale),
        "plan": partial(build_plan, *plan_args),
    }
    for i, group in enumerate(groups):
        gq, gk, gv, gmeta, gargs = make_step(group, gen)
        fns[i] = partial(paged_attention, gq, gk, gv, with_plan(gmeta, gargs), scale)
    old_fn = partial(old_paged_attention, q, k_cache, v_cache, meta, scale)
    # The old code pads every row to the longest query: on the 2048 prefill a call takes seconds,
    # so it is timed once, apart.
    is_slow = meta.max_query_len * meta.max_seq_len * meta.seq_lens.shape[0] > 2**24
    skip_old = is_slow and args.skip_old_prefill
    if not is_slow:
        fns["old"] = old_fn
    best = best_ms(fns, args.rounds, args.budget)
    if is_slow:
        best["old"] = float("nan") if skip_old else best_ms({"old": old_fn}, 1, 0)["old"]
    expected = paged_attention(q, k_cache, v_cache, meta, scale) if skip_old else old_fn()
    torch.testing.assert_close(fns["new"](), expected, atol=1e-5, rtol=1e-5)
    old, new, plan = best["old"], best["new"], best["plan"]
    ideal = sum(best[i] for i in range(len(groups)))
    print(f"{name:42s} {old:9.2f} {new:8.2f} {ideal:8.2f} {old / new:8.1f} {new / ideal:9.2f} {plan:6.2f}")


FORWARD_CASES = ["32 decodes at L=512", "256 chunk (L=512) + 31 decodes at L=512", "batch-1 decode at L=1024"]


def forward_with(model, ids, caches, cos_sin, attention, meta) -> None:
    llama.paged_attention = attention  # the model's (dispatching) op, swapped for this call
    model(ids, caches, meta, cos_sin)


def forward_passes(gen, rounds: int, budget_s: float) -> None:
    cfg = llama.ModelConfig(
        vocab_size=32000,
        padded_vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attention_bias=False,
        qk_norm=False,
    )
    torch.manual_seed(0)
    model = llama.CausalLM(cfg, TensorParallel()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.pack_for_cpu()
    cos_sin = rotary_cos_sin(cfg.head_dim, 4096, cfg.rope_theta)
    print(f"\n## whole forward pass, {cfg.num_hidden_layers} layers of the 125M model, ms per step")
    print(f"{'step':42s} {'old':>9s} {'new':>8s} {'old/new':>8s}")
    dispatched = llama.paged_attention
    for name in FORWARD_CASES:
        q, k_cache, v_cache, meta, plan_args = make_step([s for g in CASES[name] for s in g], gen)
        ids = torch.randint(0, cfg.vocab_size, (q.shape[0],), generator=gen)
        step = partial(forward_with, model, ids, [(k_cache, v_cache)] * cfg.num_hidden_layers, cos_sin)
        variants = {
            "old": partial(step, old_paged_attention, meta),
            "new": partial(step, dispatched, with_plan(meta, plan_args)),
        }
        best = best_ms(variants, rounds, budget_s)
        print(f"{name:42s} {best['old']:9.1f} {best['new']:8.1f} {best['old'] / best['new']:8.2f}")
    llama.paged_attention = dispatched


def decode_kernels(gen, rounds: int, budget_s: float) -> None:
    """One decode box's kernel alone, on keys already gathered head-major: CPU SDPA against the
    batched matmul that paged_attention uses from DECODE_MATMUL_MIN_SEQS sequences up."""
    print(f"\n{'decode box (gathered keys)':42s} {'sdpa':>9s} {'matmul':>8s} {'sdpa/mm':>8s}")
    for max_len in (64, 256, 1024):
        for num_seqs in (1, 2, 4, 8, 16, 32, 64):
            q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, generator=gen)
            keys, values = (
                torch.randn(num_seqs, NUM_KV_HEADS, max_len, HEAD_DIM, generator=gen) for _ in "kv"
            )
            mask = torch.zeros(num_seqs, 1, 1, max_len)
            variants = {
                "sdpa": partial(
                    F.scaled_dot_product_attention,
                    q[:, :, None],
                    keys,
                    values,
                    attn_mask=mask,
                    scale=HEAD_DIM**-0.5,
                    enable_gqa=True,
                ),
                "matmul": partial(_decode_by_matmul, q, keys, values, mask, HEAD_DIM**-0.5),
            }
            best = best_ms(variants, rounds, budget_s)
            name = f"{num_seqs} decodes at L={max_len}"
            print(
                f"{name:42s} {best['sdpa']:9.3f} {best['matmul']:8.3f} {best['sdpa'] / best['matmul']:8.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30, help="calls of each variant at most (best is kept)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per step before stopping early")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forward", action="store_true", help="also time the whole 125M forward pass")
    parser.add_argument("--decode-kernels", action="store_true", help="also SDPA vs matmul on decode boxes")
    parser.add_argument(
        "--skip-old-prefill", action="store_true", help="skip the old code on the 2048 prefill (~10 s a call)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, H={NUM_HEADS} K={NUM_KV_HEADS} "
        f"D={HEAD_DIM} block_size={BLOCK_SIZE}; best of up to {args.rounds} calls, ms per call"
    )
    print(
        f"{'step':42s} {'old':>9s} {'new':>8s} {'ideal':>8s} {'old/new':>8s} {'new/ideal':>9s} {'plan':>6s}"
    )
    with torch.inference_mode():
        for name, groups in CASES.items():
            time_step(name, groups, gen, args)
        if args.forward:
            forward_passes(gen, min(args.rounds, 8), args.budget * 3)
        if args.decode_kernels:
            decode_kernels(gen, args.rounds, args.budget / 3)


if __name__ == "__main__":
    main()
