"""Lazy, slice-wise access to a Hugging Face checkpoint's weight files.

Which files: the shards named by `model.safetensors.index.json`, else `model.safetensors`, else
every `*.safetensors`; only when there is no safetensors file, the same rule for
`pytorch_model*.bin` (loaded with `torch.load(weights_only=True, mmap=True)`).

Memory: `read()` returns only the requested rows or columns; safetensors files are memory-mapped
and a slice reads only its own bytes, so the resident set stays near the size of one tensor.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable

import torch
from safetensors import safe_open

from mi.convert.spec import ConvertError, read_json

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

Span = tuple[int, int]  # [start, stop)


def _weight_files(path: pathlib.Path, pattern: str, single: str, index: str) -> list[pathlib.Path]:
    index_path = path / index
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index_path} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"missing weight files listed in {index}: {', '.join(missing)}")
        return files
    if (path / single).is_file():
        return [path / single]
    return sorted(p for p in path.glob(pattern) if p.is_file())


class WeightSource:
    """Tensor name -> lazily read tensor, over all weight files of one checkpoint."""

    def __init__(self, path: pathlib.Path):
        self.files = _weight_files(path, "*.safetensors", "model.safetensors", "model.safetensors.index.json")
        self._is_safetensors = bool(self.files)
        if not self.files:
            self.files = _weight_files(
                path, "pytorch_model*.bin", "pytorch_model.bin", "pytorch_model.bin.index.json"
            )
        if not self.files:
            raise ConvertError(f"no weight files (*.safetensors or pytorch_model*.bin) in {path}")
        self._owner: dict[str, object] = {}  # name -> safe_open handle or state dict
        for file in self.files:
            handle = self._open(file)
            for name in handle.keys():
                self._owner.setdefault(name, handle)

    def _open(self, file: pathlib.Path):
        try:
            if self._is_safetensors:
                return safe_open(str(file), framework="pt", device="cpu")
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
            raise ConvertError(f"corrupt or truncated weight file {file.name}: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConvertError(f"{file.name} does not hold a flat dict of tensors")
        return state

    def names(self) -> set[str]:
        return set(self._owner)

    def shape(self, name: str) -> tuple[int, ...]:
        owner = self._owner[name]
        if isinstance(owner, dict):
            return tuple(owner[name].shape)
        return tuple(owner.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        owner = self._owner[name]
        if isinstance(owner, dict):
            return owner[name].dtype
        code = owner.get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ConvertError(f"tensor {name} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def read(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        """The tensor, or its rows [rows) / columns [cols) only."""
        owner = self._owner[name]
        tensor = owner[name] if isinstance(owner, dict) else owner.get_slice(name)
        if rows is not None:
            return tensor[rows[0] : rows[1]]
        if cols is not None:
            return tensor[:, cols[0] : cols[1]]
        return tensor[:]

    def sha256(self, on_bytes: Callable[[int], None] = lambda n: None) -> str:
        """sha256 over the bytes of the weight files, concatenated in sorted name order."""
        digest = hashlib.sha256()
        for file in sorted(self.files, key=lambda f: f.name):
            with open(file, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    on_bytes(len(chunk))
        return digest.hexdigest()

    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)
