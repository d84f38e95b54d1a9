"""The reference RMSNorm against Hugging Face's LlamaRMSNorm, bit for bit."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mi.ops.norm import rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_equals_hugging_face(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    hidden = 576
    hf = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden, generator=gen))
    hf = hf.to(dtype)
    x = (torch.randn(rows, hidden, generator=gen) * 4).to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, hf.weight, 1e-5), hf(x))
