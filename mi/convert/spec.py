"""Read a Hugging Face checkpoint's config.json into a frozen `ModelSpec`.

Only plain JSON is read (never `AutoConfig`, never remote code). Fields that transformers moved
between versions are accepted in both spellings: `rope_theta` / `rope_scaling` at the top level
(transformers 4) or inside `rope_parameters` (transformers 5); `torch_dtype` or `dtype`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from mi.ops.rope_scaling import check_rope_scaling


class ConvertError(ValueError):
    """A checkpoint or an option that the converter refuses; the message is one line."""


# HF `architectures[0]` -> our architecture name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {arch: hf for hf, arch in SUPPORTED_ARCHITECTURES.items()}  # config model_type


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    hf_architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # HF rope scaling dict ("rope_type", "factor", ...), or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections have biases (qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k (qwen3)
    sliding_window: int | None
    layer_types: list[str] | None  # per layer "sliding_attention" / "full_attention"; None: all alike
    bos_token_id: int | None
    eos_token_ids: list[int]
    source_dtype: str | None  # from config.json, None when it does not say
    model_name: str


def read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} does not hold a JSON object")
    return data


def _hf_architecture(config: dict) -> str:
    names = list(config.get("architectures") or [])
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    model_type = config.get("model_type")
    if not names and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    found = ", ".join(names) or f"model_type={model_type!r}"
    raise ConvertError(f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _int(config: dict, key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConvertError(f"config.json: {key} must be a positive integer (got {value!r})")
    return value


def _float(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConvertError(f"config.json: {key} must be a positive number (got {value!r})")
    return float(value)


def _sliding_window(config: dict, architecture: str, num_layers: int) -> tuple[int | None, list[str] | None]:
    """(window, per-layer types or None for all layers) as transformers reads them: Mistral's
    `sliding_window` covers every layer; Qwen's only with `use_sliding_window`, on the layers
    from `max_window_layers` on, unless the config lists `layer_types`."""
    window = config.get("sliding_window")
    if architecture in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
        window = None
    if architecture not in ("mistral", "qwen2", "qwen3") or window is None:
        return None, None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConvertError(f"config.json: sliding_window must be a positive integer (got {window!r})")
    layer_types = config.get("layer_types")
    if layer_types is None and architecture != "mistral":
        first = config.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if layer_types is not None:
        if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
            raise ConvertError(
                f"config.json: layer_types must give each of the {num_layers} layers a known type"
            )
        if "sliding_attention" not in layer_types:
            return None, None
    return window, layer_types


def _rope(config: dict) -> tuple[float, dict | None]:
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and not isinstance(scaling, dict):
        raise ConvertError(f"config.json: rope_scaling must be an object (got {scaling!r})")
    return _float(theta, "rope_theta"), scaling


def _first(gen: dict, config: dict, key: str):
    """generation_config.json wins over config.json (as in HF generate)."""
    return gen[key] if gen.get(key) is not None else config.get(key)


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConvertError(f"token ids must be integers (got {value!r})")
    return ids


def read_spec(path: pathlib.Path, tensor_names: set[str]) -> ModelSpec:
    """Build the spec from `path`/config.json (+ generation_config.json) and the tensor names."""
    config = read_json(path / "config.json")
    hf_architecture = _hf_architecture(config)
    architecture = SUPPORTED_ARCHITECTURES[hf_architecture]
    if config.get("quantization_config"):
        raise ConvertError("quantized checkpoints are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"unsupported hidden_act {config['hidden_act']!r} (only silu)")
    if config.get("mlp_bias"):
        raise ConvertError("unsupported: mlp_bias")
    if "model.layers.0.self_attn.o_proj.bias" in tensor_names:
        raise ConvertError("unsupported: o_proj bias")

    gen_path = path / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else {}
    hidden_size = _int(config, "hidden_size")
    num_heads = _int(config, "num_attention_heads")
    num_kv_heads = _int(config, "num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise ConvertError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
        )
    rope_theta, rope_scaling = _rope(config)
    head_dim = _int(config, "head_dim", hidden_size // num_heads)
    try:  # refused here, not when the workers start
        check_rope_scaling(rope_scaling, head_dim)
    except ValueError as exc:
        raise ConvertError(f"config.json: {exc}") from None
    dtype = config.get("torch_dtype", config.get("dtype"))
    window, layer_types = _sliding_window(config, architecture, _int(config, "num_hidden_layers"))
    return ModelSpec(
        architecture=architecture,
        hf_architecture=hf_architecture,
        vocab_size=_int(config, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_int(config, "intermediate_size"),
        num_hidden_layers=_int(config, "num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(config.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_int(config, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=(
            bool(config.get("attention_bias", architecture == "qwen2"))
            or "model.layers.0.self_attn.q_proj.bias" in tensor_names
        ),
        qk_norm=architecture == "qwen3",
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=(_token_ids(_first(gen, config, "bos_token_id")) or [None])[0],
        eos_token_ids=_token_ids(_first(gen, config, "eos_token_id")),
        source_dtype=dtype if isinstance(dtype, str) else None,
        model_name=_model_name(path),
    )


def _model_name(path: pathlib.Path) -> str:
    """The directory's name; for a hub cache `models--org--name/snapshots/<rev>`, `org/name`."""
    path = path.resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return path.name
