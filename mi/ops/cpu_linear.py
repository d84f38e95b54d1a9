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

The packed tensor is opaque (no storage, no views, not a state_dict entry): a packed model is
for inference only, and a tied LM head gets its own packed copy of the embedding.
"""

import torch
from torch import nn

_SUPPORTED_DTYPES = (torch.float32,)


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
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

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
