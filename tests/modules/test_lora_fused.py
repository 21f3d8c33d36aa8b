"""The fused LoRA forward equals torchtune's LoRALinear (float64), and only eligible layers get it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchtune import training
from torchtune.modules.peft import LoRALinear

from longlora_tune.models import longlora_llama2
from longlora_tune.modules.lora_fused import enable_fused_lora, lora_linear


def _lora(dropout=0.0, bias=False):
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, rank=3, alpha=6, dropout=dropout, use_bias=bias).double()
    nn.init.normal_(layer.lora_b.weight)  # torchtune starts B at zero, which would hide B's gradient path
    layer.weight.requires_grad_(False)
    return layer


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
def test_fused_forward_and_gradients_equal_lora_linear(shape):
    layer = _lora()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*shape[:-1], 10, dtype=torch.float64)
    ref = layer(x)
    params = [x, layer.lora_a.weight, layer.lora_b.weight]
    want = torch.autograd.grad((ref * w).sum(), params)
    out = lora_linear(x, layer.weight, layer.lora_a.weight, layer.lora_b.weight, layer.alpha / layer.rank)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(torch.autograd.grad((out * w).sum(), params), want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_enable_fused_lora_only_on_eligible_layers_and_falls_back_when_disabled():
    model = nn.ModuleDict({"plain": _lora(), "dropout": _lora(dropout=0.1), "bias": _lora(bias=True)})
    assert enable_fused_lora(model) == 1
    assert "forward" in vars(model["plain"]) and "forward" not in vars(model["dropout"])
    x = torch.randn(4, 12, dtype=torch.float64)
    plain = model["plain"]
    fused = plain(x)
    torch.testing.assert_close(fused, LoRALinear.forward(plain, x), rtol=1e-12, atol=1e-12)
    plain.disabled = True  # disable_adapter(): the base output alone, as torchtune gives it
    torch.testing.assert_close(plain(x), x @ plain.weight.t(), rtol=1e-12, atol=1e-12)


def test_longlora_model_with_fused_lora_trains_identically():
    def build():
        torch.manual_seed(0)
        with training.set_default_dtype(torch.float64):
            model = longlora_llama2(
                vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=32, max_seq_len=32
            )
        for name, p in model.named_parameters():
            p.requires_grad_("lora" in name)
            if "lora_b" in name:
                nn.init.normal_(p)
        return model.train()

    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_model, model = build(), build()
    assert enable_fused_lora(model) == 8  # q, k, v, output_proj in both layers
    ref_model(tokens).sum().backward()
    model(tokens).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
