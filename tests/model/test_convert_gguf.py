"""mi-convert on GGUF files: the same shards as the HF checkpoint (F32), the dequantized tensors
(every quant type), mi_config.json, the rebuilt tokenizer, and every refusal.

GGUF files are written like llama.cpp writes them (tests/gguf_files.py). The expected tensors here
are computed independently of mi/convert: names from a table written from llama.cpp's docs, q / k
rows un-permuted by index.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf_files import K_QUANT_SCALES, Q, writable_types, write_gguf
from safetensors.torch import load_file, save_file
from test_convert import _assert_same_outputs, assert_refused, check_shards, run_cli
from transformers import AutoTokenizer

from mi.convert import ConvertError, convert, load_mi_config
from mi.convert.gguf_source import SUPPORTED_QUANT_TYPES, GgufSource
from mi.models.tiny import build_tiny_model

QUANT_TYPES = [q.name for q in writable_types(SUPPORTED_QUANT_TYPES) if q != Q.F32] + [
    q.name for q in K_QUANT_SCALES
]
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _convert(src, out, tp, **kw):
    return convert(src, out, tp, progress=False, **kw)


def _field(reader, key):
    return reader.get_field(key).contents()


def dequantized_hf_tensors(path) -> dict[str, torch.Tensor]:
    """The file's tensors under HF names: dequantized, llama's q / k rows put back in HF order
    (llama.cpp stores row h*D + 2*j + s of a head for HF row h*D + s*D/2 + j)."""
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    head_dim = _field(reader, f"{arch}.attention.key_length")
    tensors = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
        else:
            name = f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"
        if arch == "llama" and parts[2:3] in (["attn_q"], ["attn_k"]):
            h, s, j = np.meshgrid(
                np.arange(shape[0] // head_dim), np.arange(2), np.arange(head_dim // 2), indexing="ij"
            )
            index = np.empty(shape[0], dtype=np.int64)
            index[(h * head_dim + s * head_dim // 2 + j).ravel()] = (h * head_dim + 2 * j + s).ravel()
            values = values[torch.from_numpy(index)]
        tensors[name] = values.contiguous()
    return tensors


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama whose rows are a multiple of 256 wide (the k-quants' block)."""
    return build_tiny_model(
        tmp_path_factory.mktemp("wide") / "wide-llama",
        "llama",
        overrides={"hidden_size": 256, "intermediate_size": 512},
    )


@pytest.mark.parametrize("arch,tp", [("llama", 1), ("llama", 2), ("mistral", 4), ("qwen2", 2), ("qwen3", 2)])
def test_f32_gguf_converts_to_the_hf_checkpoints_shards(arch, tp, tiny_gguf, converted, tmp_path):
    out = _convert(tiny_gguf(arch), tmp_path / "out", tp)
    _assert_same_outputs(out, converted(arch, tp), tp)


def test_reference_unpermute_inverts_llama_cpp(tiny_model_dirs, tiny_gguf, tmp_path):
    """The test's own reference reads an F32 file back to the original HF tensors."""
    hf = load_file(tiny_model_dirs("llama") / "model.safetensors")
    got = dequantized_hf_tensors(tiny_gguf("llama"))
    assert got.keys() == hf.keys() and all(torch.equal(got[k], hf[k]) for k in hf)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantized_gguf_shards_are_the_dequantized_tensors(qtype, wide_llama, tmp_path):
    path = write_gguf(wide_llama, tmp_path / f"wide.{qtype}.gguf", Q[qtype])
    expected = tmp_path / "expected"
    expected.mkdir()
    tensors = dequantized_hf_tensors(path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    save_file(tensors, expected / "model.safetensors")
    out = _convert(path, tmp_path / "out", 2)
    check_shards(expected, out, 2)
    source = load_mi_config(out)["source"]
    assert source["tensor_types"] == {"F32": 2 * 2 + 1, qtype: 2 * 7 + 2}
    assert source["quantization"] in (qtype, f"{qtype}_M")


def test_mi_config_of_a_gguf(tiny_model_dirs, tmp_path):
    hf_dir = tiny_model_dirs("qwen2")
    path = write_gguf(hf_dir, tmp_path / "tiny-qwen2.Q8_0.gguf", Q.Q8_0, eot=7)
    config = load_mi_config(_convert(path, tmp_path / "out", 2))
    hf = json.loads((hf_dir / "config.json").read_text())
    assert config["architecture"] == "qwen2" and config["hf_architecture"] == "Qwen2ForCausalLM"
    assert config["dtype"] == "float32" and config["tp"] == 2
    assert config["source"] == {
        "format": "gguf",
        "file": "tiny-qwen2.Q8_0.gguf",
        "quantization": "Q8_0",
        "tensor_types": {"F32": 2 * 5 + 1, "Q8_0": 2 * 7 + 1},  # tied: no output.weight
    }
    model = config["model"]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
    ):
        assert model[key] == hf[key], key
    assert model["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)  # stored as float32
    assert model["rope_theta"] == hf["rope_parameters"]["rope_theta"] and model["rope_scaling"] is None
    assert model["attention_bias"] and not model["qk_norm"] and model["head_dim"] == 16
    assert model["eos_token_ids"] == [hf["eos_token_id"], 7]  # eos, then the end-of-turn token
    assert model["model_name"] == "tiny-qwen2.Q8_0"


def test_tokenizer_and_chat_template_rebuilt_from_metadata(tiny_gguf, tmp_path):
    path = tiny_gguf("llama", "Q8_0")
    out = _convert(path.parent, tmp_path / "out", 1)  # a directory holding one .gguf
    assert not list(out.glob("*.gguf"))
    a = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    b = AutoTokenizer.from_pretrained(out)
    # (transformers' byte-level GGUF tokenizer adds GPT-2's <|endoftext|> when a vocabulary lacks it)
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()
    for text in ("Héllo wörld 🙂  def f():\n\treturn 1", "12345 <|end|> x", "<|bos|>a"):
        assert a(text).input_ids == b(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    rendered = b.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == a.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_dtype_bfloat16(tiny_gguf, converted, tmp_path):
    out = _convert(tiny_gguf("llama"), tmp_path / "bf16", 1, dtype="bfloat16")
    assert load_mi_config(out)["dtype"] == "bfloat16"
    got, f32 = load_file(out / "rank-0.safetensors"), load_file(converted("llama", 1) / "rank-0.safetensors")
    assert got.keys() == f32.keys() and all(torch.equal(got[k], f32[k].to(torch.bfloat16)) for k in got)


def test_linear_rope_scaling(tiny_model_dirs, tmp_path):
    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    path = write_gguf(tiny_model_dirs("llama"), tmp_path / "linear.gguf", edit=linear)
    assert load_mi_config(_convert(path, tmp_path / "out", 1))["model"]["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 2.0,
    }


def test_quantization_without_file_type_is_the_commonest_matrix_type(tiny_model_dirs, tmp_path):
    def no_file_type(writer):
        del writer.kv_data[0]["general.file_type"]

    path = write_gguf(
        tiny_model_dirs("llama"), tmp_path / "mixed.gguf", Q.Q4_0, tensor_types={"token_embd.weight": Q.Q8_0}
    )
    unlabelled = write_gguf(tiny_model_dirs("llama"), tmp_path / "unlabelled.gguf", Q.Q5_1, edit=no_file_type)
    assert load_mi_config(_convert(path, tmp_path / "a", 1))["source"]["quantization"] == "Q4_0"
    source = load_mi_config(_convert(unlabelled, tmp_path / "b", 1))["source"]
    assert source["quantization"] == "Q5_1" and source["tensor_types"] == {"F32": 5, "Q5_1": 16}


def test_head_aligned_rows_read_alone_and_split_heads_refused(tiny_gguf):
    source = GgufSource(tiny_gguf("llama", "Q8_0"))
    for name, rows in (
        ("model.layers.0.self_attn.q_proj.weight", (16, 48)),
        ("model.layers.1.self_attn.k_proj.weight", (16, 32)),
    ):
        assert torch.equal(source.read(name, rows=rows), source.read(name)[rows[0] : rows[1]])
        with pytest.raises(ValueError, match="do not start and end on a head"):
            source.read(name, rows=(1, 17))


def test_tp_that_does_not_divide_the_heads_is_refused_in_the_api(tiny_gguf, tmp_path):
    with pytest.raises(ConvertError, match=r"num_attention_heads=8, num_key_value_heads=2"):
        _convert(tiny_gguf("llama"), tmp_path / "out", 3)


# ---- CLI refusals -----------------------------------------------------------------------------


def _gguf(d, t, edit=None, **kw):
    return write_gguf(d("llama"), t / "src.gguf", edit=edit, **kw)


def _drop_key(key):
    def edit(writer):
        del writer.kv_data[0][key]

    return edit


def _set_uint(key, value):
    return lambda writer: writer.add_uint32(key, value)


def _edits(*edits):
    def edit(writer):
        for one in edits:
            one(writer)

    return edit


def _drop_tensor(name):
    def edit(writer):
        del writer.tensors[0][name]

    return edit


def _add_tensor(name):
    return lambda writer: writer.add_tensor(name, np.ones(16, dtype=np.float32))


def _two_ggufs(d, t):
    folder = t / "two"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        write_gguf(d("llama"), folder / name)
    return folder


def _truncated(d, t):
    path = _gguf(d, t)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def _not_gguf(d, t):
    path = t / "model.bin"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    return path


def _bad_magic(d, t):
    path = t / "model.gguf"
    path.write_bytes(b"NOPE" + b"\x00" * 64)
    return path


GGUF_ERRORS = {
    "unknown_arch": (
        lambda d, t: _gguf(d, t, arch="falcon"),
        (),
        "unsupported GGUF architecture 'falcon'; supported: llama, qwen2, qwen3",
    ),
    "unsupported_quant": (
        lambda d, t: _gguf(d, t, tensor_types={"blk.1.attn_v.weight": Q.IQ4_NL}),
        (),
        "tensor blk.1.attn_v.weight has quantization IQ4_NL, which is not supported; supported: F32, F16",
    ),
    "tp_heads": (
        lambda d, t: _gguf(d, t),
        ("--tp", 3),
        "tp=3 does not divide num_attention_heads (num_attention_heads=8, num_key_value_heads=2)",
    ),
    "tp_kv_heads": (
        lambda d, t: write_gguf(
            build_tiny_model(
                t / "six", overrides={"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3}
            ),
            t / "src.gguf",
        ),
        ("--tp", 2),
        "tp=2 does not fit the KV heads (num_attention_heads=6, num_key_value_heads=3)",
    ),
    "two_files": (_two_ggufs, (), "holds 2 .gguf files (a.gguf, b.gguf); pass one of them"),
    "not_a_gguf_file": (_not_gguf, (), "a file must be a .gguf"),
    "truncated": (_truncated, (), "corrupt or truncated GGUF file src.gguf"),
    "bad_magic": (_bad_magic, (), "corrupt or truncated GGUF file model.gguf"),
    "missing_metadata": (
        lambda d, t: _gguf(d, t, edit=_drop_key("llama.feed_forward_length")),
        (),
        "GGUF metadata llama.feed_forward_length must be a positive integer (got None)",
    ),
    "missing_tensor": (
        lambda d, t: _gguf(d, t, edit=_drop_tensor("blk.1.ffn_up.weight")),
        (),
        "missing tensor blk.1.ffn_up.weight in src.gguf",
    ),
    "shape_mismatch": (
        lambda d, t: _gguf(d, t, edit=_set_uint("llama.feed_forward_length", 512)),
        (),
        "tensor blk.0.ffn_gate.weight has shape [256, 128] (rows, columns), the metadata implies [512, 128]",
    ),
    "unknown_tensor": (
        lambda d, t: _gguf(d, t, edit=_add_tensor("blk.0.attn_sinks.weight")),
        (),
        "unsupported GGUF tensors: blk.0.attn_sinks.weight",
    ),
    "rope_freqs": (
        lambda d, t: _gguf(d, t, edit=_add_tensor("rope_freqs.weight")),
        (),
        "rope_freqs.weight",
    ),
    "moe": (
        lambda d, t: _gguf(d, t, edit=lambda w: w.add_expert_count(8)),
        (),
        "llama.expert_count): mixture-of-experts models are not supported",
    ),
    "sliding_window": (
        lambda d, t: _gguf(d, t, edit=lambda w: w.add_sliding_window(64)),
        (),
        "sliding-window attention is not supported yet",
    ),
    "partial_rotary": (
        lambda d, t: _gguf(d, t, edit=_set_uint("llama.rope.dimension_count", 8)),
        (),
        "rope.dimension_count=8 is not the head size 16 (partial rotary)",
    ),
    "heads_not_grouped": (
        lambda d, t: _gguf(d, t, edit=_set_uint("llama.attention.head_count_kv", 3)),
        (),
        "head_count=8 is not a multiple of head_count_kv=3",
    ),
    "hidden_not_split_in_heads": (
        lambda d, t: _gguf(
            d,
            t,
            edit=_edits(
                _drop_key("llama.attention.key_length"),
                _set_uint("llama.attention.head_count", 3),
                _set_uint("llama.attention.head_count_kv", 1),
            ),
        ),
        (),
        "embedding_length=128 is not a multiple of head_count=3",
    ),
    "value_length": (
        lambda d, t: _gguf(d, t, edit=_set_uint("llama.attention.value_length", 8)),
        (),
        "attention.value_length differs from attention.key_length",
    ),
    "linear_rope_without_factor": (
        lambda d, t: _gguf(d, t, edit=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)),
        (),
        "GGUF metadata llama.rope.scaling.factor must be a positive number (got None)",
    ),
    "yarn": (
        lambda d, t: _gguf(d, t, edit=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN)),
        (),
        "unsupported GGUF rope.scaling.type 'yarn' (supported: none, linear)",
    ),
    "no_tokenizer": (
        lambda d, t: _gguf(d, t, edit=_drop_key("tokenizer.ggml.model")),
        (),
        "cannot rebuild the tokenizer from src.gguf",
    ),
}


@pytest.mark.parametrize("case", list(GGUF_ERRORS))
def test_refuses_gguf(case, tiny_model_dirs, tmp_path):
    """In process (a CLI run costs a second of imports); the CLI turns any ConvertError into
    one line and exit 2, which the next test checks on a few of these."""
    make, args, message = GGUF_ERRORS[case]
    src = make(tiny_model_dirs, tmp_path)
    out = tmp_path / "out"
    tp = int(args[1]) if args else 1
    with pytest.raises(ConvertError) as refusal:
        _convert(src, out, tp)
    assert message in str(refusal.value) and "\n" not in str(refusal.value)
    assert not out.exists() and not any(".partial-" in p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("case", ["unsupported_quant", "tp_heads", "truncated", "no_tokenizer"])
def test_cli_refuses_gguf(case, tiny_model_dirs, tmp_path):
    make, args, message = GGUF_ERRORS[case]
    src = make(tiny_model_dirs, tmp_path)
    out = tmp_path / "out"
    assert_refused(run_cli("--path", src, "--out", out, *args), message, out)
    assert not out.exists()


def test_cli_converts_a_gguf_with_a_progress_bar(tiny_gguf, tmp_path):
    src = shutil.copy(tiny_gguf("llama", "Q4_0"), tmp_path / "model.gguf")
    result = run_cli("--path", src, "--out", tmp_path / "out", "--tp", 2)
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr and f"-> {tmp_path / 'out'} (tp=2)" in result.stdout
    assert load_mi_config(tmp_path / "out")["source"]["quantization"] == "Q4_0"
