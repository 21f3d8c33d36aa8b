"""Checkpointing only the first N decoder layers: which layers are wrapped, and that training is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models import longlora_llama2
from longlora_tune.models.trainable import set_trainable_params
from longlora_tune.training.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpoint_layer_count,
    decoder_layers,
)

LAYERS = 3
SEQ = 64


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = longlora_llama2(
        vocab_size=128,
        num_layers=LAYERS,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        intermediate_dim=64,
        max_seq_len=SEQ,
        s2_backend="sdpa",
        lora_dropout=0.0,
    )
    set_trainable_params(model)
    # LoRA B starts at zero; random values make every LoRA gradient non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.02)
    model.train()
    return model


def _loss_and_grads(layers: object) -> tuple[float, dict[str, torch.Tensor], list[torch.nn.Module]]:
    """Loss and trainable gradients of one step; ``layers=None`` leaves the model unwrapped."""
    model = _model()
    if layers is not None:
        apply_activation_checkpointing(model, layers)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, SEQ), generator=generator)
    labels = torch.randint(0, 128, (2, SEQ), generator=generator)
    model.set_num_output_chunks(4)
    loss = CEWithChunkedOutputLoss(num_output_chunks=4)(model(tokens), labels)
    loss.backward()
    grads = {
        name.replace("._checkpoint_wrapped_module", ""): p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return float(loss.detach()), grads, list(model.layers)


@pytest.mark.parametrize("layers", [0, 1, 2, 3, "all", None])
def test_the_first_n_decoder_layers_are_wrapped(layers):
    model = _model()
    expected = LAYERS if layers in ("all", None) else layers
    assert apply_activation_checkpointing(model, layers) == expected
    wrapped = [isinstance(layer, CheckpointWrapper) for layer in model.layers]
    assert wrapped == [i < expected for i in range(LAYERS)]
    # Each wrapper holds exactly one decoder layer; nothing else in the model is wrapped.
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == expected
    assert len(decoder_layers(model)) == LAYERS
    for layer in model.layers[:expected]:
        assert isinstance(layer._checkpoint_wrapped_module, TransformerSelfAttentionLayer)


def test_losses_and_gradients_are_those_of_every_layer_checkpointed():
    reference_loss, reference, _ = _loss_and_grads("all")
    assert len(reference) > 3 * LAYERS  # LoRA, norms and embeddings of every layer
    for layers in (None, 0, 1, 2):  # None: apply_activation_checkpointing never called
        loss, grads, _ = _loss_and_grads(layers)
        assert loss == reference_loss, layers
        assert sorted(grads) == sorted(reference)
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-6, msg=f"{layers}: {name}")


def test_recompute_really_happens_only_in_the_checkpointed_layers():
    # Count forward calls of each layer's query projection over one forward + backward: a recomputed layer
    # runs it twice (non-reentrant checkpointing reruns the layer's forward in backward, up to the last op
    # whose saved tensors backward needs, so a hook on the whole MLP would not see the rerun).
    model = _model()
    apply_activation_checkpointing(model, 2)
    calls = [0] * LAYERS
    for i, layer in enumerate(decoder_layers(model)):
        layer.attn.q_proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    tokens = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    model.set_num_output_chunks(1)
    logits = model(tokens)
    logits = torch.cat(logits, dim=1) if isinstance(logits, list) else logits
    logits.float().logsumexp(-1).mean().backward()
    assert calls == [2, 2, 1]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, r"activation_checkpointing_layers=-1 must be all or an integer >= 0"),
        ("half", r"activation_checkpointing_layers='half' must be all or an integer >= 0"),
        (True, r"activation_checkpointing_layers=True must be all or an integer >= 0"),
        # auto is a config value, resolved before the layers are wrapped.
        ("auto", r"activation_checkpointing_layers='auto' must be all or an integer >= 0 .*auto is resolved"),
        (1.5, r"activation_checkpointing_layers=1.5 must be"),
        (4, r"activation_checkpointing_layers=4 is more than the model's 3 decoder layers; use at most 3"),
    ],
)
def test_bad_counts_are_one_line_config_errors(value, message):
    with pytest.raises(LongLoRAConfigError, match=message) as err:
        checkpoint_layer_count(value, LAYERS)
    assert "\n" not in str(err.value)
    model = _model()
    with pytest.raises(LongLoRAConfigError, match=message):
        apply_activation_checkpointing(model, value)
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())


def test_a_model_without_decoder_layers_is_refused_only_when_layers_are_asked_for():
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert apply_activation_checkpointing(plain, 0) == 0
    for layers in (1, "all"):
        with pytest.raises(
            LongLoRAConfigError, match="Sequential has no torchtune TransformerSelfAttentionLayer"
        ):
            apply_activation_checkpointing(plain, layers)
