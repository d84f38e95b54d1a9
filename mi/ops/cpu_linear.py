"""Linear layers in oneDNN's packed weight layout, for serving on CPU.

On CPU the forward pass is nearly all matrix products against weights that are read once per
step, so their speed is the server's speed. torch's `F.linear` on CPU (MKL, weight [out, in])
reaches about half the memory bandwidth for one row and far less for 2-32 rows, the decode batch
sizes, where it neither streams the weight at memory speed nor reaches compute peak. oneDNN
reading a weight it has reordered once at load time into its blocked layout streams it at the
memory roofline for one row and holds that up to ~8 rows (benchmarks/bench_cpu_linear.py has the
figures). torch ships the two operators inductor uses for the same purpose
(`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`), so this costs no dependency.

Results differ from `F.linear` by float32 rounding only (another summation order).

oneDNN builds (and caches) one primitive per input row count, each ~2 ms to create and ~1-2 MB
to keep, and the cache holds 1,024 of them. A server's steps have every row count from 1 to the
token budget, so with exact counts memory grew by hundreds of MB under load and small models paid
the creation cost on most steps. Inputs are therefore padded with zero rows to a bucket
(`row_bucket`): exact up to 32 rows, where decode lives and a row costs almost nothing, then 16
buckets per doubling, so at most 1/16 of a step's rows are padding and the whole server uses
about 130 primitives per weight shape up to 2,048 rows.

The packed tensor is opaque (no storage, no views, not a state_dict entry): a packed model is
for inference only, and a tied LM head gets its own packed copy of the embedding.
"""

import torch
from torch import nn

_SUPPORTED_DTYPES = (torch.float32,)
_EXACT_ROWS = 32
_BUCKETS_PER_DOUBLING_LOG2 = 4  # 16 buckets between m and 2m


def row_bucket(rows: int) -> int:
    """The row count oneDNN is called with for `rows` input rows (>= rows)."""
    if rows <= _EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 1 - _BUCKETS_PER_DOUBLING_LOG2)
    return -(-rows // step) * step


def packing_available() -> bool:
    """Whether this torch build has oneDNN and the packed-linear operators."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in _SUPPORTED_DTYPES and packing_available()


class PackedLinear(nn.Module):
    """y = x @ weight.T + bias with the weight in oneDNN's layout; same call as nn.Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if not can_pack(weight):
            raise ValueError(f"cannot pack a {weight.dtype} weight on {weight.device} for oneDNN")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        padded_rows = row_bucket(rows)
        if padded_rows == rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        flat = x.reshape(rows, self.in_features)
        padded = torch.nn.functional.pad(flat, (0, 0, 0, padded_rows - rows))
        y = torch.ops.mkldnn._linear_pointwise(padded, self.packed_weight, self.bias, "none", [], "")
        return y[:rows].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear below `module` whose weight can be packed by a PackedLinear, in
    place; returns how many were replaced. The unpacked weights are released."""
    replaced = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and can_pack(child.weight):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                replaced += 1
    return replaced
