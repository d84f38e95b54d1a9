"""Convert a Hugging Face checkpoint or a GGUF file into `tp` rank files plus mi_config.json
(docs/format.md).

Invariants:
- All checks (config, tp, every tensor's presence and shape) run before anything is written.
- Output is built in a sibling `OUT.partial-<random>` directory, mi_config.json last, and renamed
  into place only when complete; on any failure that directory is removed. With `force`, an old
  OUT is replaced only after the new one is complete.
- Memory: one output tensor at a time (its source slices, its dtype-converted copy); source
  files are memory-mapped and read slice by slice, output files are streamed (writer.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import sys

import torch
from tqdm import tqdm

from mi.convert.gguf_source import GgufSource, find_gguf_file
from mi.convert.sharding import (
    TP_CHOICES,
    ShardTensor,
    check_tp,
    check_tp_choice,
    padded_vocab_size,
    rank_plan,
    source_shapes,
)
from mi.convert.source import WeightSource
from mi.convert.spec import SUPPORTED_ARCHITECTURES, ConvertError, ModelSpec, read_json, read_spec
from mi.convert.writer import write_safetensors

FORMAT_VERSION = 1
MI_CONFIG = "mi_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
# Copied verbatim from the source directory (tokenizer, chat template, generation defaults).
AUX_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "*.jinja",
    "chat_template.json",
    "generation_config.json",
)


def rank_file(rank: int) -> str:
    return f"rank-{rank}.safetensors"


def convert(
    path, out, tp: int, force: bool = False, dtype: str = "auto", progress: bool = True
) -> pathlib.Path:
    """Convert the HF checkpoint in `path` into `out` for `tp` ranks; return `out`.

    Raises ConvertError (a ValueError) with a one-line message on anything it refuses.
    """
    src, out = pathlib.Path(path), pathlib.Path(os.path.abspath(out))
    check_tp_choice(tp)
    if dtype not in DTYPE_CHOICES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)} (got {dtype!r})")
    gguf_file = find_gguf_file(src)
    if gguf_file is None and not src.is_dir():
        raise ConvertError(f"--path {src}: no such file or directory")
    if gguf_file is None and not (src / "config.json").is_file():
        raise ConvertError(f"--path {src}: no config.json and no .gguf file")
    if out.resolve() == src.resolve():
        raise ConvertError("--out must differ from --path")
    if _is_nonempty(out) and not force:
        raise ConvertError(f"--out {out} exists and is not empty (use --force to replace it)")

    if gguf_file is not None:
        source = GgufSource(gguf_file)
        spec = source.spec
    else:
        source = WeightSource(src)
        spec = read_spec(src, source.names())
    check_tp(spec, tp)
    # Built before any weight is written (it can fail), saved with the other aux files.
    tokenizer = source.load_tokenizer() if gguf_file is not None else None
    _check_tensors(spec, source)
    target = DTYPES[_resolve_dtype(dtype, spec, source)]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_ranks(spec, source, tp, target, tmp, progress)
        with tqdm(
            total=source.num_bytes(),
            unit="B",
            unit_scale=True,
            desc="sha256",
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            checksum = source.sha256(bar.update)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            _copy_aux_files(src, tmp)
        config = _mi_config(spec, tp, target, checksum)
        if gguf_file is not None:
            config["source"] = source.description()
        (tmp / MI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")  # NOTE: last file
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_mi_config(out) -> dict:
    """Read and validate `out`/mi_config.json (raises ConvertError)."""
    out = pathlib.Path(out)
    path = out / MI_CONFIG
    if not path.is_file():
        raise ConvertError(f"{out} is not a converted model (no {MI_CONFIG})")
    config = read_json(path)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ConvertError(
            f"{path}: format_version {version!r} is not supported "
            f"(this mi reads {FORMAT_VERSION}); convert the model again"
        )
    if config.get("architecture") not in SUPPORTED_ARCHITECTURES.values():
        raise ConvertError(f"{path}: unknown architecture {config.get('architecture')!r}")
    tp = config.get("tp")
    if not isinstance(config.get("model"), dict) or tp not in TP_CHOICES:
        raise ConvertError(f"{path}: malformed (model / tp)")
    missing = [rank_file(r) for r in range(tp) if not (out / rank_file(r)).is_file()]
    if missing:
        raise ConvertError(f"{out}: missing {', '.join(missing)}")
    return config


def _is_nonempty(path: pathlib.Path) -> bool:
    if not path.exists():
        return False
    return not path.is_dir() or any(path.iterdir())


def _check_tensors(spec: ModelSpec, source: WeightSource | GgufSource) -> None:
    names = source.names()
    for name, shape in source_shapes(spec).items():
        if name not in names:
            raise ConvertError(f"missing tensor {name} in the weight files")
        if source.shape(name) != shape:
            raise ConvertError(
                f"tensor {name} has shape {list(source.shape(name))}, config.json implies {list(shape)}"
            )


def _resolve_dtype(dtype: str, spec: ModelSpec, source: WeightSource | GgufSource) -> str:
    if dtype != "auto":
        return dtype
    if spec.source_dtype in DTYPES:
        return spec.source_dtype
    found = str(source.dtype("model.embed_tokens.weight")).removeprefix("torch.")
    if found not in DTYPES:
        raise ConvertError(f"source dtype {found} is not supported; pass --dtype ({', '.join(DTYPES)})")
    return found


def _materialize(shard: ShardTensor, source: WeightSource | GgufSource, dtype: torch.dtype) -> torch.Tensor:
    parts = [source.read(p.name, p.rows, p.cols).to(dtype) for p in shard.pieces]
    if shard.pad_rows:
        parts.append(torch.zeros((shard.pad_rows, *shard.shape[1:]), dtype=dtype))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _write_ranks(
    spec: ModelSpec,
    source: WeightSource | GgufSource,
    tp: int,
    dtype: torch.dtype,
    tmp: pathlib.Path,
    progress: bool,
) -> None:
    plans = [rank_plan(spec, tp, rank) for rank in range(tp)]
    total = sum(len(plan) for plan in plans)
    with tqdm(total=total, unit="tensor", desc="mi-convert", file=sys.stderr, disable=not progress) as bar:
        for rank, plan in enumerate(plans):
            by_name = {shard.name: shard for shard in plan}
            write_safetensors(
                tmp / rank_file(rank),
                [(shard.name, shard.shape) for shard in plan],
                dtype,
                lambda name: _materialize(by_name[name], source, dtype),  # noqa: B023 - called before the next rank
                metadata={
                    "format": "pt",
                    "mi_format_version": str(FORMAT_VERSION),
                    "rank": str(rank),
                    "tp": str(tp),
                },
                on_tensor=lambda: bar.update(1),
            )


def _copy_aux_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    for pattern in AUX_FILE_PATTERNS:
        for file in src.glob(pattern):
            if file.is_file():
                shutil.copyfile(file, dst / file.name)


def _mi_config(spec: ModelSpec, tp: int, dtype: torch.dtype, checksum: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "architecture": spec.architecture,
        "hf_architecture": spec.hf_architecture,
        "tp": tp,
        "dtype": str(dtype).removeprefix("torch."),
        "source_sha256": checksum,
        "model": {
            "vocab_size": spec.vocab_size,
            "padded_vocab_size": padded_vocab_size(spec.vocab_size, tp),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_key_value_heads,
            "head_dim": spec.head_dim,
            "rms_norm_eps": spec.rms_norm_eps,
            "rope_theta": spec.rope_theta,
            "rope_scaling": spec.rope_scaling,
            "max_position_embeddings": spec.max_position_embeddings,
            "sliding_window": spec.sliding_window,
            "layer_types": spec.layer_types,
            "tie_word_embeddings": spec.tie_word_embeddings,
            "attention_bias": spec.attention_bias,
            "qk_norm": spec.qk_norm,
            "bos_token_id": spec.bos_token_id,
            "eos_token_ids": spec.eos_token_ids,
            "model_name": spec.model_name,
        },
    }


def _install(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Move the finished `tmp` to `out`, replacing what is there (callers checked --force)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
