"""apply_longlora on plain torchtune decoders: what is swapped, what must not change, and its errors."""

import pytest
import torch
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules import MultiHeadAttention, RotaryPositionalEmbeddings

from longlora_tune.models import apply_longlora, longlora_llama2
from longlora_tune.modules.rope_scaling import LinearScaledRotaryPositionalEmbeddings
from longlora_tune.modules.s2_attention import S2Attention, S2AttentionConfig


def _lora_model(**overrides):
    kwargs = dict(
        lora_attn_modules=["q_proj", "v_proj"],
        vocab_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=64,
        lora_rank=2,
        lora_alpha=4.0,
    )
    kwargs.update(overrides)
    return lora_llama2(**kwargs)


def test_swaps_rope_and_attention_call_and_keeps_state_dict():
    torch.manual_seed(0)
    model = _lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = [m._attention_call for m in model.modules() if isinstance(m, MultiHeadAttention)]
    out = apply_longlora(model, s2=S2AttentionConfig(group_size_ratio=0.25), rope_scaling_factor=2.0)
    assert out is model
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attns) == 2
    for attn, original in zip(attns, originals):
        assert isinstance(attn.pos_embeddings, LinearScaledRotaryPositionalEmbeddings)
        assert (attn.pos_embeddings.dim, attn.pos_embeddings.max_seq_len, attn.pos_embeddings.base) == (
            8,
            64,
            10_000,
        )
        assert attn.pos_embeddings.scaling_factor == 2.0
        call = attn._attention_call
        assert isinstance(call, S2Attention) and call.group_size == 16 and call.full_attention is original
        # A child module: train()/eval() reach it.
        assert dict(attn.named_children())["_attention_call"] is call
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m._attention_call.training for m in attns)


def test_applied_twice_raises_and_leaves_model_usable():
    model = _lora_model()
    apply_longlora(model, s2=S2AttentionConfig(), rope_scaling_factor=2.0)
    with pytest.raises(ValueError, match="already applied"):
        apply_longlora(model, s2=S2AttentionConfig(), rope_scaling_factor=2.0)
    model.eval()
    assert model(torch.randint(0, 64, (1, 64))).shape == (1, 64, 64)


def test_shared_rope_stays_shared_and_rope_base_override():
    # torchtune's plain llama2 builder makes one RoPE per layer; share one to check sharing is preserved.
    model = llama2(vocab_size=64, num_layers=3, num_heads=4, num_kv_heads=4, embed_dim=32, max_seq_len=32)
    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    shared = RotaryPositionalEmbeddings(dim=8, max_seq_len=32, base=10_000)
    for attn in attns:
        attn.pos_embeddings = shared
    apply_longlora(model, s2=S2AttentionConfig(group_size=8), rope_scaling_factor=4.0, rope_base=500_000)
    ropes = {id(a.pos_embeddings) for a in attns}
    assert len(ropes) == 1
    rope = attns[0].pos_embeddings
    assert rope.base == 500_000 and rope.scaling_factor == 4.0
    assert all(a._attention_call.group_size == 8 for a in attns)


def test_meta_device_model_then_rope_init_matches_normal_init():
    kwargs = dict(
        vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128,
        original_max_seq_len=32, rope_base=1000,
    )  # fmt: skip
    reference = longlora_llama2(**kwargs)
    with torch.device("meta"):
        model = longlora_llama2(**kwargs)
    assert model.layers[0].attn.pos_embeddings.cache.is_meta
    # What torchtune's distributed recipe does after loading the sharded state dict.
    model.to_empty(device="cpu")
    with torch.device("cpu"):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    for got, want in zip(model.modules(), reference.modules()):
        if isinstance(got, LinearScaledRotaryPositionalEmbeddings):
            assert got.scaling_factor == want.scaling_factor == 4.0 and got.base == 1000
            torch.testing.assert_close(got.cache, want.cache, atol=0, rtol=0)
            torch.testing.assert_close(got.theta, want.theta, atol=0, rtol=0)


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (
            lambda: torch.nn.Linear(2, 2),
            dict(s2=S2AttentionConfig(), rope_scaling_factor=2.0),
            "no torchtune",
        ),
        (_lora_model, dict(s2=S2AttentionConfig(), rope_scaling_factor=0.5), "scaling_factor"),
        (_lora_model, dict(s2={"group_size_ratio": 0.25}, rope_scaling_factor=2.0), "S2AttentionConfig"),
        (_lora_model, dict(s2=S2AttentionConfig(group_size=128), rope_scaling_factor=2.0), "exceeds"),
        (_lora_model, dict(s2=S2AttentionConfig(), rope_scaling_factor=2.0, rope_base=-1), "rope_base"),
    ],
)
def test_errors_leave_model_unchanged(make, kwargs, message):
    model = make()
    with pytest.raises(ValueError, match=message):
        apply_longlora(model, **kwargs)
    assert not any(
        isinstance(m, (S2Attention, LinearScaledRotaryPositionalEmbeddings)) for m in model.modules()
    )


@pytest.mark.parametrize("use_full_attn", [True, False])
def test_odd_head_count_trains(use_full_attn):
    # 3 query heads over 1 KV head: S² shifts heads 1 and 2 (shifted_heads); full attention as well.
    model = _lora_model(num_heads=3, num_kv_heads=1, embed_dim=24)
    apply_longlora(
        model, s2=S2AttentionConfig(group_size=16, use_full_attn=use_full_attn), rope_scaling_factor=2.0
    )
    assert all(isinstance(layer.attn._attention_call, S2Attention) for layer in model.layers)
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = model.train()(tokens)
    logits.sum().backward()
    assert logits.shape == (2, 64, 64) and torch.isfinite(logits).all()
    with torch.no_grad():
        full = model.eval()(tokens)
    # Positions before G/2 see their whole causal past either way; later ones only with full attention.
    torch.testing.assert_close(logits[:, :8], full[:, :8])
    assert torch.equal(logits.detach(), full) == use_full_attn


def test_non_plain_rope_rejected():
    from torchtune.models.llama3_1 import Llama3ScaledRoPE

    model = _lora_model()
    model.layers[1].attn.pos_embeddings = Llama3ScaledRoPE(dim=8, max_seq_len=64)
    with pytest.raises(ValueError, match="Llama3ScaledRoPE"):
        apply_longlora(model, s2=S2AttentionConfig(), rope_scaling_factor=2.0)
