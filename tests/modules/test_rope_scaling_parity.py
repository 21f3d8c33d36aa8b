"""End to end: torchtune decoders with apply_longlora(rope=RopeScaling) equal transformers' logits.

Tiny random transformers models with a llama3 (Llama 3.1 style, GQA) or YaRN (Qwen2 style, q/k/v biases)
RoPE config are saved with ``save_pretrained``; our model is built from the same weights with torchtune's
checkpointer and compared at positions up to 4x (and beyond) the original context.
"""

import json

import pytest
import torch
from torchtune.models.llama3_1 import Llama3ScaledRoPE, llama3_1
from torchtune.models.qwen2 import qwen2
from torchtune.training.checkpointing import FullModelHFCheckpointer

from longlora_tune.models import apply_longlora
from longlora_tune.models.longlora import describe
from longlora_tune.modules.rope_config import RopeScaling

transformers = pytest.importorskip("transformers")

ORIGINAL = 32
SEQ = 160  # 5x the original context

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _save_hf(path, family: str, rope_scaling: dict, max_position_embeddings: int, rope_theta: float):
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_cls(
        **SHAPE,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = model_cls(config).eval()
    with torch.no_grad():  # biases and norms away from their init so a dropped one cannot pass
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _torchtune(path, family: str, device: str = "cpu"):
    c = json.loads((path / "config.json").read_text())
    common = dict(
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"],
        embed_dim=c["hidden_size"],
        intermediate_dim=c["intermediate_size"],
        max_seq_len=SEQ,
        norm_eps=c["rms_norm_eps"],
    )
    with torch.device(device):
        model = llama3_1(**common) if family == "llama" else qwen2(**common)
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(path),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3" if family == "llama" else "QWEN2",
        output_dir=str(path.parent / "tt"),
    )
    return model, checkpointer.load_checkpoint()["model"], RopeScaling.from_hf_config(c)


CASES = [
    (
        "llama",
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": ORIGINAL},
        8 * ORIGINAL,
        500000.0,
    ),
    ("qwen2", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}, ORIGINAL, 1e6),
    ("qwen2", {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 8.0},
     8 * ORIGINAL, 10000.0),
]  # fmt: skip


@pytest.mark.parametrize("family, rope_scaling, mpe, theta", CASES)
def test_eval_logits_equal_transformers_beyond_4x_the_original_context(
    tmp_path, family, rope_scaling, mpe, theta
):
    hf = _save_hf(tmp_path / "hf", family, rope_scaling, mpe, theta)
    model, state, rope = _torchtune(tmp_path / "hf", family)
    assert rope.rope_type == rope_scaling.get("rope_type", rope_scaling.get("type"))
    model.load_state_dict(state)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(tokens).logits
        # Without our RoPE (torchtune's builder default) the long-context logits differ: the check is live.
        assert (model.eval()(tokens) - theirs).abs().max().item() > 1e-3
        apply_longlora(model, s2=None, rope=rope)
        ours = model.eval()(tokens)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert describe(model).rope_scaling_factor == rope.factor


def test_meta_device_llama3_1_model_gets_our_rope_and_rope_init_rebuilds_it(tmp_path):
    rope_scaling = CASES[0][1]
    hf = _save_hf(tmp_path / "hf", "llama", rope_scaling, 8 * ORIGINAL, 500000.0)
    model, state, rope = _torchtune(tmp_path / "hf", "llama", device="meta")
    assert isinstance(model.layers[0].attn.pos_embeddings, Llama3ScaledRoPE)
    apply_longlora(model, s2=None, rope=rope)
    assert model.layers[0].attn.pos_embeddings.cache.is_meta
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    with torch.device("cpu"):
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.eval()(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_rope_and_rope_scaling_factor_are_exclusive_and_llama3_rope_needs_rope(tmp_path):
    model = llama3_1(vocab_size=8, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16, max_seq_len=8)
    with pytest.raises(ValueError, match="not both"):
        apply_longlora(model, s2=None, rope_scaling_factor=2.0, rope=RopeScaling("linear", 2.0))
    # A linear factor would silently drop Llama 3.1's own scaling: only an explicit rope= replaces it.
    with pytest.raises(ValueError, match="Llama3ScaledRoPE"):
        apply_longlora(model, s2=None, rope_scaling_factor=2.0)
    apply_longlora(model, s2=None, rope=RopeScaling("llama3", 8.0, 4, 500000.0, 16))
    with pytest.raises(ValueError, match="already applied"):
        apply_longlora(model, s2=None, rope=RopeScaling("llama3", 8.0, 4, 500000.0, 16))
