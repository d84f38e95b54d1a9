"""This machine's memory roofline for decoding: fp32 GEMV bandwidth, GEMM peak, and the batch-1
decode rate they allow for a model.

At batch 1 every decoded token reads every weight once (the embedding excepted: one row), so
roofline tok/s = GEMV bandwidth / weight bytes read per token. The bandwidth is a large
matrix-vector product (far beyond the caches), so it is the rate at which torch streams weights
from memory with the threads in use; the GEMM peak is what compute-bound steps (prefill, large
batches) can reach.

Weight bytes come from the safetensors headers of the model directory (HF or converted): every
tensor but the input embedding, counted at the dtype the server computes in (`dtype`), or as
stored. A model without an `lm_head` tensor ties it to the embedding, which is then read in full.
"""

from __future__ import annotations

import json
import statistics
import struct
import time
from pathlib import Path

import torch

_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemv_bandwidth(rows: int = 8192, cols: int = 8192, repeats: int = 20) -> dict:
    """GB/s of `W @ x` with an fp32 [rows, cols] W (default 256 MiB), median of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen)
    x, out = torch.randn(cols, generator=gen), torch.empty(rows)
    seconds = _median_seconds(lambda: torch.mv(weight, x, out=out), repeats)
    num_bytes = weight.numel() * weight.element_size()
    return {
        "rows": rows,
        "cols": cols,
        "bytes": num_bytes,
        "seconds": seconds,
        "gb_per_s": num_bytes / seconds / 1e9,
    }


def gemm_peak(n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of an fp32 [n, n] @ [n, n] product, median of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    seconds = _median_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return {"n": n, "seconds": seconds, "gflop_per_s": 2 * n**3 / seconds / 1e9}


def _tensor_headers(path: Path) -> dict:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def weight_bytes_per_token(model_dir: str | Path, dtype: str = "auto") -> dict:
    """Bytes of weights one batch-1 decode step reads, and the parameter counts behind it."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files (an HF or a converted model directory)")
    tensors = {name: info for path in files for name, info in _tensor_headers(path).items()}
    is_tied = not any(name.endswith("lm_head.weight") for name in tensors)
    num_params = num_read = bytes_read = 0
    for name, info in tensors.items():
        numel = 1
        for dim in info["shape"]:
            numel *= dim
        num_params += numel
        if name.endswith("embed_tokens.weight") and not is_tied:
            continue  # one row per token
        itemsize = _DTYPE_BYTES[dtype] if dtype != "auto" else _ITEMSIZE[info["dtype"]]
        num_read += numel
        bytes_read += numel * itemsize
    return {
        "path": str(model_dir),
        "num_parameters": num_params,
        "num_parameters_read": num_read,
        "bytes_per_token": bytes_read,
        "tied_embeddings": is_tied,
    }


def measured_rates(results: dict) -> list[dict]:
    """Per-request decode rates (1000 / mean TPOT ms) of each point of a results document."""
    rates = []
    for point in results.get("points", []):
        tpot = point["tpot_ms"]["mean"]
        if tpot:
            rates.append(
                {
                    "source": f"{results.get('command', 'results')}: {point['load']['label']}",
                    "tok_s": 1000.0 / tpot,
                }
            )
    return rates


def roofline(
    model_dir: str | Path | None = None,
    *,
    dtype: str = "auto",
    measured: list[dict] = (),
    gemv_size: int = 8192,
    gemm_size: int = 2048,
    repeats: int = 10,
) -> dict:
    """Measure, and when a model is given, the roofline rate and each measured rate's fraction."""
    result = {
        "num_threads": torch.get_num_threads(),
        "gemv": gemv_bandwidth(gemv_size, gemv_size, repeats),
        "gemm": gemm_peak(gemm_size, max(3, repeats // 2)),
    }
    if model_dir is not None:
        model = weight_bytes_per_token(model_dir, dtype)
        rate = result["gemv"]["gb_per_s"] * 1e9 / model["bytes_per_token"]
        result["model"] = model
        result["roofline_tok_s"] = rate
        result["measured"] = [{**m, "fraction_of_roofline": m["tok_s"] / rate} for m in measured]
    return result


def format_roofline(result: dict) -> str:
    gemv, gemm = result["gemv"], result["gemm"]
    lines = [
        f"threads: {result['num_threads']}",
        f"fp32 GEMV bandwidth ({gemv['rows']}x{gemv['cols']}, {gemv['bytes'] / 2**20:.0f} MiB): "
        f"{gemv['gb_per_s']:.2f} GB/s",
        f"fp32 GEMM peak ({gemm['n']}^3): {gemm['gflop_per_s']:.1f} GFLOP/s",
    ]
    if "model" in result:
        model = result["model"]
        lines += [
            f"model: {model['path']} ({model['num_parameters'] / 1e6:.1f} M parameters, "
            f"{model['bytes_per_token'] / 1e6:.1f} MB read per token)",
            f"roofline batch-1 decode: {result['roofline_tok_s']:.1f} tok/s",
        ]
        lines += [
            f"measured {m['source']}: {m['tok_s']:.1f} tok/s = {m['fraction_of_roofline']:.0%} of roofline"
            for m in result["measured"]
        ]
    return "\n".join(lines)
