"""Every RoPE variant against Hugging Face's LlamaRotaryEmbedding, on one sequence generated past
the original context (HF's rotary state carried from the prefill through each decode step)."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mi.ops import rope_scaling, rotary

HEAD_DIM, THETA = 16, 10000.0
HALF = HEAD_DIM // 2
VARIANTS = {
    # name: (rope parameters without rope_theta, max_position_embeddings)
    "default": ({"rope_type": "default"}, 256),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 256),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        256,
    ),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256),
    "yarn_mscale": (
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.8,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        256,
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
            "long_factor": [2.0 + 0.5 * i for i in range(HALF)],
            "original_max_position_embeddings": 64,
        },
        256,
    ),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 64),
}
PROMPT_LEN, NUM_DECODES = 100, 30  # the prompt already runs past every original context


def _hf_steps(params: dict, max_positions: int):
    config = LlamaConfig(
        hidden_size=HEAD_DIM * 2,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        rope_parameters={**params, "rope_theta": THETA},
    )
    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, HEAD_DIM)
    steps = [torch.arange(PROMPT_LEN)] + [
        torch.tensor([p]) for p in range(PROMPT_LEN, PROMPT_LEN + NUM_DECODES)
    ]
    for positions in steps:
        cos, sin = rope(x, positions[None])  # HF updates its dynamic state in this call
        yield positions, torch.stack((cos[0], sin[0]), dim=1)  # [n, 2, D]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_hugging_face_past_the_original_context(name):
    params, max_positions = VARIANTS[name]
    scaling = None if name == "default" else params
    table = rotary.rotary_cos_sin(HEAD_DIM, 512, THETA, scaling, max_position_embeddings=max_positions)
    for positions, want in _hf_steps(params, max_positions):
        if rotary.is_length_dependent(scaling):
            lengths = torch.clamp(positions + 1, min=PROMPT_LEN)  # prompt tokens: the prompt's length
            got = rotary.token_cos_sin(HEAD_DIM, THETA, scaling, max_positions, positions, lengths)
        else:
            got = table[positions]
        # 1e-5: one float32 ulp of an inverse frequency, times a position of ~100 (dynamic's grown
        # theta is a power computed per length); the other variants agree to ~1e-7.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{name} at {positions[:3].tolist()}")


def test_length_dependent_variants_differ_past_the_original_context():
    # Guards the test above: the long regime must be reached, or it would compare default with default.
    for name in ("longrope", "dynamic"):
        params, max_positions = VARIANTS[name]
        short = rotary.rotary_cos_sin(HEAD_DIM, 512, THETA, params, max_position_embeddings=max_positions)
        positions = torch.arange(PROMPT_LEN)
        long = rotary.token_cos_sin(
            HEAD_DIM, THETA, params, max_positions, positions, torch.full((PROMPT_LEN,), PROMPT_LEN)
        )
        assert not torch.allclose(long, short[positions]), name


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "proportional"}, "unsupported rope_scaling type 'proportional'"),
        ({"rope_type": "linear"}, "needs factor"),
        ({"rope_type": "llama3", "factor": 8.0}, "needs original_max_position_embeddings"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 64}, "needs factor"),
        (
            {
                "rope_type": "longrope",
                "short_factor": [1.0] * 3,
                "long_factor": [1.0] * HALF,
                "original_max_position_embeddings": 8,
            },
            "short_factor has 3 values, head_dim 16 needs 8",
        ),
        ({"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unservable_scaling_is_refused(scaling, message):
    with pytest.raises(ValueError, match=message):
        rope_scaling.check_rope_scaling(scaling, HEAD_DIM)


def test_the_old_type_key_is_understood():
    assert rope_scaling.rope_type({"type": "linear", "factor": 2.0}) == "linear"
    assert rope_scaling.rope_type(None) == "default"
