"""mi-convert reads the sliding window the way transformers does, per architecture."""

import json

import pytest

from mi.convert import ConvertError, convert
from mi.models.tiny import build_tiny_model


def _model_config(tmp_path, arch, overrides, edit=None):
    hf_dir = build_tiny_model(tmp_path / "hf", arch=arch, overrides=overrides)
    if edit:
        path = hf_dir / "config.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    out = convert(hf_dir, tmp_path / "mi", 1)
    return json.loads((out / "mi_config.json").read_text())["model"]


@pytest.mark.parametrize(
    "arch, overrides, window, layer_types",
    [
        ("mistral", {"sliding_window": 12}, 12, None),  # every layer
        ("mistral", {"sliding_window": None}, None, None),
        # Qwen: the window needs use_sliding_window, and covers the layers from max_window_layers on.
        ("qwen2", {"sliding_window": 12}, None, None),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1},
            12,
            ["full_attention", "sliding_attention"],
        ),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 2}, None, None),
        ("llama", {}, None, None),
    ],
)
def test_window_and_layer_types(tmp_path, arch, overrides, window, layer_types):
    model = _model_config(tmp_path, arch, overrides)
    assert (model["sliding_window"], model["layer_types"]) == (window, layer_types)


def test_layer_types_without_max_window_layers_are_computed(tmp_path):
    def drop_layer_types(config):
        config.pop("layer_types", None)
        return {**config, "max_window_layers": 1}

    overrides = {"use_sliding_window": True, "sliding_window": 12}
    model = _model_config(tmp_path, "qwen2", overrides, edit=drop_layer_types)
    assert model["layer_types"] == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {**c, "layer_types": ["sliding_attention"]}, "layer_types must give each of the 2 layers"),
        (lambda c: {**c, "layer_types": ["x", "y"]}, "layer_types must give each of the 2 layers"),
        (lambda c: {**c, "sliding_window": -3}, "sliding_window must be a positive integer"),
    ],
)
def test_bad_window_config_is_refused(tmp_path, edit, message):
    with pytest.raises(ConvertError, match=message):
        _model_config(tmp_path, "qwen2", {"use_sliding_window": True, "sliding_window": 12}, edit=edit)
