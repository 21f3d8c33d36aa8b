"""The fused chunked output projection + cross-entropy equals F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune import training
from torchtune.modules import TiedLinear
from torchtune.modules.loss import CEWithChunkedOutputLoss

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models import longlora_llama2
from longlora_tune.modules.linear_ce import ChunkedLinearCrossEntropyLoss, linear_cross_entropy
from longlora_tune.modules.loss import summed_token_loss

IGNORE = -100


def _data(tokens=37, dim=16, vocab=50, ignored=0.3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen, dtype=dtype) / dim**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < ignored] = IGNORE
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=IGNORE)


@pytest.mark.parametrize("chunks", [1, 3, 8, 37, 64])
@pytest.mark.parametrize("weight_trains", [True, False])
def test_float64_loss_and_gradients_equal_full_logits_cross_entropy(chunks, weight_trains):
    hidden, weight, labels = _data()
    weight.requires_grad_(weight_trains)
    loss = linear_cross_entropy(hidden, weight, labels, num_chunks=chunks, ignore_index=IGNORE)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE)  # float64 throughout
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    inputs = (hidden, weight) if weight_trains else (hidden,)
    # A non-unit upstream gradient (the recipe multiplies the mean by the token count).
    got = torch.autograd.grad(loss * 3.5, inputs)
    want = torch.autograd.grad(ref * 3.5, inputs)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_batched_shape_and_every_label_ignored():
    hidden, weight, labels = _data(tokens=24)
    loss = linear_cross_entropy(hidden.view(2, 12, -1), weight, labels.view(2, 12), num_chunks=4)
    torch.testing.assert_close(loss.double(), _reference(hidden, weight, labels).double(), rtol=1e-6, atol=0)
    # No scored token: an exact 0 (not NaN) with zero gradients that still reach the inputs.
    none = linear_cross_entropy(hidden, weight, torch.full_like(labels, IGNORE), num_chunks=3)
    assert none.item() == 0.0
    g_hidden, g_weight = torch.autograd.grad(none, (hidden, weight))
    assert torch.count_nonzero(g_hidden) == 0 and torch.count_nonzero(g_weight) == 0


def test_bf16_within_tolerance_of_the_unfused_path():
    hidden, weight, labels = _data(tokens=256, dim=64, vocab=1000, dtype=torch.float32, seed=1)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(h16, w16, labels, num_chunks=8)
    ref = _reference(hidden, weight, labels)  # fp32 truth
    got = torch.autograd.grad(loss, (h16, w16))
    want = torch.autograd.grad(ref, (hidden, weight))
    assert loss.dtype == torch.float32 and got[0].dtype == got[1].dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2 * w.abs().max().item())
    # As close to the truth as torchtune's chunked bf16 loss is.
    chunked = CEWithChunkedOutputLoss(num_output_chunks=8)
    h_c = hidden.detach().bfloat16().requires_grad_()
    ref16 = chunked([c @ w16.detach().t() for c in h_c[None].chunk(8, dim=1)], labels[None])
    (g_c,) = torch.autograd.grad(ref16, (h_c,))
    assert (got[0].float() - want[0]).abs().max() <= 2 * (g_c.float() - want[0]).abs().max() + 1e-6


def test_backward_twice_is_an_error_not_a_wrong_gradient():
    hidden, weight, labels = _data()
    loss = linear_cross_entropy(hidden, weight, labels, num_chunks=2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_shape_and_chunk_validation():
    hidden, weight, labels = _data()
    with pytest.raises(ValueError, match="must match"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="num_chunks"):
        linear_cross_entropy(hidden, weight, labels, num_chunks=0)
    with pytest.raises(ValueError, match="num_output_chunks"):
        ChunkedLinearCrossEntropyLoss(num_output_chunks=0)
    with pytest.raises(RuntimeError, match="set_model_output"):
        ChunkedLinearCrossEntropyLoss()(hidden, labels)


class _TinyDecoder(nn.Module):
    """The parts of a torchtune TransformerDecoder the loss relies on: norm, output, unembed, forward."""

    def __init__(self, vocab=50, dim=16, tied=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.norm = nn.RMSNorm(dim)
        self.output = TiedLinear(self.tok_embeddings) if tied else nn.Linear(dim, vocab, bias=False)

    def unembed(self, h):
        return self.output(self.norm(h))  # no fp32 upcast, so that the float64 reference stays float64

    def forward(self, tokens):
        return self.unembed(self.tok_embeddings(tokens) * 2.0)


@pytest.mark.parametrize("tied", [False, True])
def test_summed_token_loss_with_the_model_hook_equals_the_unfused_loss(tied):
    torch.manual_seed(0)
    model = _TinyDecoder(tied=tied).double()
    tokens = torch.randint(0, 50, (2, 9))
    labels = tokens.clone()
    labels[0, :3] = IGNORE
    batch = {"tokens": tokens, "labels": labels}
    kwargs = dict(device=torch.device("cpu"), ignore_index=IGNORE)
    ref, n_ref = summed_token_loss(model, nn.CrossEntropyLoss(ignore_index=IGNORE), batch, **kwargs)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))

    fused = ChunkedLinearCrossEntropyLoss(num_output_chunks=4, ignore_index=IGNORE)
    fused.set_model_output(model)
    loss, n = summed_token_loss(model, fused, batch, **kwargs)
    # Shifted targets: labels[:, 1:] (two of them ignored in row 0), the last position of each row has none.
    assert int(n) == int(n_ref) == 2 * 8 - 2
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    # Embedding, norm and output (tied: the embedding gets both contributions) get the same gradients.
    for g, w in zip(torch.autograd.grad(loss, list(model.parameters())), ref_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # Outside scoring the model is unchanged: logits, same state dict keys.
    assert model(tokens).shape == (2, 9, 50)
    assert list(model.state_dict()) == list(_TinyDecoder(tied=tied).state_dict())


def test_longlora_model_fused_loss_equals_chunked_loss_with_checkpointing():
    def build():
        torch.manual_seed(0)
        with training.set_default_dtype(torch.float64):
            model = longlora_llama2(
                vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=32, max_seq_len=32
            )
        for p in model.parameters():
            p.requires_grad_(True)
        training.set_activation_checkpointing(model, auto_wrap_policy={type(model.layers[0])})
        return model.train()

    gen = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, 64, (2, 32), generator=gen)}
    batch["labels"] = batch["tokens"].clone()
    batch["labels"][1, 20:] = IGNORE
    kwargs = dict(device=torch.device("cpu"), ignore_index=IGNORE)
    chunked_model, chunked = build(), CEWithChunkedOutputLoss(num_output_chunks=4)
    chunked_model.set_num_output_chunks(4)
    ref, _ = summed_token_loss(chunked_model, chunked, batch, **kwargs)
    ref.backward()
    model, fused = build(), ChunkedLinearCrossEntropyLoss(num_output_chunks=4)
    fused.set_model_output(model)
    loss, _ = summed_token_loss(model, fused, batch, **kwargs)
    loss.backward()
    # torchtune's chunked loss upcasts the float64 logits to fp32 (``.float()``): fp32 agreement.
    torch.testing.assert_close(loss, ref.double(), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), chunked_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_set_model_output_refuses_an_output_layer_it_cannot_fuse():
    model = _TinyDecoder()
    model.output = nn.Linear(16, 50, bias=True)
    with pytest.raises(LongLoRAConfigError, match="CEWithChunkedOutputLoss"):
        ChunkedLinearCrossEntropyLoss().set_model_output(model)
