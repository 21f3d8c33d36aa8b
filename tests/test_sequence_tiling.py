"""Sequence tiling of the MLP block: the tiled layer computes what the untiled one does, in every setting.

Reference comparisons run in float64, where the tiles' smaller matmuls differ from the whole sequence's only
by float rounding (1e-12): the forward output and every gradient (the layer input, the trainable norms, the
attention LoRA matrices and, when asked for, LoRA on the MLP).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchtune import training
from torchtune.modules import RMSNorm, TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models import longlora_llama2, longlora_qwen2
from longlora_tune.models.trainable import set_trainable_params, unwrapped_name
from longlora_tune.modules.lean_layers import LeanRMSNorm
from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing, decoder_layers
from longlora_tune.training.sequence_tiling import (
    SequenceTiledLayer,
    SequenceTiledNorm,
    apply_sequence_tiling,
    check_tile_tokens,
    tiled_position_wise,
)

SEQ, BATCH, VOCAB = 64, 2, 128
# 2 x 64 = 128 tokens: tiles that divide it and the sequence, that divide neither (a short last tile, tiles
# across the two sequences), of one token, and one tile larger than the batch.
TILES = [32, 24, 1, 1000]


def _model(dtype: torch.dtype = torch.float64, **kwargs: object) -> torch.nn.Module:
    """A 2-layer GQA LongLoRA Llama (S² on sdpa) whose LoRA and norms are non-trivial."""
    sizes = dict(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64
    )
    builder = longlora_qwen2 if kwargs.pop("family", None) == "qwen2" else longlora_llama2
    torch.manual_seed(0)
    with training.set_default_dtype(dtype):
        model = builder(**{**sizes, **kwargs}, max_seq_len=SEQ, s2_backend="sdpa")
    set_trainable_params(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)  # LoRA B starts at zero: make every LoRA gradient non-trivial
            elif name.endswith("scale"):
                p.normal_(1.0, 0.1)  # so a norm-scale gradient error cannot hide behind a scale of 1
    return model.train()


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradient of every trainable tensor for one forward + backward."""
    logits = model(_tokens())
    # A loss whose gradient differs at every position (a plain sum would make many gradients equal).
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    (logits * weights).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[unwrapped_name(name)] = grad.detach().clone()
    return logits.detach(), grads


def _assert_same(got, want, atol: float = 1e-12) -> None:
    logits, grads = got
    torch.testing.assert_close(logits, want[0], rtol=0, atol=atol)
    assert sorted(grads) == sorted(want[1])
    for name, grad in grads.items():
        assert want[1][name].abs().max() > 0, name
        torch.testing.assert_close(grad, want[1][name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference():
    return _step(_model())


def test_every_gradient_kind_is_compared(reference):
    names = reference[1]
    assert any("lora_a" in n and "attn" in n for n in names)
    assert any(n.endswith("mlp_norm.scale") for n in names) and any(
        n.endswith("sa_norm.scale") for n in names
    )
    assert "tok_embeddings.weight" in names  # the gradient of the first layer's input flows into it


@pytest.mark.parametrize("tile", TILES)
def test_tiled_model_equals_untiled(reference, tile):
    model = _model()
    assert apply_sequence_tiling(model, tile) == 2
    assert all(type(layer) is SequenceTiledLayer for layer in model.layers)
    assert type(model.norm) is SequenceTiledNorm  # the final norm too
    _assert_same(_step(model), reference)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_heads=5, num_kv_heads=1, embed_dim=40), dict(family="qwen2")],
    ids=["odd_heads_gqa", "qwen2_biases"],
)
def test_tiled_model_equals_untiled_odd_heads_and_qwen2(kwargs):
    # S² splits 5 heads 2 + 3; Qwen2 has q/k/v biases and rotates head halves.
    want = _step(_model(**kwargs))
    model = _model(**kwargs)
    apply_sequence_tiling(model, 24)
    _assert_same(_step(model), want)


def test_tiled_attention_prefix_rotates_by_the_given_positions():
    # Packed batches and context-parallel slices pass input_pos: each tile must take its own positions.
    layer = _model().layers[0]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, SEQ, 32, dtype=torch.float64, generator=gen)
    positions = torch.stack([torch.randperm(SEQ, generator=gen) for _ in range(BATCH)])
    results = []
    for tiled in (False, True):
        candidate = copy.deepcopy(layer)
        if tiled:
            apply_sequence_tiling(candidate, 24)
        inputs = x.clone().requires_grad_()
        out = candidate(inputs, input_pos=positions)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), inputs.grad, candidate.attn.q_proj.lora_a.weight.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", [24, 1000])
def test_tiled_layer_equals_untiled_for_its_input(tile):
    # One layer alone: its output and the gradient of its input.
    layer = _model().layers[0]
    x = torch.randn(BATCH, SEQ, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(BATCH, SEQ, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for tiled in (False, True):
        candidate = copy.deepcopy(layer)
        if tiled:
            apply_sequence_tiling(candidate, tile)
        inputs = x.clone().requires_grad_()
        out = candidate(inputs)
        out.backward(g)
        results.append((out.detach(), inputs.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_lora_on_the_mlp_accumulates_over_tiles():
    kwargs = dict(apply_lora_to_mlp=True, lora_dropout=0.0)
    want = _step(_model(**kwargs))
    assert any("mlp.w1.lora_a" in n for n in want[1])
    model = _model(**kwargs)
    apply_sequence_tiling(model, 24)
    _assert_same(_step(model), want)


@pytest.mark.parametrize("layers", ["all", 1])
@pytest.mark.parametrize("order", ["tiling_first", "checkpointing_first"])
def test_with_activation_checkpointing(reference, layers, order):
    model = _model()
    if order == "tiling_first":
        apply_sequence_tiling(model, 24)
        apply_activation_checkpointing(model, layers)
    else:
        apply_activation_checkpointing(model, layers)
        apply_sequence_tiling(model, 24)
    _assert_same(_step(model), reference)


def test_a_recompute_skips_the_tiles_and_the_backward_reruns_each_once():
    # Calls of each layer's gate projection over one step, 128 tokens in tiles of 48 (3 tiles). Untiled, a
    # checkpointed layer runs its MLP twice (forward, recompute). Tiled: 3 tiles in forward and 3 in
    # backward, whether the layer is checkpointed (its recompute returns before the tiles) or not.
    model = _model()
    apply_sequence_tiling(model, 48)
    apply_activation_checkpointing(model, 1)
    calls = [0, 0]
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp.w1.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    _step(model)
    assert calls == [6, 6]


@pytest.mark.parametrize("norm_class", [RMSNorm, LeanRMSNorm])
def test_bf16_norm_gradients_are_summed_in_float32(norm_class):
    # A bf16 norm over 4096 one-token tiles of positive inputs: the scale's gradient is a sum of 4096
    # positive terms near 1. Summed in bf16 it would stall near 256 (a term is then below half a unit in the
    # last place); summed in float32 and rounded once it is as exact as the untiled gradient.
    x = (torch.rand(1, 4096, 8, generator=torch.Generator().manual_seed(5)) + 0.5).bfloat16()
    norm = norm_class(8).bfloat16()
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(6))
    grads = []
    for tiled in (False, True):
        norm.scale.grad = None
        (tiled_position_wise([norm], x, 1) if tiled else norm(x)).backward(torch.ones_like(x))
        grads.append(norm.scale.grad.double())
    xd = x.double()
    exact = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.eps)).sum(dim=(0, 1))
    for grad in grads:
        assert ((grad - exact) / exact).abs().max() <= 2**-8  # one bf16 rounding


def test_qlora_nf4_base():
    # NF4 needs whole 64 x 256 blocks: embed 256, MLP 512 (as tests/recipes/test_qlora.py). NF4 computes in
    # the compute dtype, float32 here.
    kwargs = dict(embed_dim=256, intermediate_dim=512, num_kv_heads=4, quantize_base=True)
    want = _step(_model(torch.float32, **kwargs))
    model = _model(torch.float32, **kwargs)
    assert type(model.layers[0].mlp.w1.weight).__name__ == "NF4Tensor"
    apply_sequence_tiling(model, 24)
    apply_activation_checkpointing(model, 1)
    _assert_same(_step(model), want, atol=1e-5)


@pytest.fixture
def single_rank_group(tmp_path):
    """A one-process gloo group for FSDP2 (skipped if one already exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ac", "ac"])
def test_under_fsdp2(reference, single_rank_group, checkpointing):
    # The recipe's order: tiling next to activation checkpointing, then FSDP2 per layer and the root. The
    # layer's unit gathers the MLP block's parameters for the tiles in forward and again in backward.
    from torch.distributed.tensor import DTensor

    from longlora_tune.training.distributed import shard_model

    model = _model()
    apply_sequence_tiling(model, 24)
    if checkpointing:
        apply_activation_checkpointing(model, "all")
    shard_model(model)
    assert isinstance(decoder_layers(model)[0].mlp_norm.scale, DTensor)
    _assert_same(_step(model), reference)
    if not checkpointing:  # FSDP2 re-classed the layers themselves (else their checkpoint wrappers)
        with pytest.raises(TypeError, match="apply it before FSDP2"):
            apply_sequence_tiling(model, 24)


def test_compiled_layers_break_around_the_tiled_blocks(reference, monkeypatch):
    # aot_eager: what inductor compiles, without C++ builds (as tests/test_compile.py).
    from longlora_tune.training.compile import compile_model_and_loss

    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    layer = _model().layers[0]
    apply_sequence_tiling(layer, 24)
    x = torch.randn(BATCH, SEQ, 32, dtype=torch.float64)
    explanation = torch._dynamo.explain(layer)(x)
    # Around the two tiled blocks (the attention prefix, the MLP): attention and the output projection
    # stay compiled.
    assert explanation.graph_break_count == 2
    assert all("torch.compiler.disable" in str(r.reason) for r in explanation.break_reasons)
    model = _model()
    compile_model_and_loss(model, CEWithChunkedOutputLoss(), device=torch.device("cpu"), verbose=False)
    apply_sequence_tiling(model, 24)
    apply_activation_checkpointing(model, 1)
    _assert_same(_step(model), reference, atol=1e-10)


def test_a_second_call_changes_the_tile_size_and_none_changes_nothing():
    model = _model()
    assert apply_sequence_tiling(model, None) == 0
    assert all(type(layer) is TransformerSelfAttentionLayer for layer in model.layers)
    apply_sequence_tiling(model, 24)
    apply_sequence_tiling(model, 8)
    assert [layer.sequence_tile_tokens for layer in model.layers] == [8, 8]
    assert sorted(model.state_dict()) == sorted(_model().state_dict())  # names unchanged


@pytest.mark.parametrize("value", [0, -4, 1.5, "8k", True])
def test_bad_tile_sizes_are_one_line_errors(value):
    message = rf"sequence_tile_tokens={value!r} must be a positive integer or null \(null = off\)"
    with pytest.raises(LongLoRAConfigError, match=message) as err:
        check_tile_tokens(value)
    assert "\n" not in str(err.value)
    model = _model()
    with pytest.raises(LongLoRAConfigError, match=message):
        apply_sequence_tiling(model, value)
    assert check_tile_tokens(None) is None and check_tile_tokens(8192) == 8192


def test_dropout_in_a_tiled_block_and_models_without_layers_are_refused():
    # LoRA dropout on the MLP or on q/k/v: both are recomputed tile by tile in backward.
    for kwargs in (dict(apply_lora_to_mlp=True, lora_dropout=0.1), dict(lora_dropout=0.1)):
        model = _model(**kwargs)
        with pytest.raises(
            LongLoRAConfigError, match=r"cannot repeat their dropout \(p=0.1\); set model.lora_dropout=0.0"
        ):
            apply_sequence_tiling(model, 24)
        assert all(type(layer) is TransformerSelfAttentionLayer for layer in model.layers)  # none half-done
        assert type(model.norm) is LeanRMSNorm
    # Dropout on the output projection alone is outside the tiled blocks.
    assert apply_sequence_tiling(_model(lora_dropout=0.1, lora_attn_modules=["output_proj"]), 24) == 2
    with pytest.raises(
        LongLoRAConfigError, match="Sequential has no torchtune TransformerSelfAttentionLayer"
    ):
        apply_sequence_tiling(torch.nn.Sequential(torch.nn.Linear(2, 2)), 24)
