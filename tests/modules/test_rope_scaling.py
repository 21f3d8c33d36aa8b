"""RoPE extension methods against transformers' rotary embeddings, and the RopeScaling config entry point."""

import json
import math
import warnings

import pytest
import torch
from torchtune.models.llama3_1 import Llama3ScaledRoPE

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.rope_config import RopeScaling
from longlora_tune.modules.rope_scaling import (
    LinearScaledRotaryPositionalEmbeddings,
    Llama3ScaledRotaryPositionalEmbeddings,
    YaRNScaledRotaryPositionalEmbeddings,
    yarn_attention_factor,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding  # noqa: E402

# Published config.json RoPE settings (model cards), written the way those files spell them.
LLAMA3_1 = {
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
LLAMA3_1_ROPE = RopeScaling("llama3", 8.0, 8192, 5e5, 131072)
QWEN2_5_128K = {
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}


def _shape(head_dim: int, heads: int = 2) -> dict:
    return dict(
        hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim
    )


def _hf_tables(config, positions: int, rotary_cls=LlamaRotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin for positions 0..positions-1, first half of the head (the rest repeats it)."""
    rotary = rotary_cls(config)
    x = torch.zeros(1, 1, dtype=torch.float32)
    cos, sin = rotary(x, torch.arange(positions)[None])
    half = cos.shape[-1] // 2
    torch.testing.assert_close(cos[..., :half], cos[..., half:], atol=0, rtol=0)
    return cos[0, :, :half], sin[0, :, :half]


def _assert_tables_equal(module, cos, sin, atol=1e-6):
    assert module.cache.shape[0] == cos.shape[0]
    torch.testing.assert_close(module.cache[..., 0], cos, atol=atol, rtol=0)
    torch.testing.assert_close(module.cache[..., 1], sin, atol=atol, rtol=0)


def _hf_config(config_cls, head_dim: int, written: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers must accept our dict without complaint
        return config_cls(**_shape(head_dim), **written)


YARN_CASES = [
    # (factor, original, head_dim, theta, extra yarn keys)
    (2.0, 64, 16, 1e6, {}),
    (4.0, 64, 32, 1e6, {}),
    (8.0, 128, 32, 10000.0, {}),
    (16.0, 32, 64, 500000.0, {}),
    (4.0, 64, 32, 1e6, {"beta_fast": 16.0, "beta_slow": 2.0}),
    (4.0, 64, 32, 1e6, {"truncate": False}),
    (4.0, 64, 32, 1e6, {"attention_factor": 1.0}),
    (4.0, 64, 32, 1e6, {"mscale": 1.0, "mscale_all_dim": 0.707}),
    (3.0, 64, 8, 10000.0, {}),  # a ramp collapsed to one point (low == high)
]


@pytest.mark.parametrize("factor, original, head_dim, theta, extra", YARN_CASES)
def test_yarn_tables_equal_transformers(factor, original, head_dim, theta, extra):
    rope = RopeScaling(
        rope_type="yarn", factor=factor, original_max_position_embeddings=original, rope_theta=theta, **extra
    )
    hf_config = _hf_config(transformers.Qwen2Config, head_dim, rope.to_hf_config())
    assert hf_config.rope_parameters["rope_type"] == "yarn"
    positions = 4 * original
    module = rope.build_module(head_dim, positions)
    assert isinstance(module, YaRNScaledRotaryPositionalEmbeddings)
    _assert_tables_equal(module, *_hf_tables(hf_config, positions, Qwen2RotaryEmbedding))
    # The attention factor really is in the table (magnitude of each (cos, sin) pair).
    magnitude = module.cache.norm(dim=-1)
    torch.testing.assert_close(magnitude, torch.full_like(magnitude, module.yarn_attention_factor))
    if not extra:
        assert module.yarn_attention_factor == pytest.approx(0.1 * math.log(factor) + 1)


def test_yarn_qwen2_5_published_128k_setting_equals_transformers_on_4x_the_original_context():
    rope = RopeScaling.from_hf_config(QWEN2_5_128K)
    assert rope == RopeScaling("yarn", 4.0, 32768, 1e6, beta_fast=32.0, beta_slow=1.0, truncate=True)
    hf_config = transformers.Qwen2Config(**_shape(128), **QWEN2_5_128K)  # Qwen's own spelling
    positions = 4 * 32768
    module = rope.build_module(128, positions)
    _assert_tables_equal(module, *_hf_tables(hf_config, positions, Qwen2RotaryEmbedding))


@pytest.mark.parametrize(
    "factor, original, mpe, head_dim, theta",
    [(8.0, 8192, 131072, 128, 500000.0), (4.0, 64, 512, 32, 500000.0), (16.0, 64, 2048, 16, 10000.0)],
)
def test_llama3_tables_equal_transformers(factor, original, mpe, head_dim, theta):
    rope = RopeScaling(
        "llama3",
        factor,
        original,
        theta,
        max_position_embeddings=mpe,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
    )
    hf_config = _hf_config(transformers.LlamaConfig, head_dim, rope.to_hf_config())
    positions = 4 * original
    module = rope.build_module(head_dim, positions)
    assert isinstance(module, Llama3ScaledRotaryPositionalEmbeddings)
    _assert_tables_equal(module, *_hf_tables(hf_config, positions))
    # Middle frequencies are really blended, so the smooth branch is exercised.
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ratio = base / module.theta
    assert ((ratio > 1.01) & (ratio < factor - 0.01)).any()


def test_llama3_1_published_config_read_and_torchtune_llama3_scaled_rope_agrees():
    rope = RopeScaling.from_hf_config(LLAMA3_1)
    assert rope == RopeScaling("llama3", 8.0, 8192, 500000.0, 131072, 1.0, 4.0)
    ours = rope.build_module(128, 4 * 8192)
    hf_config = transformers.LlamaConfig(**_shape(128), **LLAMA3_1)
    _assert_tables_equal(ours, *_hf_tables(hf_config, 4 * 8192))
    # torchtune's own Llama 3.1 RoPE computes the same table (we keep ours: it takes any factor and is a
    # RotaryPositionalEmbeddings, which apply_longlora's checks and describe() rely on).
    tt = Llama3ScaledRoPE(dim=128, max_seq_len=4 * 8192, base=500000)
    torch.testing.assert_close(tt.cache, ours.cache, atol=1e-6, rtol=0)


@pytest.mark.parametrize("factor", [1.0, 4.0, 25.0, 2.5])
def test_linear_tables_equal_transformers(factor):
    rope = RopeScaling("linear", factor, 64, 10000.0)
    hf_config = _hf_config(transformers.LlamaConfig, 32, rope.to_hf_config())
    module = rope.build_module(32, 4 * 64 * 8)
    assert isinstance(module, LinearScaledRotaryPositionalEmbeddings)
    _assert_tables_equal(module, *_hf_tables(hf_config, 4 * 64 * 8))


def test_linear_table_equals_transformers_at_large_positions():
    # 25 is not a power of two, so dividing positions instead of frequencies would be off by > 1e-5 here.
    rope = RopeScaling("linear", 25.0, 4096, 10000.0)
    hf_config = _hf_config(transformers.LlamaConfig, 128, rope.to_hf_config())
    module = rope.build_module(128, 100_000)
    _assert_tables_equal(module, *_hf_tables(hf_config, 100_000))


@pytest.mark.parametrize(
    "rope",
    [
        RopeScaling("linear", 8.0, 32, 10000.0),
        RopeScaling("yarn", 4.0, 32, 1e6, mscale=1.0, mscale_all_dim=1.0),
        RopeScaling("llama3", 8.0, 32, 500000.0, 512),
    ],
)
def test_meta_device_init_then_rope_init_gives_the_same_tables(rope):
    reference = rope.build_module(16, 256)
    with torch.device("meta"):
        module = rope.build_module(16, 256)
    assert module.cache.is_meta
    module.to_empty(device="cpu")
    with torch.device("cpu"):
        module.rope_init()
    torch.testing.assert_close(module.cache, reference.cache, atol=0, rtol=0)
    assert module.state_dict() == {}


def _rotate(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """torchtune's interleaved-pair rotation of x [b, s, h, d] by cache rows [s, d/2, 2]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    cos, sin = rows[None, :, None, :, 0], rows[None, :, None, :, 1]
    return torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1
    ).flatten(3)


def test_forward_rotates_by_the_scaled_cache_with_and_without_input_pos():
    # The modules only change the cache; forward (incl. input_pos for packed samples) is torchtune's.
    module = RopeScaling("yarn", 4.0, 16, 1e6).build_module(8, 64)
    x = torch.randn(2, 64, 3, 8)
    torch.testing.assert_close(module(x), _rotate(x, module.cache))
    pos = torch.tensor([[3, 4, 5, 0, 1, 2, 60, 7]] * 2)
    torch.testing.assert_close(module(x[:, :8], input_pos=pos), _rotate(x[:, :8], module.cache[pos[0]]))


ROUND_TRIP = [
    RopeScaling(),
    RopeScaling("linear", 8.0, 4096, 10000.0),
    RopeScaling("linear", 2.5, 4096, 10000.0),
    RopeScaling("yarn", 4.0, 32768, 1e6),
    RopeScaling("yarn", 4.0, 64, 1e6, beta_fast=16, beta_slow=2, truncate=False, attention_factor=1.2),
    RopeScaling("yarn", 4.0, 64, 1e6, mscale=1.0, mscale_all_dim=0.5),
    RopeScaling("llama3", 8.0, 8192, 500000.0, 131072),
    RopeScaling("llama3", 16.0, 8192, 500000.0, 262144, 1.0, 4.0),
]


@pytest.mark.parametrize("rope", ROUND_TRIP)
@pytest.mark.parametrize("v5_base", [False, True])
def test_round_trip_through_config_json(rope, v5_base):
    base = {"model_type": "llama", "max_position_embeddings": 999, "rope_theta": 1.0}
    if v5_base:  # a transformers-5 written base config: no top-level rope_theta, rope_parameters instead
        base = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}
    written = json.loads(json.dumps({**base, **rope.to_hf_config(base)}))
    assert RopeScaling.from_hf_config(written) == rope
    assert ("rope_parameters" in written) == v5_base
    if rope.rope_type != "default":
        assert written["rope_scaling"]["type"] == written["rope_scaling"]["rope_type"] == rope.rope_type


@pytest.mark.parametrize("rope", ROUND_TRIP[1:])
@pytest.mark.parametrize("v5_base", [False, True])
def test_transformers_reads_our_config_json_and_computes_our_tables(rope, v5_base, tmp_path):
    head_dim = 16
    base = {"model_type": "llama", **_shape(head_dim), "num_hidden_layers": 1, "vocab_size": 8}
    if v5_base:
        base["rope_parameters"] = {"rope_type": "default", "rope_theta": 5.0}
    else:
        base.update(rope_theta=5.0, max_position_embeddings=7)
    (tmp_path / "config.json").write_text(json.dumps({**base, **rope.to_hf_config(base)}))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.rope_parameters["rope_type"] == rope.rope_type
    assert config.rope_parameters["rope_theta"] == rope.rope_theta
    # transformers' own rope-init function, then its rotary module, on our written config.
    inv_freq, attention = ROPE_INIT_FUNCTIONS[rope.rope_type](config)
    module = rope.build_module(head_dim, 4 * rope.original_max_position_embeddings)
    torch.testing.assert_close(module.theta, inv_freq, atol=0, rtol=0)
    assert getattr(module, "attention_factor", 1.0) == pytest.approx(attention)
    _assert_tables_equal(module, *_hf_tables(config, 4 * rope.original_max_position_embeddings))


def test_yarn_writes_the_context_as_max_position_embeddings():
    # transformers 4.51-4.56 replace the YaRN factor by max_position_embeddings / original.
    written = RopeScaling.from_hf_config(QWEN2_5_128K).to_hf_config()
    assert written["max_position_embeddings"] == 131072
    assert written["rope_scaling"] == {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    assert RopeScaling("linear", 8.0, 4096).to_hf_config()["max_position_embeddings"] == 4096


@pytest.mark.parametrize(
    "config",
    [
        {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}},
        {"rope_scaling": {"type": "linear"}},
        {"rope_scaling": {"type": "linear", "factor": 0.5}},
        {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
        {"rope_scaling": "linear"},
        {
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        },
        {"rope_scaling": {"type": "yarn", "factor": 2.3, "original_max_position_embeddings": 4095}},
    ],
)
def test_unsupported_or_bad_configs_are_one_line_errors(config):
    with pytest.raises(LongLoRAConfigError) as err:
        RopeScaling.from_hf_config(config)
    assert "\n" not in str(err.value)


def test_both_spellings_agreeing_are_accepted_and_rope_theta_is_read_from_either_place():
    v5 = {
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
        "max_position_embeddings": 64,
    }
    assert RopeScaling.from_hf_config(v5) == RopeScaling("yarn", 4.0, 64, 1e6)
    both = {**v5, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    assert RopeScaling.from_hf_config(both) == RopeScaling("yarn", 4.0, 64, 1e6)
    assert RopeScaling.from_hf_config({"rope_theta": 5e5}).rope_theta == 5e5
    assert RopeScaling.from_hf_config({}) == RopeScaling()


@pytest.mark.parametrize(
    "start, target, rope_type, expected",
    [
        # LongLoRA's linear rule is unchanged: max(existing, ceil(target / original)).
        (RopeScaling(), 100_000, None, RopeScaling("linear", 25.0, 4096)),
        (RopeScaling("linear", 8.0, 4096), 8192, None, RopeScaling("linear", 8.0, 4096)),
        (RopeScaling("linear", 8.0, 4096), 65536, "linear", RopeScaling("linear", 16.0, 4096)),
        # Qwen2.5: 32k -> 128k is YaRN 4 (Qwen's recommendation), 256k is YaRN 8.
        (RopeScaling(original_max_position_embeddings=32768, rope_theta=1e6), 131072, "yarn",
         RopeScaling("yarn", 4.0, 32768, 1e6)),
        (RopeScaling("yarn", 4.0, 32768, 1e6), 262144, None, RopeScaling("yarn", 8.0, 32768, 1e6)),
        (RopeScaling("yarn", 4.0, 32768, 1e6), 65536, None, RopeScaling("yarn", 4.0, 32768, 1e6)),
        # Llama 3.1 (factor 8 for 128k) -> 256k: factor 16, context 256k.
        (LLAMA3_1_ROPE, 262144, None, RopeScaling("llama3", 16.0, 8192, 5e5, 262144)),
        (LLAMA3_1_ROPE, 32768, None, LLAMA3_1_ROPE),
        # Llama 3 8B (unscaled 8k) -> 64k with the Llama-3 method.
        (RopeScaling(original_max_position_embeddings=8192, rope_theta=5e5), 65536, "llama3",
         RopeScaling("llama3", 8.0, 8192, 5e5, 65536)),
    ],
)  # fmt: skip
def test_extension_rule(start, target, rope_type, expected):
    assert start.extend(target, rope_type) == expected


@pytest.mark.parametrize(
    "start, rope_type",
    [
        (RopeScaling("llama3", 8.0, 8192, 5e5, 131072), "yarn"),
        (RopeScaling("llama3", 8.0, 8192, 5e5, 131072), "linear"),
        (RopeScaling("yarn", 4.0, 32768, 1e6), "linear"),
        (RopeScaling("linear", 2.0, 4096), "yarn"),
        (RopeScaling("linear", 2.0, 4096), "llama3"),
        (RopeScaling(), "dynamic"),
    ],
)
def test_combinations_transformers_cannot_express_are_refused_in_one_line(start, rope_type):
    with pytest.raises(LongLoRAConfigError, match=r"rope_scaling") as err:
        start.extend(262144, rope_type)
    assert "\n" not in str(err.value)


def test_llama3_extension_keeps_every_dimension_within_the_rotations_seen_in_training():
    # The chosen factor (16 for 256k) is the smallest under which the slowest dimensions turn no further
    # at 256k than they did at 128k with factor 8; 32 (= 256k / 8k) would compress twice as much.
    old = RopeScaling.from_hf_config(LLAMA3_1)
    new = old.extend(262144)
    old_theta, new_theta = old.build_module(128, 1).theta.double(), new.build_module(128, 1).theta.double()
    slow = 2 * math.pi / old_theta > 131072
    assert slow.any()
    ratio = (262144 * new_theta[slow]) / (131072 * old_theta[slow])
    torch.testing.assert_close(ratio, torch.ones_like(ratio))
    # High-frequency dimensions (wavelength < 8192 / 4) are untouched.
    fast = 2 * math.pi / old_theta < 8192 / 4
    assert fast.sum() > 20 and torch.equal(new_theta[fast], old_theta[fast])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rope_type="dynamic"),
        dict(rope_type="default", factor=2.0),
        dict(rope_type="linear", factor=0.5),
        dict(rope_type="linear", factor=2.0, beta_fast=32.0),
        dict(rope_type="yarn", factor=4.0, low_freq_factor=1.0),
        dict(
            rope_type="llama3",
            factor=8.0,
            original_max_position_embeddings=8192,
            max_position_embeddings=4096,
        ),
        dict(rope_type="linear", rope_theta=0.0),
        dict(rope_type="yarn", factor=4.0, truncate="yes"),
    ],
)
def test_bad_settings_are_one_line_config_errors(kwargs):
    with pytest.raises(LongLoRAConfigError) as err:
        RopeScaling(**kwargs)
    assert "\n" not in str(err.value)


def test_yarn_attention_factor_variants():
    assert yarn_attention_factor(1.0) == 1.0
    assert yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4) + 1)
    assert yarn_attention_factor(4.0, attention_factor=0.5) == 0.5
    expected = (0.1 * 1.0 * math.log(40) + 1) / (0.1 * 0.5 * math.log(40) + 1)
    assert yarn_attention_factor(40.0, mscale=1.0, mscale_all_dim=0.5) == pytest.approx(expected)
    # mscale alone is ignored, as in transformers.
    assert yarn_attention_factor(4.0, mscale=2.0) == yarn_attention_factor(4.0)


def test_half_rotation_unscaled_equals_torchtune_qwen2_rope_and_yarn_changes_it():
    from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings

    x = torch.randn(2, 64, 3, 16)
    pos = torch.tensor([[5, 6, 7, 0, 1, 2, 3, 60]] * 2)
    qwen = Qwen2RotaryPositionalEmbeddings(dim=16, max_seq_len=64, base=1e6)
    ours = RopeScaling(rope_theta=1e6).build_module(16, 64, half_rotation=True)
    torch.testing.assert_close(ours(x), qwen(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        ours(x[:, :8], input_pos=pos), qwen(x[:, :8], input_pos=pos), atol=1e-6, rtol=0
    )
    yarn = RopeScaling("yarn", 4.0, 16, 1e6).build_module(16, 64, half_rotation=True)
    assert (yarn(x) - qwen(x)).abs().max() > 1e-2


@pytest.mark.parametrize("rope", [ROUND_TRIP[3], ROUND_TRIP[7]])
def test_export_config_carries_the_method_and_transformers_reads_it(rope, tmp_path):
    from longlora_tune.hf.export import merged_hf_config

    base = {"model_type": "llama", **_shape(16), "num_hidden_layers": 1, "vocab_size": 8, "rope_theta": 5.0}
    written = merged_hf_config(base, 1.0, torch.bfloat16, rope=rope)
    assert written["torch_dtype"] == "bfloat16" and written["rope_scaling"]["rope_type"] == rope.rope_type
    assert RopeScaling.from_hf_config(written) == rope
    (tmp_path / "config.json").write_text(json.dumps(written))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    positions = 4 * rope.original_max_position_embeddings
    _assert_tables_equal(rope.build_module(16, positions), *_hf_tables(config, positions))
    # Without rope= the linear export is unchanged.
    assert merged_hf_config(base, 4.0, torch.float32)["rope_scaling"]["factor"] == 4.0
