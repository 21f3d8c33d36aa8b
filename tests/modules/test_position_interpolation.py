"""Linear position interpolation: the factor rule, reading HF configs, and the scaled RoPE module."""

import math

import pytest
import torch
from torchtune.modules import RotaryPositionalEmbeddings

from longlora_tune.hf.base import HFBaseModel
from longlora_tune.modules.position_interpolation import position_interpolation_factor
from longlora_tune.modules.rope_config import RopeScaling
from longlora_tune.modules.rope_scaling import LinearScaledRotaryPositionalEmbeddings


@pytest.mark.parametrize(
    "target, factor",
    [(4096, 1), (4000, 1), (4097, 2), (8192, 2), (16384, 4), (32768, 8), (65536, 16), (100_000, 25)],
)
def test_factor_table(target, factor):
    assert position_interpolation_factor(target) == factor
    assert isinstance(position_interpolation_factor(target), float)


def test_existing_factor_kept_when_it_covers_the_target_and_replaced_otherwise():
    # A 32k model (factor 8) trained further at 8k keeps 8 (LongLoRA #81).
    assert position_interpolation_factor(8192, 4096, existing_factor=8) == 8
    # Extending it to 64k needs 16 against the unscaled 4096 context (not 8 * 2 or 2).
    assert position_interpolation_factor(65536, 4096, existing_factor=8) == 16
    # A fractional existing factor that already covers the target is kept as is.
    assert position_interpolation_factor(8000, 4096, existing_factor=2.5) == 2.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_len=0),
        dict(target_len=-5),
        dict(target_len=8192.0),
        dict(target_len=True),
        dict(target_len=8192, original_len=0),
        dict(target_len=8192, existing_factor=0.5),
        dict(target_len=8192, existing_factor=float("nan")),
        dict(target_len=8192, existing_factor="2"),
    ],
)
def test_factor_rejects_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        position_interpolation_factor(**kwargs)


@pytest.mark.parametrize(
    "config, factor",
    [
        ({}, 1.0),
        ({"rope_scaling": None}, 1.0),
        ({"rope_scaling": {"type": "linear", "factor": 8.0}}, 8.0),
        ({"rope_scaling": {"rope_type": "linear", "factor": 4}}, 4.0),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, 1.0),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, 2.0),
        (
            {
                "rope_scaling": {"type": "linear", "factor": 4.0},
                "rope_parameters": {"rope_type": "linear", "factor": 4.0},
            },
            4.0,
        ),
    ],
)
def test_factor_from_hf_config(config, factor):
    assert RopeScaling.from_hf_config(config).factor == factor


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_scaling": {"type": "linear"}}, "has no factor"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, ">= 1"),
        ({"rope_scaling": "linear"}, "must be an object or null"),
        (
            {
                "rope_scaling": {"type": "linear", "factor": 2},
                "rope_parameters": {"rope_type": "linear", "factor": 4},
            },
            "describe different RoPE scalings",
        ),
    ],
)
def test_factor_from_hf_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        RopeScaling.from_hf_config(config)


@pytest.mark.parametrize(
    "entry",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 8192,
            }
        },  # fmt: skip
    ],
)
def test_linear_factor_of_a_checkpoint_refuses_other_methods(tmp_path, entry):
    base = HFBaseModel(tmp_path, {"max_position_embeddings": 65_536, **entry}, ())
    with pytest.raises(ValueError, match="continues only from unscaled or linear"):
        _ = base.rope_scaling_factor


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float, factor: float) -> torch.Tensor:
    """float64 RoPE on torchtune's interleaved pairs (x[2i], x[2i+1]) at positions / factor."""
    x = x.double()
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angle = (positions.double() / factor)[:, None] * inv_freq[None, :]  # [s, d/2]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


@pytest.mark.parametrize("factor", [1.0, 4.0, 25.0, 2.5])
def test_scaled_rope_matches_float64_reference(factor):
    torch.manual_seed(0)
    rope = LinearScaledRotaryPositionalEmbeddings(dim=16, max_seq_len=64, base=500, scaling_factor=factor)
    x = torch.randn(2, 64, 3, 16)
    expected = _rope_reference(x, torch.arange(64), 500, factor)
    torch.testing.assert_close(rope(x).double(), expected, atol=2e-5, rtol=0)
    # Explicit positions (packed samples) use the same scaled cache.
    pos = torch.tensor([[5, 6, 7, 0, 1, 2, 3, 4]] * 2)
    y = torch.randn(2, 8, 3, 16)
    ref = torch.stack([_rope_reference(y[i : i + 1], pos[i], 500, factor)[0] for i in range(2)])
    torch.testing.assert_close(rope(y, input_pos=pos).double(), ref, atol=2e-5, rtol=0)


def test_factor_one_is_torchtune_rope_and_scaled_position_equals_integer_position():
    x = torch.randn(1, 32, 2, 8)
    plain = RotaryPositionalEmbeddings(dim=8, max_seq_len=32)
    torch.testing.assert_close(LinearScaledRotaryPositionalEmbeddings(dim=8, max_seq_len=32)(x), plain(x))
    # With factor 4, position 4m must be rotated exactly like position m of plain RoPE.
    scaled = LinearScaledRotaryPositionalEmbeddings(dim=8, max_seq_len=128, scaling_factor=4)
    torch.testing.assert_close(scaled.cache[0::4][:32], plain.cache, atol=1e-6, rtol=0)
    assert not math.isclose(scaled.cache[1, 1, 0].item(), plain.cache[1, 1, 0].item())


def test_meta_init_then_rope_init_rebuilds_the_scaled_cache():
    reference = LinearScaledRotaryPositionalEmbeddings(dim=16, max_seq_len=64, scaling_factor=8)
    with torch.device("meta"):
        rope = LinearScaledRotaryPositionalEmbeddings(dim=16, max_seq_len=64, scaling_factor=8)
    assert rope.cache.is_meta
    rope.to_empty(device="cpu")
    with torch.device("cpu"):
        rope.rope_init()
    torch.testing.assert_close(rope.cache, reference.cache, atol=0, rtol=0)
    assert rope.scaling_factor == 8.0
    assert rope.state_dict() == {}  # nothing persistent: checkpoints are unaffected


@pytest.mark.parametrize("bad", [0, 0.5, -1, float("inf"), None, True])
def test_scaled_rope_rejects_bad_factor(bad):
    with pytest.raises(ValueError, match="scaling_factor"):
        LinearScaledRotaryPositionalEmbeddings(dim=8, scaling_factor=bad)
