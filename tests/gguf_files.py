"""Write a tiny Hugging Face checkpoint as a GGUF file, the way llama.cpp's convert_hf_to_gguf.py does.

Metadata under llama.cpp's keys, tensor names from gguf's `TensorNameMap`, the q / k rows of a
`llama` file permuted for llama.cpp's RoPE layout, 1-D tensors (norms, biases) kept F32 and every
matrix stored as `qtype` (quantized by `gguf.quants.quantize`, llama.cpp's reference code). The
tokenizer is the checkpoint's byte-level BPE as `tokenizer.ggml.*` arrays.
"""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
from safetensors.numpy import load_file

Q = gguf.GGMLQuantizationType
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def writable_types(candidates) -> list:
    """The types of `candidates` that gguf.quants.quantize can write (the others raise)."""
    found = []
    for qtype in candidates:
        try:
            gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
        except NotImplementedError:
            continue
        found.append(qtype)
    return found


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: the rows of each head's two halves interleaved."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# Byte offsets of the float16 scales in one block of the k-quants gguf cannot write (quants.py).
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _stored(data: np.ndarray, kind, rng: np.random.Generator) -> np.ndarray:
    """`data` as type `kind`; for a type gguf cannot quantize to, random blocks of that type
    (the file then holds other weights than `data`, the same for every reader)."""
    try:
        return gguf.quants.quantize(data, kind)
    except NotImplementedError:
        pass
    raw = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(data.shape, kind), dtype=np.uint8)
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    blocks = raw.reshape(-1, block_bytes)
    scales = rng.uniform(0.002, 0.02, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    for offset in K_QUANT_SCALES.get(kind, ()):  # finite scales: random ones can be inf or nan
        blocks[:, offset : offset + 2] = scales
    return raw


def _file_type(qtype) -> int:
    """general.file_type as llama.cpp's quantizer sets it (the k-quants have _S/_M/_L mixes)."""
    if qtype == Q.F32:
        return gguf.LlamaFileType.ALL_F32
    members = gguf.LlamaFileType.__members__
    return members.get(f"MOSTLY_{qtype.name}") or members[f"MOSTLY_{qtype.name}_M"]


def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir: pathlib.Path, config: dict, eot: int | None) -> None:
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # the split regex the tiny tokenizers are trained with
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_unk_token_id(tokens.index("<|unk|>"))
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(False)
    writer.add_chat_template((hf_dir / "chat_template.jinja").read_text())


def write_gguf(
    hf_dir,
    path,
    qtype=Q.F32,
    *,
    arch: str | None = None,
    eot: int | None = None,
    edit=None,
    tensor_types: dict | None = None,
) -> pathlib.Path:
    """Write `hf_dir` (a tiny model) to the GGUF `path`; return `path`.

    `arch` overrides general.architecture, `eot` adds tokenizer.ggml.eot_token_id, `edit(writer)`
    adds metadata or tensors before writing, `tensor_types` gives some tensors (GGUF names)
    another type than `qtype`.
    """
    hf_dir, path = pathlib.Path(hf_dir), pathlib.Path(path)
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    gguf_arch = arch or GGUF_ARCH[config["model_type"]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}

    writer = gguf.GGUFWriter(path, gguf_arch)
    writer.add_name(hf_dir.name)
    writer.add_file_type(_file_type(qtype))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.get("rope_theta", rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, hf_dir, config, eot)

    rng = np.random.default_rng(0)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == GGUF_ARCH[config["model_type"]]),
        config["num_hidden_layers"],
    )
    for hf_name, data in tensors.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if GGUF_ARCH[config["model_type"]] == "llama" and base.endswith(("q_proj", "k_proj")):
            data = llama_cpp_permute(data, heads if base.endswith("q_proj") else kv_heads)
        kind = (tensor_types or {}).get(name, qtype if data.ndim == 2 else Q.F32)
        writer.add_tensor(name, _stored(data.astype(np.float32), kind, rng), raw_dtype=kind)
    if edit is not None:
        edit(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
