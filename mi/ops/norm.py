import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back before the weight multiply (the order HF Llama uses, so
    outputs match it bit for bit)."""
    if x.dtype == weight.dtype == torch.float32:
        # torch's own op: the same values (tests/unit/test_norm.py) in one dispatch instead of six.
        # Not for half precision: it multiplies by the weight before rounding, HF after.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    input_dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(input_dtype)
