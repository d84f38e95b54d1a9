"""A GGUF file (llama.cpp's format) as a converter source: HF tensor names, a ModelSpec, a tokenizer.

Read with llama.cpp's own `gguf` package: `GGUFReader` memory-maps the file, and a tensor's rows
are dequantized (`gguf.quants.dequantize`) only when the rank file being written asks for them,
so memory stays near one float32 tensor. What is mapped:

  GGUF                                  HF name (as `source_shapes` in sharding.py spells it)
  token_embd / output / output_norm     model.embed_tokens / lm_head / model.norm
  blk.i.attn_{q,k,v,output}, attn_norm  model.layers.i.self_attn.{q,k,v,o}_proj, input_layernorm
  blk.i.ffn_{gate,up,down}, ffn_norm    model.layers.i.mlp.*_proj, post_attention_layernorm
  blk.i.attn_{q,k}_norm (qwen3)         model.layers.i.self_attn.{q,k}_norm

(names come from gguf's `TensorNameMap`, the table llama.cpp converts with). Metadata: `{arch}.`
block_count, embedding_length, feed_forward_length, attention.head_count(_kv), attention.key_length,
rope.freq_base, attention.layer_norm_rms_epsilon, context_length, vocab_size; `tokenizer.ggml.*` ids.

llama.cpp stores the q and k rows of a `llama` file permuted for its RoPE layout (the two halves
of each head interleaved); `_unpermute` undoes that exactly as transformers' GGUF loader does.
The permutation stays inside a head, so a head-aligned row range is un-permuted on its own.
"""

from __future__ import annotations

import collections
import hashlib
import pathlib
from collections.abc import Callable

import gguf
import numpy as np
import torch

from mi.convert.sharding import source_shapes
from mi.convert.spec import ConvertError, ModelSpec

# GGUF general.architecture -> (our architecture, HF architecture).
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
_Q = gguf.GGMLQuantizationType
SUPPORTED_QUANT_TYPES = tuple(
    _Q[name]
    for name in (
        "F32",
        "F16",
        "BF16",
        "Q8_0",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    )
)
_PERMUTED = {"llama": ("self_attn.q_proj.", "self_attn.k_proj.")}  # HF name parts llama.cpp permutes
_REFUSED_KEYS = {  # metadata (after "{arch}.") that changes the computation in a way we do not serve
    "expert_count": "mixture-of-experts models are not supported",
    "attention.sliding_window": "sliding-window attention is not supported yet",
}
Span = tuple[int, int]


def find_gguf_file(path: pathlib.Path) -> pathlib.Path | None:
    """The GGUF file `--path` names: the file itself, or the one `.gguf` of a directory that has
    no config.json (that is a Hugging Face checkpoint). None when `path` is not a GGUF source."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConvertError(f"--path {path}: a file must be a .gguf (or pass a model directory)")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ConvertError(f"--path {path} holds {len(files)} .gguf files ({names}); pass one of them")
    return files[0] if files else None


def _unpermute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (transformers' `_reverse_permute_weights`)."""
    half = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


class GgufSource:
    """Tensor name (HF spelling) -> lazily dequantized float32 tensor, over one GGUF file.

    Offers what the driver uses of `WeightSource` (names, shape, read, sha256, num_bytes), plus
    `spec`, `load_tokenizer()` and `description()`.
    """

    def __init__(self, file: pathlib.Path):
        self.file = file
        self.files = [file]
        try:
            self._reader = gguf.GGUFReader(file)
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
            raise ConvertError(f"corrupt or truncated GGUF file {file.name}: {e}") from None
        arch = self._str("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConvertError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        self._arch = arch
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.spec = self._read_spec()
        self._gguf_names = self._map_names()
        self._check_tensors()

    # ---- metadata --------------------------------------------------------------------------

    def _value(self, key: str, default=None):
        field = self._reader.get_field(key)
        return default if field is None else field.contents()

    def _str(self, key: str) -> str | None:
        value = self._value(key)
        return value if isinstance(value, str) else None

    def _int(self, key: str, default: int | None = None) -> int:
        value = self._value(f"{self._arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConvertError(f"GGUF metadata {self._arch}.{key} must be a positive integer (got {value!r})")
        return value

    def _float(self, key: str, default: float | None = None) -> float:
        value = self._value(f"{self._arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConvertError(f"GGUF metadata {self._arch}.{key} must be a positive number (got {value!r})")
        return float(value)

    def _token_id(self, name: str) -> int | None:
        value = self._value(f"tokenizer.ggml.{name}_token_id")
        return value if isinstance(value, int) else None

    def _read_spec(self) -> ModelSpec:
        arch = self._arch
        for key, reason in _REFUSED_KEYS.items():
            if self._value(f"{arch}.{key}") not in (None, 0):
                raise ConvertError(f"unsupported GGUF ({arch}.{key}): {reason}")
        if "rope_freqs.weight" in self._tensors:
            raise ConvertError("unsupported GGUF: rope_freqs.weight (per-dimension RoPE frequency factors)")
        hidden = self._int("embedding_length")
        heads = self._int("attention.head_count")
        kv_heads = self._int("attention.head_count_kv", heads)
        if heads % kv_heads:
            raise ConvertError(f"head_count={heads} is not a multiple of head_count_kv={kv_heads}")
        if hidden % heads and self._value(f"{arch}.attention.key_length") is None:
            raise ConvertError(f"embedding_length={hidden} is not a multiple of head_count={heads}")
        head_dim = self._int("attention.key_length", hidden // heads)
        if self._int("attention.value_length", head_dim) != head_dim:
            raise ConvertError("unsupported GGUF: attention.value_length differs from attention.key_length")
        if self._int("rope.dimension_count", head_dim) != head_dim:
            raise ConvertError(
                f"unsupported GGUF: rope.dimension_count={self._value(f'{arch}.rope.dimension_count')} "
                f"is not the head size {head_dim} (partial rotary)"
            )
        eos = [self._token_id(name) for name in ("eos", "eot", "eom")]
        architecture, hf_architecture = GGUF_ARCHITECTURES[arch]
        return ModelSpec(
            architecture=architecture,
            hf_architecture=hf_architecture,
            vocab_size=self._int("vocab_size", self._num_tokens()),
            hidden_size=hidden,
            intermediate_size=self._int("feed_forward_length"),
            num_hidden_layers=self._int("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=self._float("attention.layer_norm_rms_epsilon"),
            rope_theta=self._float("rope.freq_base", 10000.0),
            rope_scaling=self._rope_scaling(),
            max_position_embeddings=self._int("context_length", 2048),
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors,
            qk_norm=arch == "qwen3",
            sliding_window=None,
            layer_types=None,
            bos_token_id=self._token_id("bos"),
            eos_token_ids=list(dict.fromkeys(i for i in eos if i is not None)),
            source_dtype="float32",  # what dequantization yields; --dtype picks another
            model_name=self.file.stem,
        )

    def _num_tokens(self) -> int | None:
        field = self._reader.get_field("tokenizer.ggml.tokens")
        return len(field.data) if field is not None else None

    def _rope_scaling(self) -> dict | None:
        kind = self._value(f"{self._arch}.rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": self._float("rope.scaling.factor")}
        raise ConvertError(f"unsupported GGUF rope.scaling.type {kind!r} (supported: none, linear)")

    # ---- tensors ---------------------------------------------------------------------------

    def _map_names(self) -> dict[str, str]:
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self._arch)
        table = gguf.get_tensor_name_map(arch, self.spec.num_hidden_layers)
        names = {}
        for hf_name in source_shapes(self.spec):
            base, suffix = hf_name.rsplit(".", 1)
            gguf_name = table.get_name(base)
            if gguf_name is None:
                raise ConvertError(f"no GGUF name for tensor {hf_name} in gguf's table for {self._arch}")
            names[hf_name] = f"{gguf_name}.{suffix}"
        return names

    def _check_tensors(self) -> None:
        """Every tensor present with the shape the metadata implies (named as the file names them);
        unknown tensors and quantizations are refused: silently dropping one would mis-serve."""
        for hf_name, shape in source_shapes(self.spec).items():
            name = self._gguf_names[hf_name]
            if name not in self._tensors:
                raise ConvertError(f"missing tensor {name} in {self.file.name}")
            if self.shape(hf_name) != shape:
                raise ConvertError(
                    f"tensor {name} has shape {list(self.shape(hf_name))} (rows, columns), "
                    f"the metadata implies {list(shape)}"
                )
        known = set(self._gguf_names.values())
        unknown = sorted(set(self._tensors) - known)
        if unknown:
            raise ConvertError(f"unsupported GGUF tensors: {', '.join(unknown[:4])}")
        for tensor in self._reader.tensors:
            if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
                raise ConvertError(
                    f"tensor {tensor.name} has quantization {tensor.tensor_type.name}, which is not "
                    f"supported; supported: {', '.join(q.name for q in SUPPORTED_QUANT_TYPES)}"
                )

    def names(self) -> set[str]:
        return {hf for hf, name in self._gguf_names.items() if name in self._tensors}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[self._gguf_names[name]].shape))

    def read(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        """The tensor dequantized to float32, or its rows [rows) / columns [cols) only."""
        tensor = self._tensors[self._gguf_names[name]]
        shape = self.shape(name)
        start, stop = rows if rows is not None else (0, shape[0])
        if len(shape) == 2:  # a row is whole quantization blocks: only the asked rows are read
            values = gguf.quants.dequantize(tensor.data[start:stop], tensor.tensor_type)
            values = values.reshape(stop - start, shape[1])
        else:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)[start:stop]
        if any(part in name for part in _PERMUTED.get(self._arch, ())):
            if start % self.spec.head_dim or stop % self.spec.head_dim:
                raise ValueError(f"{name}: rows {rows} do not start and end on a head")
            values = _unpermute(values, (stop - start) // self.spec.head_dim)
        if cols is not None:
            values = values[:, cols[0] : cols[1]]
        return torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the mmap is read-only

    def sha256(self, on_bytes: Callable[[int], None] = lambda n: None) -> str:
        digest = hashlib.sha256()
        with open(self.file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                on_bytes(len(chunk))
        return digest.hexdigest()

    def num_bytes(self) -> int:
        return self.file.stat().st_size

    # ---- the rest of the output ------------------------------------------------------------

    def quantization(self) -> str:
        """The file's quantization as llama.cpp names it (general.file_type), e.g. "Q4_1"."""
        file_type = self._value("general.file_type")
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:  # absent or unknown: the commonest type among the matrices
            counts = collections.Counter(t.tensor_type.name for t in self._reader.tensors if len(t.shape) > 1)
            return counts.most_common(1)[0][0] if counts else "F32"

    def description(self) -> dict:
        """mi_config.json's "source" entry."""
        return {
            "format": "gguf",
            "file": self.file.name,
            "quantization": self.quantization(),
            "tensor_types": dict(
                sorted(collections.Counter(t.tensor_type.name for t in self._reader.tensors).items())
            ),
        }

    def load_tokenizer(self):
        """The tokenizer and chat template rebuilt from the metadata by transformers' GGUF
        conversion (the same one `AutoTokenizer.from_pretrained(dir, gguf_file=...)` uses)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.file.parent), gguf_file=self.file.name)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
            message = " ".join(str(e).split())
            raise ConvertError(f"cannot rebuild the tokenizer from {self.file.name}: {message}") from None
