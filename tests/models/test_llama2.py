"""LongLoRA Llama 2 builders against Hugging Face transformers and a dense S² reference."""

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchtune.models.llama2 import lora_llama2
from torchtune.modules import MultiHeadAttention
from torchtune.modules.peft import LoRALinear
from torchtune.training.checkpointing import FullModelHFCheckpointer

from longlora_tune.models import longlora_llama2, longlora_llama2_7b, longlora_llama2_13b, longlora_llama2_70b
from longlora_tune.modules.position_interpolation import position_interpolation_factor
from longlora_tune.modules.rope_config import RopeScaling

transformers = pytest.importorskip("transformers")

ORIGINAL_CTX = 32
SEQ = 128  # 4x the original context


def _hf_checkpoint(path, *, num_heads, num_kv_heads, seed=0):
    """A tiny random transformers Llama with linear RoPE scaling 4, saved as safetensors."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=ORIGINAL_CTX,
        rope_scaling={"type": "linear", "factor": 4.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a mixed-up norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _load_longlora(ckpt_dir, out_dir, **overrides):
    hf_config = json.loads((ckpt_dir / "config.json").read_text())
    factor = position_interpolation_factor(
        SEQ, hf_config["max_position_embeddings"], RopeScaling.from_hf_config(hf_config).factor
    )
    kwargs = dict(
        vocab_size=hf_config["vocab_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"],
        embed_dim=hf_config["hidden_size"],
        max_seq_len=SEQ,
        intermediate_dim=hf_config["intermediate_size"],
        norm_eps=hf_config["rms_norm_eps"],
        original_max_seq_len=hf_config["max_position_embeddings"],
        rope_scaling_factor=factor,
        lora_rank=4,
        lora_alpha=8.0,
    )
    kwargs.update(overrides)
    model = longlora_llama2(**kwargs)
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA2",
        output_dir=str(out_dir),
    )
    state = checkpointer.load_checkpoint()["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing and all(".lora_" in k for k in missing)  # only the (freshly initialised) LoRA weights
    return model


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2)])
def test_eval_logits_match_transformers_at_4x_context(tmp_path, num_heads, num_kv_heads):
    hf = _hf_checkpoint(tmp_path / "hf", num_heads=num_heads, num_kv_heads=num_kv_heads)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert RopeScaling.from_hf_config(saved).factor == 4.0
    model = _load_longlora(tmp_path / "hf", tmp_path / "out").eval()
    assert model.layers[0].attn.pos_embeddings.scaling_factor == 4.0
    tokens = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # Without interpolation the long-context logits differ, so the comparison above is meaningful.
    plain = _load_longlora(tmp_path / "hf", tmp_path / "out2", rope_scaling_factor=1.0).eval()
    with torch.no_grad():
        assert (plain(tokens) - theirs).abs().max().item() > 1e-3


def _dense_s2_attention(q, k, v, mask=None, dropout_p=0.0, is_causal=True, *, group):
    """Independent reference: full SDPA with the no-wrap S² pattern as a dense boolean mask."""
    b, h, n, _ = q.shape
    qi = torch.arange(n)[:, None]
    ki = torch.arange(n)[None, :]
    masks = []
    for head in range(h):
        s = 0 if head < h // 2 else group // 2
        masks.append((ki <= qi) & ((qi + s) // group == (ki + s) // group))
    allowed = torch.stack(masks)[None]  # [1, h, n, n]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def test_s2_engaged_in_train_mode_full_attention_in_eval(tmp_path):
    _hf_checkpoint(tmp_path / "hf", num_heads=4, num_kv_heads=2)
    model = _load_longlora(tmp_path / "hf", tmp_path / "out", s2_backend="sdpa")
    group = model.layers[0].attn._attention_call.group_size
    assert group == SEQ // 4
    # Make LoRA non-zero so the adapted path is part of the comparison.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.05)
    tokens = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(2))

    model.train()
    with torch.no_grad():
        s2_logits = model(tokens)
    model.eval()
    with torch.no_grad():
        full_logits = model(tokens)

    # Reference: same weights, attention replaced by a dense-mask S² (eval mode, so nothing else differs).
    reference = longlora_llama2(
        96,
        2,
        4,
        2,
        32,
        SEQ,
        intermediate_dim=64,
        lora_rank=4,
        lora_alpha=8.0,
        original_max_seq_len=ORIGINAL_CTX,
    )
    reference.load_state_dict(model.state_dict())
    for attn in reference.modules():
        if isinstance(attn, MultiHeadAttention):
            del attn._attention_call  # a child module now; a plain function cannot replace it in place
            attn._attention_call = lambda q, k, v, **kw: _dense_s2_attention(q, k, v, group=group)
    reference.eval()
    with torch.no_grad():
        ref_logits = reference(tokens)
    torch.testing.assert_close(s2_logits, ref_logits, atol=1e-5, rtol=1e-5)

    # Tokens inside the first half group see everything before them on both head halves.
    half = group // 2
    torch.testing.assert_close(s2_logits[:, :half], full_logits[:, :half], atol=1e-5, rtol=1e-5)
    assert (s2_logits[:, half:] - full_logits[:, half:]).abs().amax(dim=-1).min() > 1e-6

    # use_full_attn trains with the full attention it wraps.
    full_train = _load_longlora(tmp_path / "hf", tmp_path / "out3", use_full_attn=True)
    full_train.load_state_dict(model.state_dict())
    full_train.train()
    with torch.no_grad():
        torch.testing.assert_close(full_train(tokens), full_logits, atol=1e-5, rtol=1e-5)


def test_component_builder_signature_matches_the_contract():
    params = inspect.signature(longlora_llama2).parameters
    positional = ["vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "max_seq_len"]
    assert list(params)[:6] == positional
    expected = dict(
        lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"),
        apply_lora_to_mlp=False,
        apply_lora_to_output=False,
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        intermediate_dim=None,
        attn_dropout=0.0,
        norm_eps=1e-5,
        rope_base=10_000,
        rope_scaling_factor=None,
        original_max_seq_len=4096,
        checkpoint_rope_scaling=None,
        rope_scaling=None,
        s2_group_size_ratio=0.25,
        s2_group_size=None,
        s2_wrap_around=False,
        s2_backend="auto",
        use_full_attn=False,
        use_dora=False,
        quantize_base=False,
    )
    assert {k: params[k].default for k in list(params)[6:]} == expected
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in expected)
    # Every torchtune lora_llama2 argument is accepted.
    assert set(inspect.signature(lora_llama2).parameters) <= set(params)


@pytest.mark.parametrize(
    "builder, layers, heads, kv_heads, dim, hidden",
    [
        (longlora_llama2_7b, 32, 32, 32, 4096, 11008),
        (longlora_llama2_13b, 40, 40, 40, 5120, 13824),
        (longlora_llama2_70b, 80, 64, 8, 8192, 28672),
    ],
)
def test_model_builders_shapes_and_longlora_defaults(builder, layers, heads, kv_heads, dim, hidden):
    with torch.device("meta"):
        model = builder(max_seq_len=100_000, s2_group_size=25_000)
    attn = model.layers[0].attn
    assert len(model.layers) == layers and attn.num_heads == heads and attn.num_kv_heads == kv_heads
    assert model.tok_embeddings.weight.shape == (32_000, dim)
    assert model.layers[0].mlp.w1.weight.shape == (hidden, dim)
    assert model.max_seq_len == 100_000
    for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
        lora = getattr(attn, name)
        assert isinstance(lora, LoRALinear) and lora.rank == 8 and lora.alpha == 16
        assert isinstance(lora.dropout, torch.nn.Identity)
    assert not isinstance(model.layers[0].mlp.w1, LoRALinear)
    assert not isinstance(model.output, LoRALinear)
    assert attn.pos_embeddings.scaling_factor == 25.0 == math.ceil(100_000 / 4096)
    assert attn._attention_call.group_size == 25_000
    with pytest.raises(ValueError, match="fixes"):
        builder(max_seq_len=8192, vocab_size=32_001)


def test_default_group_is_quarter_of_max_seq_len_and_factor_auto():
    with torch.device("meta"):
        model = longlora_llama2_7b(max_seq_len=32768)
    assert model.layers[0].attn._attention_call.group_size == 8192
    assert model.layers[0].attn.pos_embeddings.scaling_factor == 8.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora_attn_modules="q_proj"), "non-empty list"),
        (dict(lora_attn_modules=["q_proj", "gate"]), "Unknown lora_attn_modules"),
        (dict(s2_backend="cuda"), "backend"),
        (dict(s2_group_size_ratio=0.3), "not an integer"),
        (dict(rope_scaling_factor=0.5), "scaling_factor"),
    ],
)
def test_builder_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        longlora_llama2(64, 1, 4, 4, 32, 64, original_max_seq_len=32, **kwargs)
