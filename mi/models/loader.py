"""Build a CausalLM for one rank from a converted checkpoint (docs/format.md)."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from mi.convert import load_mi_config
from mi.models.llama import CausalLM, ModelConfig
from mi.models.parallel import TensorParallel


def load_model(
    model_dir: str | Path, tp: TensorParallel, device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Loads only this rank's file; weights are assigned (not copied) into the modules."""
    config = load_mi_config(model_dir)
    if config["tp"] != tp.size:
        raise ValueError(f"checkpoint was converted for tp={config['tp']}, worker group has {tp.size}")
    cfg = ModelConfig.from_mi_config(config["model"])
    with torch.device("meta"):
        model = CausalLM(cfg, tp)
    state = load_file(str(Path(model_dir) / f"rank-{tp.rank}.safetensors"), device=str(device))
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
