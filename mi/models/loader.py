"""Build a CausalLM for one rank from a converted checkpoint (docs/format.md)."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mi.models.llama import CausalLM, ModelConfig
from mi.models.parallel import TensorParallel

SUPPORTED_FORMAT_VERSION = 1


def read_mi_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "mi_config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} is not a converted model (no mi_config.json); run mi-convert first")
    config = json.loads(path.read_text())
    if config.get("format_version") != SUPPORTED_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {config.get('format_version')!r} is not supported "
                         f"(expected {SUPPORTED_FORMAT_VERSION}); re-run mi-convert")
    return config


def load_model(model_dir: str | Path, tp: TensorParallel, device: torch.device,
               dtype: torch.dtype) -> CausalLM:
    """Loads only this rank's file; weights are assigned (not copied) into the modules."""
    config = read_mi_config(model_dir)
    if config["tp"] != tp.size:
        raise ValueError(f"checkpoint was converted for tp={config['tp']}, worker group has {tp.size}")
    cfg = ModelConfig.from_mi_config(config["model"])
    with torch.device("meta"):
        model = CausalLM(cfg, tp)
    state = load_file(str(Path(model_dir) / f"rank-{tp.rank}.safetensors"), device=str(device))
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
