"""mi-convert refuses a RoPE variant the workers cannot serve (never at worker start-up)."""

import json

import pytest

from mi.convert import ConvertError, convert
from mi.models.tiny import build_tiny_model


@pytest.mark.parametrize(
    "rope_parameters, message",
    [
        ({"rope_type": "su", "rope_theta": 10000.0}, "unsupported rope_scaling type 'su'"),
        (
            {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0},
            "needs original_max_position_embeddings",
        ),
    ],
)
def test_unservable_rope_is_refused(tmp_path, rope_parameters, message):
    hf_dir = build_tiny_model(tmp_path / "hf")
    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"] = rope_parameters
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConvertError, match=message):
        convert(hf_dir, tmp_path / "mi", 1)
    assert not (tmp_path / "mi").exists()
