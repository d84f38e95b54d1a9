"""Write a .safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; here the header is computed
from the declared shapes first and each tensor is produced, written and dropped in turn, so
memory stays at one tensor. The layout is the standard one (readable by `safe_open`):

  u64 little-endian N | N bytes of JSON header, space-padded to 8 | tensor bytes, in header order
"""

from __future__ import annotations

import json
import pathlib
import struct
import sys
from collections.abc import Callable, Iterable

import torch

_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(
    path: pathlib.Path,
    entries: Iterable[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[], None] = lambda: None,
) -> None:
    """Write tensors named and shaped by `entries` (all `dtype`); `produce(name)` makes each."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; big-endian hosts unsupported")
    entries = list(entries)
    item_size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape in entries:
        num_bytes = item_size * _numel(shape)
        header[name] = {
            "dtype": _DTYPE_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + num_bytes],
        }
        offset += num_bytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(
                    f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(shape)} {dtype}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            on_tensor()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
