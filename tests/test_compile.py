"""``compile: true``: S² traces without graph breaks, and compiled training equals eager training."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.nn.attention.flex_attention import create_block_mask
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models import longlora_llama2
from longlora_tune.models.trainable import set_trainable_params
from longlora_tune.modules.loss import summed_token_loss
from longlora_tune.training.compile import check_compile_supported, compile_model_and_loss
from longlora_tune.training.distributed import shard_model

CPU = torch.device("cpu")
N, G = 64, 16


def tiny_model(*, num_layers: int = 1, **s2: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = longlora_llama2(
        vocab_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=N,
        lora_rank=2,
        s2_group_size=G,
        **s2,
    )
    # LoRA B starts at zero; make the adapters non-trivial so the compiled LoRA path is exercised.
    for name, p in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def graph_breaks(layer: torch.nn.Module, n: int, mask: torch.Tensor | None) -> tuple[int, list[str]]:
    x = torch.randn(2, n, 32)
    kwargs = {} if mask is None else {"mask": mask}
    explained = torch._dynamo.explain(layer)(x, **kwargs)
    return explained.graph_break_count, [b.reason for b in explained.break_reasons]


def padding_mask(n: int) -> torch.Tensor:
    # Sample 1 has 5 pad tokens at the end: the wrapped group (last tokens + first tokens) gathers it.
    real = torch.arange(n)[None, :] < torch.tensor([n, n - 5])[:, None]
    return real[:, :, None] & real[:, None, :] & torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("n", [N, 40])  # whole groups, and a short last group
def test_s2_sdpa_decoder_layer_has_no_graph_break(wrap, with_mask, n):
    model = tiny_model(s2_wrap_around=wrap, s2_backend="sdpa").train()
    breaks, reasons = graph_breaks(model.layers[0], n, padding_mask(n) if with_mask else None)
    assert breaks == 0, reasons


@pytest.mark.parametrize("mode", ["eval", "use_full_attn"])
def test_full_attention_fallback_has_no_graph_break(mode):
    model = tiny_model(s2_backend="sdpa", use_full_attn=mode == "use_full_attn")
    model.train(mode != "eval")
    breaks, reasons = graph_breaks(model.layers[0], N, padding_mask(N))
    assert breaks == 0, reasons


@pytest.mark.parametrize("with_mask", [False, True])
def test_s2_flex_on_cpu_has_no_graph_break(with_mask):
    # Flex on CPU is forward-only; on CUDA the kernel runs through a compiler.disable'd compiled flex.
    model = tiny_model(s2_backend="flex").train()
    mask = None
    if with_mask:
        dense = padding_mask(N)
        mask = create_block_mask(lambda b, h, q, k: dense[b, q, k], 2, None, N, N, device="cpu")
    with torch.no_grad():
        breaks, reasons = graph_breaks(model.layers[0], N, mask)
    assert breaks == 0, reasons


def train_losses(
    *, compiled: bool, checkpointing: bool, steps: int = 3, fsdp: bool = False, bf16: bool = False
) -> list[float]:
    """Per-step mean losses of a 2-layer LongLoRA model trained with AdamW on fixed random batches.

    The set-up follows the recipe's order: trainable set, compile, activation checkpointing, then (fsdp)
    a bf16 frozen base with fp32 trainable tensors and FSDP2 with a mixed-precision policy.
    """
    torch._dynamo.reset()
    model = tiny_model(num_layers=2, s2_backend="sdpa")
    set_trainable_params(model)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=2)
    if compiled:
        loss_fn = compile_model_and_loss(model, loss_fn, device=CPU, max_lengths=2, verbose=False)
    if checkpointing:
        # After compile, as the recipe does: the checkpoint wrapper recomputes the compiled layer.
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    if fsdp:
        policy = None
        if bf16:
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_model(model, mp_policy=policy)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        n = N if step % 2 == 0 else N - G  # two padded lengths: one graph each
        tokens = torch.randint(0, 64, (2, n), generator=gen)
        batch = {"tokens": tokens, "labels": tokens.clone()}
        loss, n_tokens = summed_token_loss(model, loss_fn, batch, device=CPU, ignore_index=-100)
        (loss / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / n_tokens.item())
    return losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_equals_eager_aot_eager(monkeypatch, checkpointing):
    # aot_eager runs dynamo and AOTAutograd (the traced forward and backward graphs, which is where S²'s
    # Python control flow is captured) but no codegen, so it is fast enough for every run.
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    eager = train_losses(compiled=False, checkpointing=checkpointing)
    compiled = train_losses(compiled=True, checkpointing=checkpointing)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0.0)
    assert eager[0] != eager[2]  # the model trained: a constant loss would make the comparison vacuous


def test_compiled_training_equals_eager_under_fsdp2(monkeypatch, tmp_path):
    # One CPU rank: FSDP2's hooks, DTensor parameters and mixed precision around compiled layers.
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for bf16 in (False, True):
            eager = train_losses(compiled=False, checkpointing=True, fsdp=True, bf16=bf16)
            compiled = train_losses(compiled=True, checkpointing=True, fsdp=True, bf16=bf16)
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0.0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_training_equals_eager_inductor(monkeypatch):
    # The real thing (inductor with generated C++ kernels). Slow on CPU: each length compiles for minutes
    # on a loaded 2-core machine, so one length (steps 0 and 2 reuse the first graph) and one extra step.
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "inductor")
    eager = train_losses(compiled=False, checkpointing=True, steps=1)
    compiled = train_losses(compiled=True, checkpointing=True, steps=1)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0.0)


def test_compile_compiles_every_layer_and_returns_the_loss():
    model = tiny_model(num_layers=2)
    chunked = CEWithChunkedOutputLoss(num_output_chunks=4)
    cross_entropy = chunked.compute_cross_entropy
    out = compile_model_and_loss(model, chunked, device=CPU, verbose=False)
    # Chunked: compiled in place (only its cross-entropy), as torchtune does.
    assert out is chunked and chunked.compute_cross_entropy is not cross_entropy
    assert all(layer._compiled_call_impl is not None for layer in model.layers)
    plain = torch.nn.CrossEntropyLoss(ignore_index=-7)
    wrapped = compile_model_and_loss(tiny_model(), plain, device=CPU, verbose=False)
    assert wrapped is not plain and wrapped.ignore_index == -7


def test_recompile_limit_covers_every_length():
    with torch._dynamo.config.patch(recompile_limit=8):  # restored afterwards
        compile_model_and_loss(
            tiny_model(), CEWithChunkedOutputLoss(), device=CPU, max_lengths=16, verbose=False
        )
        assert torch._dynamo.config.recompile_limit == 18
        compile_model_and_loss(
            tiny_model(), CEWithChunkedOutputLoss(), device=CPU, max_lengths=2, verbose=False
        )
        assert torch._dynamo.config.recompile_limit == 18  # never lowered


def test_one_line_errors(monkeypatch):
    with pytest.raises(LongLoRAConfigError, match="no torchtune TransformerSelfAttentionLayer"):
        compile_model_and_loss(torch.nn.Linear(2, 2), CEWithChunkedOutputLoss(), device=CPU)
    import torch._inductor.cpp_builder as cpp_builder
    import torch.utils._triton as triton_utils

    def no_compiler() -> str:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(LongLoRAConfigError, match="needs a C\\+\\+ compiler.*set compile=false"):
        check_compile_supported(CPU)
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    with pytest.raises(LongLoRAConfigError, match="needs Triton on CUDA"):
        check_compile_supported(torch.device("cuda"))
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")  # no codegen, nothing to check
    check_compile_supported(torch.device("cuda"))
