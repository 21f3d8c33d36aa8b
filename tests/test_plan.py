"""The planner's activation and FLOP models against what PyTorch actually saves and computes.

Activations: every tensor that autograd packs for backward during forward + loss is seen through
``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage; parameter and buffer storages are
excluded (they are not activations). Non-reentrant activation checkpointing saves each checkpointed layer's
input through the same hooks, so the checkpointed case is counted the same way.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward of the real model, with SDPA
forced to the math kernel (whose matmuls the counter sees; it counts every score, i.e. the planner's
``attention="dense"``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss

from longlora_tune.models import longlora_llama2
from longlora_tune.peft import set_trainable_params
from longlora_tune.plan import (
    ModelShape,
    activation_bytes,
    load_config_settings,
    main,
    plan,
    s2_segment_lengths,
    step_flops,
)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# (shape, seq_len, batch): MHA, GQA with a sequence that is not a multiple of G, and a single odd layer.
SHAPES = [
    (ModelShape(256, 2, 4, 4, 64, 128), 256, 1),
    (ModelShape(512, 3, 8, 2, 128, 352), 384, 2),
    (ModelShape(320, 1, 2, 2, 96, 256), 200, 1),
]


def _build(shape: ModelShape, seq_len: int, *, dtype: torch.dtype, s2: bool, checkpoint: bool):
    torch.manual_seed(0)
    with training.set_default_dtype(dtype):
        model = longlora_llama2(
            **dataclasses.asdict(shape),
            max_seq_len=seq_len,
            s2_backend="sdpa",
            use_full_attn=not s2,
        )
    set_trainable_params(model)
    if checkpoint:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.train()
    return model


def _loss(model, shape: ModelShape, seq_len: int, batch: int, chunks: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq_len), generator=generator)
    labels = torch.randint(0, shape.vocab_size, (batch, seq_len), generator=generator)
    model.set_num_output_chunks(chunks)
    return CEWithChunkedOutputLoss(num_output_chunks=chunks)(model(tokens), labels)


def _saved_bytes(model, shape: ModelShape, seq_len: int, batch: int, chunks: int) -> int:
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _loss(model, shape, seq_len, batch, chunks)
    assert torch.isfinite(loss)
    return sum(storages.values())


@pytest.mark.parametrize("shape,seq_len,batch", SHAPES)
@pytest.mark.parametrize("s2", [True, False], ids=["s2", "full"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["no_ac", "ac"])
def test_activation_estimate_matches_autograd(shape, seq_len, batch, s2, checkpoint):
    chunks = 4
    model = _build(shape, seq_len, dtype=torch.bfloat16, s2=s2, checkpoint=checkpoint)
    measured = _saved_bytes(model, shape, seq_len, batch, chunks)
    estimate = activation_bytes(
        shape, seq_len, batch, dtype="bf16", s2=s2, activation_checkpointing=checkpoint, loss_chunks=chunks
    ).saved
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)


def test_activation_estimate_fp32():
    shape, seq_len, batch = SHAPES[0]
    for checkpoint in (False, True):
        model = _build(shape, seq_len, dtype=torch.float32, s2=True, checkpoint=checkpoint)
        measured = _saved_bytes(model, shape, seq_len, batch, 2)
        estimate = activation_bytes(
            shape, seq_len, batch, dtype="fp32", s2=True, activation_checkpointing=checkpoint, loss_chunks=2
        ).saved
        assert abs(estimate - measured) <= 0.15 * measured, (checkpoint, estimate, measured)


def test_checkpointing_and_s2_change_activations_in_the_right_direction():
    shape = ModelShape(32_000, 32, 32, 32, 4096, 11008)
    base = activation_bytes(shape, 32768, s2=True, activation_checkpointing=False)
    assert activation_bytes(shape, 32768, s2=True, activation_checkpointing=True).saved < base.saved / 5
    # S² re-assembles the output from its groups: one extra hidden-sized tensor per layer, nothing quadratic.
    full = activation_bytes(shape, 32768, s2=False, activation_checkpointing=False)
    assert base.per_layer_saved - full.per_layer_saved == 2 * 32768 * 4096


@pytest.mark.parametrize("s2", [True, False], ids=["s2", "full"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["no_ac", "ac"])
def test_flops_match_flop_counter(s2, checkpoint):
    shape, seq_len, batch = SHAPES[1]
    model = _build(shape, seq_len, dtype=torch.float32, s2=s2, checkpoint=checkpoint)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _loss(model, shape, seq_len, batch, 2).backward()
    expected = step_flops(
        shape,
        seq_len,
        batch,
        group_size=seq_len // 4 if s2 else None,
        activation_checkpointing=checkpoint,
        attention="dense",
    )
    assert counter.get_total_flops() == pytest.approx(expected.total, rel=1e-9)


def test_flops_hand_count_full_attention():
    # Hand count for one MHA layer: d=8, i=16, V=10, 6 tokens, rank 2 on q, k, v, o.
    shape = ModelShape(10, 1, 2, 2, 8, 16)
    est = step_flops(
        shape, 6, 1, group_size=None, activation_checkpointing=False, attention="causal", lora_rank=2
    )
    t = 6
    frozen = 2 * t * (4 * 8 * 8 + 3 * 8 * 16)
    lora = 2 * t * 4 * 2 * (8 + 8)
    attn = 2 * 2 * 2 * 4 * (6 * 7 / 2)  # 2 matmuls, 2 heads, head_dim 4, 21 causal pairs
    head = 2 * t * 8 * 10
    assert est.forward == frozen + lora + attn + head
    assert est.backward == frozen + 2 * lora + 2 * attn + head
    assert est.recompute == 0


def test_s2_segments():
    assert s2_segment_lengths(16, 4) == ([4, 4, 4, 4], [2, 4, 4, 4, 2])
    assert s2_segment_lengths(10, 4) == ([4, 4, 2], [2, 4, 4])
    assert s2_segment_lengths(16, 4, wrap_around=True) == ([4, 4, 4, 4], [4, 4, 4, 4])
    with pytest.raises(ValueError, match="even"):
        s2_segment_lengths(16, 3)


def test_s2_flops_against_paper_table():
    # LongLoRA Table 12 (7B, 65536 tokens, forward, dense counting): full 3118 TFLOPs with 72.2% attention.
    full = step_flops(ModelShape(32_000, 32, 32, 32, 4096, 11008), 65536, attention="dense")
    assert full.forward / 1e12 == pytest.approx(3118, rel=0.01)
    assert full.attention_share_forward == pytest.approx(0.722, abs=0.005)


def test_plan_verdicts_and_suggestions():
    fits = plan("7b", 8192, gpus=8, gpu_memory_gib=80)
    assert fits.fits and fits.max_seq_len_fitting >= 8192 and not fits.suggestions
    tight = plan("7b", 100_000, gpus=8, gpu_memory_gib=40, activation_checkpointing=False)
    assert not tight.fits
    assert any("enable_activation_checkpointing=True" in s for s in tight.suggestions)
    assert tight.max_seq_len_fitting < 100_000
    bigger = plan("7b", 100_000, gpus=8, gpu_memory_gib=40, activation_checkpointing=True)
    assert bigger.peak_bytes < tight.peak_bytes
    unsharded = plan("7b", 8192, gpus=1, fsdp=False).memory["weights (frozen)"]
    assert unsharded >= 8 * fits.memory["weights (frozen)"]
    with pytest.raises(ValueError, match="Unknown model"):
        plan("8b", 4096)
    with pytest.raises(ValueError, match="seq_len"):
        plan("7b", 0)


def test_cli_json(capsys):
    code = main(["--model", "7b", "--seq-len", "16384", "--gpus", "8", "--gpu-memory", "80", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True and out["seq_len"] == 16384
    assert out["flops"]["model"] < out["flops_full_attention"]["model"]
    with pytest.raises(SystemExit):
        main(["--model", "7b"])  # --seq-len is required with --model
    assert main(["--model", "70b", "--seq-len", "32768", "--gpu-memory", "40"]) == 1  # does not fit


def test_config_settings_from_yaml(tmp_path):
    sized = tmp_path / "sized.yaml"
    sized.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama2_7b\n  max_seq_len: 100000\n"
        "  s2_group_size_ratio: 0.25\nbatch_size: 1\ndtype: bf16\nenable_activation_checkpointing: True\n"
        "loss:\n  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss\n  num_output_chunks: 16\n"
    )
    settings = load_config_settings(str(sized))
    assert settings["model"] == "7b" and settings["seq_len"] == 100000 and settings["loss_chunks"] == 16
    assert settings["activation_checkpointing"] is True and settings["dtype"] == "bf16"
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama2\n  vocab_size: 256\n  num_layers: 2\n"
        "  num_heads: 4\n  num_kv_heads: 2\n  embed_dim: 64\n  max_seq_len: 512\n  use_full_attn: true\n"
        "enable_activation_checkpointing: false\n"
    )
    settings = load_config_settings(str(explicit))
    assert settings["model"] == ModelShape(256, 2, 4, 2, 64, 256) and settings["s2"] is False
    assert plan(**settings, gpus=1, gpu_memory_gib=2.0).fits  # 1.5 GiB of it is CUDA context
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  _component_: torchtune.models.llama2.llama2_7b\n  max_seq_len: 4096\n")
    with pytest.raises(ValueError, match="not a longlora_tune Llama 2 builder"):
        load_config_settings(str(broken))
    with pytest.raises(ValueError, match="not found"):
        load_config_settings("no_such_config")


def test_every_shipped_config_is_planned_and_fits_8x80():
    configs = sorted((Path(__file__).resolve().parents[1] / "longlora_tune" / "configs").glob("*.yaml"))
    if not configs:
        pytest.skip("no shipped configs yet")
    for path in configs:
        result = plan(**load_config_settings(str(path)), gpus=8, gpu_memory_gib=80.0, suggest=False)
        assert result.fits, (path.name, result.peak_bytes / 2**30)
