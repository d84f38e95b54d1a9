"""Build a CausalLM for one rank from a converted checkpoint (docs/format.md)."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from mi.convert import load_mi_config
from mi.models.llama import CausalLM, ModelConfig
from mi.models.parallel import TensorParallel
from mi.ops.cpu_linear import can_pack

CPU_LINEAR_KINDS = ("onednn", "torch")


def load_model(
    model_dir: str | Path,
    tp: TensorParallel,
    device: torch.device,
    dtype: torch.dtype,
    cpu_linear: str = "onednn",
) -> CausalLM:
    """Loads only this rank's file; weights are assigned (not copied) into the modules.

    On CPU in float32, `cpu_linear="onednn"` (the default) repacks the linear weights for oneDNN
    (mi/ops/cpu_linear.py); "torch" keeps nn.Linear (the baseline the packing is measured against).
    """
    if cpu_linear not in CPU_LINEAR_KINDS:
        raise ValueError(f"cpu_linear must be one of {', '.join(CPU_LINEAR_KINDS)}, got {cpu_linear!r}")
    config = load_mi_config(model_dir)
    if config["tp"] != tp.size:
        raise ValueError(f"checkpoint was converted for tp={config['tp']}, worker group has {tp.size}")
    cfg = ModelConfig.from_mi_config(config["model"])
    with torch.device("meta"):
        model = CausalLM(cfg, tp)
    state = load_file(str(Path(model_dir) / f"rank-{tp.rank}.safetensors"), device=str(device))
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if cpu_linear == "onednn" and device.type == "cpu" and can_pack(model.embed_tokens.weight):
        model.pack_for_cpu()
    return model.eval()
