"""oneDNN-packed linear layers (mi/ops/cpu_linear.py): same numbers as nn.Linear up to float32
rounding, and the same model outputs whichever way a checkpoint is loaded."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mi.config import read_environment
from mi.models.loader import load_model
from mi.models.parallel import TensorParallel
from mi.ops import AttentionMetadata, rotary_cos_sin
from mi.ops.cpu_linear import PackedLinear, can_pack, pack_linears, packing_available, row_bucket

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("num_rows", [0, 1, 3, 8, 33, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear(num_rows, with_bias):
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(300, 96, generator=gen)
    bias = torch.randn(300, generator=gen) if with_bias else None
    x = torch.randn(num_rows, 96, generator=gen)
    out = PackedLinear(weight, bias)(x)
    assert out.shape == (num_rows, 300) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_packed_linear_takes_strided_and_batched_inputs():
    weight = torch.randn(64, 32)
    packed = PackedLinear(weight, None)
    strided = torch.randn(5, 64)[:, ::2]
    torch.testing.assert_close(packed(strided), F.linear(strided, weight), rtol=1e-5, atol=1e-5)
    batched = torch.randn(2, 3, 32)
    torch.testing.assert_close(packed(batched), F.linear(batched, weight), rtol=1e-5, atol=1e-5)
    padded = torch.randn(3, 13, 32)  # 39 rows, run as 40
    assert row_bucket(39) == 40
    out = packed(padded)
    assert out.shape == (3, 13, 64) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(padded, weight), rtol=1e-5, atol=1e-5)


def test_row_buckets_are_exact_for_decode_and_waste_at_most_a_sixteenth():
    buckets = [row_bucket(rows) for rows in range(8193)]
    assert buckets[:33] == list(range(33))
    assert all(rows <= b <= rows * 17 / 16 for rows, b in enumerate(buckets))
    assert all(a <= b for a, b in zip(buckets, buckets[1:]))
    assert all(row_bucket(b) == b for b in buckets)  # a bucket maps to itself
    assert len(set(buckets[1:2049])) == 128 and len(set(buckets[1:])) == 160  # bounded primitives


@pytest.mark.parametrize(
    "weight",
    [torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(4, 4, device="meta")],
    ids=["bf16", "meta"],
)
def test_unpackable_weights_are_refused(weight):
    assert not can_pack(weight)
    with pytest.raises(ValueError, match="cannot pack"):
        PackedLinear(weight, None)


def test_pack_linears_replaces_only_packable_linears():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.ReLU()), nn.Embedding(4, 8))
    model.append(nn.Linear(4, 4).to(torch.bfloat16))
    x = torch.randn(3, 8)
    expected = model[1](model[0](x))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert type(model[3]) is nn.Linear  # bf16 stays as it was
    assert isinstance(model[2], nn.Embedding)
    torch.testing.assert_close(model[1](model[0](x)), expected, rtol=1e-5, atol=1e-5)


def _decode_logits(model, prompt_len: int = 12) -> torch.Tensor:
    """Logits of every position of one prompt (one prefill step through the paged cache)."""
    cfg = model.cfg
    block_size, num_blocks = 4, -(-prompt_len // 4)
    shape = (num_blocks, block_size, cfg.num_kv_heads_per_rank(1), cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    positions = torch.arange(prompt_len)
    meta = AttentionMetadata(
        slot_mapping=positions,
        block_tables=torch.arange(num_blocks)[None, :],
        seq_lens=torch.tensor([prompt_len]),
        token_seq_idx=torch.zeros(prompt_len, dtype=torch.int64),
        token_query_idx=positions,
        positions=positions,
        max_query_len=prompt_len,
        max_seq_len=prompt_len,
    )
    ids = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1))
    cos_sin = rotary_cos_sin(cfg.head_dim, 64, cfg.rope_theta, cfg.rope_scaling)
    with torch.inference_mode():
        return model.compute_logits(model(ids, caches, meta, cos_sin))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # untied head and tied head
def test_packed_model_gives_the_same_logits(arch, converted):
    plain = load_model(converted(arch), TensorParallel(), torch.device("cpu"), torch.float32, "torch")
    packed = load_model(converted(arch), TensorParallel(), torch.device("cpu"), torch.float32, "onednn")
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert isinstance(packed.lm_head, PackedLinear)
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert plain.cfg.tie_word_embeddings == (arch == "qwen3")
    expected, got = _decode_logits(plain), _decode_logits(packed)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_bfloat16_on_cpu_is_not_packed(converted):
    model = load_model(converted("llama"), TensorParallel(), torch.device("cpu"), torch.bfloat16, "onednn")
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_unknown_cpu_linear_is_refused(converted):
    with pytest.raises(ValueError, match="cpu_linear must be one of onednn, torch"):
        load_model(converted("llama"), TensorParallel(), torch.device("cpu"), torch.float32, "mkl")


def test_mi_cpu_linear_environment_variable():
    assert read_environment({}).cpu_linear == "onednn"
    assert read_environment({"MI_CPU_LINEAR": "torch"}).cpu_linear == "torch"
    with pytest.raises(ValueError, match="MI_CPU_LINEAR must be one of onednn, torch, got 'fast'"):
        read_environment({"MI_CPU_LINEAR": "fast"})
