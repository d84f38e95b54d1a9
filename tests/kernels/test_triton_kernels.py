"""Triton kernels (mi/ops/triton_kernels) against the torch references (mi/ops), plus their
guards and the dispatch in mi/ops/dispatch.py.

Runs the kernels through the triton interpreter on CPU (TRITON_INTERPRET=1, set below unless the
environment sets it); with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on
the GPU. Triton fixes the mode of its own library when it is first imported, so when another
test module imported triton earlier in this pytest process (in the other mode), every test here
skips and `test_in_fresh_process` reruns this file in a fresh interpreter.

Inputs are fresh per case from a generator seeded per test; the seed is printed (shown on
failure) and MI_TEST_SEED reruns one. Preallocated outputs are filled with NaN before each call,
so an element the kernel fails to write fails the comparison.

Tolerances (|kernel - reference| <= atol + rtol * |reference|), the same for atol and rtol:
    elementwise ops (rms_norm, rotary, silu_and_mul): fp32 1e-5, fp16 2e-3, bf16 2e-2
    paged attention (p rounded to fp16/bf16 for P @ V): fp32 1e-5, fp16 4e-3, bf16 3e-2
KV-cache stores are copies and must match exactly.
"""

import os

# NOTE: triton decides interpreted vs compiled when a function is decorated: its own library
# (tl.sigmoid, ...) when triton is imported, ours when mi.ops.triton_kernels is. Set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import inspect  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402 - a declared dependency on Linux: missing, the tier fails
import triton.language as tl  # noqa: E402

import mi.ops.triton_kernels as K  # noqa: E402
from mi.config import read_environment  # noqa: E402
from mi.ops import activation, attention, dispatch, norm, rotary  # noqa: E402
from mi.ops.attention import AttentionMetadata  # noqa: E402
from mi.ops.triton_kernels import _guard  # noqa: E402

INTERPRET = bool(triton.knobs.runtime.interpret)
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
_OUR_KERNEL = sys.modules["mi.ops.triton_kernels.rms_norm"]._rms_norm_kernel
IN_PROCESS = all(_guard.is_compiled(fn) != INTERPRET for fn in (tl.sigmoid, _OUR_KERNEL))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ATTENTION_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _skip_if_triton_mode_is_stale(request):
    if not IN_PROCESS and request.function is not test_in_fresh_process:
        pytest.skip(
            "triton was imported in the other TRITON_INTERPRET mode before this module; "
            "test_in_fresh_process runs these tests"
        )


def test_in_fresh_process():
    if IN_PROCESS:
        pytest.skip("the kernel tests ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1" if INTERPRET else "0"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    # This test is the one skip there.
    assert re.match(r"\d+ passed, 1 skipped(, \d+ warnings?)? in ", summary), summary


@pytest.fixture
def gen():
    seed = int(os.environ.get("MI_TEST_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with MI_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, atol=tol[expected.dtype], rtol=tol[expected.dtype])


def qkv_views(gen, num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q [N, H, D], k, v [N, K, D] as the strided views Llama's attention splits off qkv_proj."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(gen, num_tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


# ---- rms_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 96), (4, 100), (2, 2, 3, 48), (1, 8)])
def test_rms_norm_matches_reference(gen, dtype, shape):
    x = randn(gen, *shape, dtype=dtype) * 3
    weight = randn(gen, shape[-1], dtype=dtype)
    out = K.rms_norm(x, weight, 1e-6, out=poisoned(shape, dtype))
    assert_close(out, norm.rms_norm(x, weight, 1e-6), ELEMENTWISE_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reads_strided_head_view(gen, dtype):
    """q/k norm (Qwen3) normalizes [N, H, D] views of the fused qkv output without a copy."""
    q, k, _ = qkv_views(gen, 6, 3, 1, 32, dtype)
    assert not q.is_contiguous() and not k.is_contiguous()
    weight = randn(gen, 32, dtype=dtype)
    for x in (q, k):
        out = K.rms_norm(x, weight, 1e-5, out=poisoned(x.shape, dtype))
        assert_close(out, norm.rms_norm(x, weight, 1e-5), ELEMENTWISE_TOL)


# ---- rotary ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,num_heads,num_kv_heads,head_dim", [(6, 4, 2, 64), (5, 3, 1, 48), (1, 8, 8, 16), (9, 6, 2, 20)]
)
def test_rotary_matches_reference(gen, dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    q, k, _ = qkv_views(gen, num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    q_before, k_before = q.clone(), k.clone()
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}
    cos_sin = rotary.rotary_cos_sin(head_dim, 128, 10000.0, scaling, device=DEVICE)
    positions = torch.randint(0, 128, (num_tokens,), generator=gen).to(DEVICE)
    out = (poisoned(q.shape, dtype), poisoned(k.shape, dtype))
    q_out, k_out = K.apply_rotary(q, k, positions, cos_sin, out=out)
    q_ref, k_ref = rotary.apply_rotary(q, k, positions, cos_sin)
    assert q_out is out[0] and k_out is out[1]
    assert_close(q_out, q_ref, ELEMENTWISE_TOL)
    assert_close(k_out, k_ref, ELEMENTWISE_TOL)
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs must not change"


# ---- silu_and_mul ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 128), (3, 200), (2, 3, 96), (1, 2)])
def test_silu_and_mul_matches_reference(gen, dtype, shape):
    gate_up = randn(gen, *shape, dtype=dtype) * 4
    out_shape = (*shape[:-1], shape[-1] // 2)
    out = K.silu_and_mul(gate_up, out=poisoned(out_shape, dtype))
    assert_close(out, activation.silu_and_mul(gate_up), ELEMENTWISE_TOL)


def test_silu_and_mul_large_row_spans_column_tiles(gen):
    gate_up = randn(gen, 2, 2 * 1500)  # 1500 > one 1024-wide tile
    out = K.silu_and_mul(gate_up, out=poisoned((2, 1500), torch.float32))
    assert_close(out, activation.silu_and_mul(gate_up), ELEMENTWISE_TOL)


def test_silu_and_mul_reads_row_strided_input(gen):
    wide = randn(gen, 5, 80)
    gate_up = wide[:, :64]  # row stride 80
    out = K.silu_and_mul(gate_up, out=poisoned((5, 32), torch.float32))
    assert_close(out, activation.silu_and_mul(gate_up), ELEMENTWISE_TOL)


# ---- paged attention ---------------------------------------------------------------------------


def make_meta(specs, tables, block_size):
    """AttentionMetadata for sequences specs [(cached_len, query_len)] owning blocks `tables`."""
    slots, seq_idx, query_idx, positions, seq_lens = [], [], [], [], []
    for seq, ((cached, new), blocks) in enumerate(zip(specs, tables, strict=True)):
        for i in range(new):
            pos = cached + i
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
            seq_idx.append(seq)
            query_idx.append(i)
            positions.append(pos)
        seq_lens.append(cached + new)
    width = max(map(len, tables))
    as_tensor = lambda a: torch.tensor(a, dtype=torch.int64, device=DEVICE)  # noqa: E731
    return AttentionMetadata(
        slot_mapping=as_tensor(slots),
        block_tables=as_tensor([list(t) + [0] * (width - len(t)) for t in tables]),
        seq_lens=as_tensor(seq_lens),
        token_seq_idx=as_tensor(seq_idx),
        token_query_idx=as_tensor(query_idx),
        positions=as_tensor(positions),
        max_query_len=max(new for _, new in specs),
        max_seq_len=max(seq_lens),
    )


def make_batch(gen, specs, block_size, num_heads, num_kv_heads, head_dim, dtype, spare_blocks=3):
    """specs: [(cached_len, query_len)] per sequence. Returns q, k_cache, v_cache, meta.

    Blocks are handed out in a random order, never block 0: the reference reads block 0 through
    the table padding, so it holds finite garbage. Blocks no sequence owns stay NaN, so a kernel
    that reads outside a sequence's blocks fails. The cache already holds every token's K/V."""
    blocks_per_seq = [-(-(cached + new) // block_size) for cached, new in specs]
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_shape = (block_size, num_kv_heads, head_dim)
    k_cache = poisoned((num_blocks, *block_shape), dtype)
    v_cache = poisoned((num_blocks, *block_shape), dtype)
    tables = []
    for count in blocks_per_seq:
        tables.append(order[:count])
        order = order[count:]
    for block in [0] + [b for t in tables for b in t]:
        k_cache[block] = randn(gen, *block_shape, dtype=dtype)
        v_cache[block] = randn(gen, *block_shape, dtype=dtype)
    meta = make_meta(specs, tables, block_size)
    q = randn(gen, meta.positions.shape[0], num_heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, meta


ATTENTION_CASES = {
    # name: (specs [(cached_len, query_len)], block_size, H, K, D)
    "prefill": ([(0, 20)], 16, 4, 4, 32),
    "long_prefill_two_query_tiles": ([(5, 70), (0, 9)], 16, 2, 2, 16),
    "prefill_batch_gqa2": ([(0, 5), (0, 17), (0, 1)], 16, 4, 2, 16),
    "cached_prefix_gqa4": ([(17, 20)], 16, 8, 2, 24),
    "block_aligned_prefix": ([(32, 5), (16, 16)], 16, 2, 1, 16),
    "decode_gqa1": ([(3, 1), (40, 1), (15, 1), (0, 1)], 16, 2, 2, 16),
    "decode_gqa4": ([(5, 1), (31, 1), (16, 1)], 16, 8, 2, 32),
    "decode_gqa3_odd_heads": ([(9, 1), (50, 1)], 16, 6, 2, 16),
    "decode_gqa16": ([(12, 1), (33, 1)], 16, 16, 1, 16),
    "mixed": ([(0, 5), (10, 1), (33, 7), (16, 1)], 16, 4, 2, 32),
    "mixed_block8_odd_heads": ([(0, 3), (21, 1), (7, 9)], 8, 3, 3, 16),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_paged_attention_matches_reference(gen, dtype, case):
    specs, block_size, num_heads, num_kv_heads, head_dim = ATTENTION_CASES[case]
    q, k_cache, v_cache, meta = make_batch(gen, specs, block_size, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = K.paged_attention(q, k_cache, v_cache, meta, scale, out=poisoned(q.shape, dtype))
    assert_close(out, attention.paged_attention(q, k_cache, v_cache, meta, scale), ATTENTION_TOL)


@pytest.mark.parametrize("window", [1, 6, 16, 40])
@pytest.mark.parametrize(
    "case", ["long_prefill_two_query_tiles", "cached_prefix_gqa4", "decode_gqa4", "mixed"]
)
def test_paged_attention_sliding_window_matches_reference(gen, case, window):
    """With a window, and the blocks wholly before each sequence's first visible key poisoned
    (NaN), as the scheduler frees them and hands them to other sequences."""
    specs, block_size, num_heads, num_kv_heads, head_dim = ATTENTION_CASES[case]
    dtype = torch.float32
    q, k_cache, v_cache, meta = make_batch(gen, specs, block_size, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    expected = attention.paged_attention(q, k_cache, v_cache, meta, scale, window)
    for (cached, _), table in zip(specs, meta.block_tables.tolist()):
        for block in table[: max(0, cached - window + 1) // block_size]:
            k_cache[block] = float("nan")
            v_cache[block] = float("nan")
    out = K.paged_attention(q, k_cache, v_cache, meta, scale, out=poisoned(q.shape, dtype), window=window)
    assert_close(out, expected, ATTENTION_TOL)


def test_paged_attention_reads_strided_q(gen):
    _, k_cache, v_cache, meta = make_batch(gen, [(6, 3), (0, 4)], 16, 4, 2, 16, torch.float32)
    q, _, _ = qkv_views(gen, 7, 4, 2, 16, torch.float32)
    out = K.paged_attention(q, k_cache, v_cache, meta, 0.3, out=poisoned(q.shape, torch.float32))
    assert_close(out, attention.paged_attention(q, k_cache, v_cache, meta, 0.3), ATTENTION_TOL)


# ---- write_kv_cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_matches_reference(gen, dtype):
    num_blocks, block_size, num_kv_heads, head_dim = 5, 16, 2, 24
    _, k, v = qkv_views(gen, 7, 4, num_kv_heads, head_dim, dtype)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:7].to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = poisoned(shape, dtype), poisoned(shape, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    K.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    attention.write_kv_cache(k, v, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    assert not k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping].isnan().any()


# ---- guards ------------------------------------------------------------------------------------


def _guard_cases():
    """name -> (call, message the ValueError must match). Built per test (fresh tensors)."""
    f32 = dict(dtype=torch.float32, device=DEVICE)
    x, w, w4 = torch.ones(4, 8, **f32), torch.ones(8, **f32), torch.ones(4, **f32)
    q, k = torch.ones(3, 4, 8, **f32), torch.ones(3, 2, 8, **f32)
    wide = torch.ones(3, 4, 16, **f32)
    pos, cos_sin = torch.zeros(3, dtype=torch.int64, device=DEVICE), torch.ones(16, 2, 8, **f32)
    cache = torch.ones(4, 16, 2, 8, **f32)
    cache_t = cache.transpose(0, 1)
    meta = AttentionMetadata(
        slot_mapping=pos,
        block_tables=torch.zeros(1, 1, dtype=torch.int64, device=DEVICE),
        seq_lens=torch.ones(1, dtype=torch.int64, device=DEVICE),
        token_seq_idx=pos,
        token_query_idx=pos,
        positions=pos,
        max_query_len=3,
        max_seq_len=3,
    )
    float_seq_lens = dataclasses.replace(meta, seq_lens=meta.seq_lens.float())
    attend = K.paged_attention
    return {
        "rms_norm float64": (lambda: K.rms_norm(x.double(), w.double(), 1e-6), "float64"),
        "rms_norm int": (lambda: K.rms_norm(x.int(), w, 1e-6), "int32"),
        "rms_norm weight dtype": (lambda: K.rms_norm(x, w.half(), 1e-6), "weight has dtype"),
        "rms_norm weight shape": (lambda: K.rms_norm(x, w4, 1e-6), "weight must be"),
        "rms_norm strided last dim": (lambda: K.rms_norm(x.t(), w4, 1e-6), "last dim"),
        "rms_norm 4d non-contiguous": (
            lambda: K.rms_norm(torch.ones(2, 3, 4, 16, **f32)[..., :8], w, 1e-6),
            "contiguous",
        ),
        "rms_norm bad out": (lambda: K.rms_norm(x, w, 1e-6, out=x.half()), "out must be"),
        "rms_norm mixed devices": (lambda: K.rms_norm(x, torch.ones(8, device="meta"), 1e-6), "is on meta"),
        "rotary float64": (lambda: K.apply_rotary(q.double(), k.double(), pos, cos_sin), "float64"),
        "rotary q/k dtypes": (lambda: K.apply_rotary(q, k.half(), pos, cos_sin), "k has dtype"),
        "rotary fp16 table": (lambda: K.apply_rotary(q, k, pos, cos_sin.half()), "cos_sin"),
        "rotary float positions": (lambda: K.apply_rotary(q, k, pos.float(), cos_sin), "positions"),
        "rotary q/k shapes": (lambda: K.apply_rotary(q.transpose(1, 2), k, pos, cos_sin), "k must"),
        "rotary strided head dim": (lambda: K.apply_rotary(wide[..., ::2], k, pos, cos_sin), "last dim"),
        "rotary odd head_dim": (
            lambda: K.apply_rotary(q[..., :7], k[..., :7], pos, cos_sin[..., :7]),
            "even",
        ),
        "silu float64": (lambda: K.silu_and_mul(x.double()), "float64"),
        "silu odd width": (lambda: K.silu_and_mul(x[:, :7]), "even"),
        "silu strided": (lambda: K.silu_and_mul(x.t()), "last dim"),
        "silu 3d non-contiguous": (
            lambda: K.silu_and_mul(torch.ones(2, 3, 16, **f32)[:, :, :8]),
            "contiguous",
        ),
        "attention float64": (
            lambda: attend(q.double(), cache.double(), cache.double(), meta, 1.0),
            "float64",
        ),
        "attention cache dtype": (
            lambda: attend(q, cache.half(), cache.half(), meta, 1.0),
            "k_cache has dtype",
        ),
        "attention non-contiguous cache": (lambda: attend(q, cache_t, cache_t, meta, 1.0), "contiguous"),
        "attention heads not multiple": (lambda: attend(q[:, :3], cache, cache, meta, 1.0), "multiple"),
        "attention head_dim": (lambda: attend(q[..., :4].contiguous(), cache, cache, meta, 1.0), "head_dim"),
        "attention float seq_lens": (lambda: attend(q, cache, cache, float_seq_lens, 1.0), "seq_lens"),
        "attention strided q": (lambda: attend(wide[..., ::2], cache, cache, meta, 1.0), "last dim"),
        "kv write non-contiguous cache": (
            lambda: K.write_kv_cache(k, k, cache_t, cache_t, pos),
            "contiguous",
        ),
        "kv write dtype": (lambda: K.write_kv_cache(k.half(), k.half(), cache, cache, pos), "dtype"),
    }


@pytest.mark.parametrize("case", list(_guard_cases()))
def test_guard_rejects(case):
    call, message = _guard_cases()[case]
    with pytest.raises(ValueError, match=message):
        call()


# ---- dispatch ----------------------------------------------------------------------------------

REFERENCES = {
    "rms_norm": norm.rms_norm,
    "apply_rotary": rotary.apply_rotary,
    "silu_and_mul": activation.silu_and_mul,
    "paged_attention": attention.paged_attention,
    "write_kv_cache": attention.write_kv_cache,
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_dispatch_signatures_match_references(name):
    assert inspect.signature(getattr(dispatch, name)) == inspect.signature(REFERENCES[name])


def test_dispatch_choice(monkeypatch):
    cpu = torch.ones(1)
    monkeypatch.setattr(dispatch, "FORCE_TRITON", False)
    assert dispatch.kernels_for(cpu) is None
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
    assert dispatch.kernels_for(cpu) is K
    with pytest.raises(ValueError, match="MI_FORCE_TRITON"):
        read_environment({"MI_FORCE_TRITON": "yes"})


WINDOWS = {  # sliding window, layer types
    "full": (None, None),
    "windowed": (5, None),
    "one_windowed_layer": (5, ("sliding_attention", "full_attention")),
}


@pytest.mark.parametrize("windows", list(WINDOWS))
@pytest.mark.parametrize("force_triton", [False, True])
def test_dispatched_model_forward_matches_reference(gen, monkeypatch, force_triton, windows):
    """A 2-layer Qwen3-style model (q/k norm, GQA 2, qkv bias), a prefill of two sequences and
    then one decode step each, with the ops swapped for the dispatching versions; without a
    window, with one (shorter than both prompts) on every layer, and on one layer."""
    sliding_window, layer_types = WINDOWS[windows]
    from mi.models import llama
    from mi.models.parallel import TensorParallel

    cfg = llama.ModelConfig(
        vocab_size=50,
        padded_vocab_size=64,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,
        qk_norm=True,
        sliding_window=sliding_window,
        layer_types=layer_types,
    )
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        model = llama.CausalLM(cfg, TensorParallel())
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.3)
    model = model.to(DEVICE).eval()
    cos_sin = rotary.rotary_cos_sin(cfg.head_dim, 64, cfg.rope_theta, device=DEVICE)

    def run(ops) -> list[torch.Tensor]:
        for name, op in ops.items():
            monkeypatch.setattr(llama, name, op)
        caches = [
            tuple(torch.zeros(6, 16, 2, 16, device=DEVICE) for _ in "kv")
            for _ in range(cfg.num_hidden_layers)
        ]
        tables = [[3], [5, 1]]  # blocks owned by the two sequences, out of order
        outputs = []
        for step, specs in enumerate([[(0, 7), (0, 18)], [(7, 1), (18, 1)]]):
            meta = make_meta(specs, tables, block_size=16)
            ids = torch.randint(
                0, cfg.vocab_size, meta.positions.shape, generator=torch.Generator().manual_seed(step)
            ).to(DEVICE)
            with torch.inference_mode():
                outputs.append(model(ids, caches, meta, cos_sin))
        return outputs

    expected = run(REFERENCES)
    monkeypatch.setattr(dispatch, "FORCE_TRITON", force_triton)
    used_triton = []
    choose = dispatch.kernels_for
    monkeypatch.setattr(dispatch, "kernels_for", lambda t: used_triton.append(choose(t)) or used_triton[-1])
    actual = run({name: getattr(dispatch, name) for name in REFERENCES})
    # Per layer: 4 norms (input, q, k, post-attention), rotary, kv write, attention, silu_and_mul;
    # plus the final norm; two steps.
    assert len(used_triton) == 2 * (8 * cfg.num_hidden_layers + 1)
    assert all((kernels is K) == (force_triton or DEVICE.type == "cuda") for kernels in used_triton)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
