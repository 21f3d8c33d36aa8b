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
from longlora_tune.models.shapes import FamilyShape, ModelShape
from longlora_tune.models.trainable import set_trainable_params
from longlora_tune.plan import choose_settings, load_config_settings, main, plan
from longlora_tune.plan.activations import activation_bytes, tile_backward_bytes
from longlora_tune.plan.config_settings import config_auto_keys
from longlora_tune.plan.facts import GIB, model_family
from longlora_tune.plan.flops import s2_segment_lengths, step_flops
from longlora_tune.plan.memory import LAYER_PHASE, nf4_bytes, parameter_counts

_PLAN_DEFAULTS = {
    k: v.default
    for k, v in __import__("inspect").signature(plan).parameters.items()
    if v.default is not __import__("inspect").Parameter.empty and k != "suggest"
}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# (shape, seq_len, batch): MHA, GQA with a sequence that is not a multiple of G, and a single odd layer.
SHAPES = [
    (ModelShape(256, 2, 4, 4, 64, 128), 256, 1),
    (ModelShape(512, 3, 8, 2, 128, 352), 384, 2),
    (ModelShape(320, 1, 2, 2, 96, 256), 200, 1),
]


def _sizes(shape: ModelShape) -> dict[str, int]:
    """The six sizes a component builder takes (the published facts such as tied embeddings are not)."""
    return {f.name: getattr(shape, f.name) for f in dataclasses.fields(ModelShape)[:6]}


def _build(shape: ModelShape, seq_len: int, *, dtype: torch.dtype, s2: bool, checkpoint: bool):
    torch.manual_seed(0)
    with training.set_default_dtype(dtype):
        model = longlora_llama2(
            **_sizes(shape),
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


def _counting_saved_storages(model, storages: dict[int, int]):
    """Hooks that record, once per storage, the bytes of every non-parameter tensor autograd packs."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def _saved_bytes(model, shape: ModelShape, seq_len: int, batch: int, chunks: int) -> int:
    storages: dict[int, int] = {}
    with _counting_saved_storages(model, storages):
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


# 9 query / 3 KV heads (SmolLM2's): 4 unshifted and 5 shifted heads, whose segments differ.
ODD_HEADS = (ModelShape(512, 1, 9, 3, 144, 352), 384, 1)


@pytest.mark.parametrize("s2", [True, False], ids=["s2", "full"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["no_ac", "ac"])
@pytest.mark.parametrize("shape,seq_len,batch", [SHAPES[1], ODD_HEADS], ids=["gqa", "odd_heads"])
def test_flops_match_flop_counter(s2, checkpoint, shape, seq_len, batch):
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
    with pytest.raises(ValueError, match="not a longlora_tune.models builder"):
        load_config_settings(str(broken))
    with pytest.raises(ValueError, match="not found"):
        load_config_settings("no_such_config")


#: Shipped configs whose header says the planner does not fit them yet, and their GPU count.
_STRETCH_CONFIGS = {"llama3_1_8b_512k_1gpu": 1, "llama3_1_8b_4m": 8}


def test_every_shipped_config_is_planned_and_fits_8x80():
    from longlora_tune import resources

    configs = sorted(resources.configs_dir().glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        if path.stem == "hf_checkpoint":
            # Any checkpoint: the planner needs its folder for the model.
            with pytest.raises(ValueError, match="builder comes from checkpoint_dir"):
                load_config_settings(str(path))
            continue
        # The tiny configs' global batch of 4 is meant for 1-2 processes; the recipe refuses it on 8.
        gpus = _STRETCH_CONFIGS.get(path.stem, 2 if path.stem.startswith("tiny") else 8)
        settings = load_config_settings(str(path))
        auto = config_auto_keys(str(path))
        result = (
            choose_settings(**settings, gpus=gpus, budget_gib=80.0, free=auto).plan
            if auto
            else plan(**settings, gpus=gpus, gpu_memory_gib=80.0, suggest=False)
        )
        # The two long-context configs of #24 are planned on their own GPU counts (1, and 8 with CP 8).
        assert result.fits, (path.name, result.peak_bytes / 2**30)
        assert result.fp32_trainable_params and result.gradient_accumulation_steps is not None, path.name


# ------------------------------------------------------------------------- the recipe's settings, one rule

_LLAMA2_7B = ModelShape(32_000, 32, 32, 32, 4096, 11008)


@pytest.mark.parametrize("fp32_trainable_params", [True, False], ids=["fp32_masters", "bf16"])
def test_trainable_state_bytes_hand_count_7b(fp32_trainable_params):
    # Llama 2 7B's LongLoRA trainable set, counted by hand: LoRA rank 8 on q, k, v, o (A: 8 x 4096,
    # B: 4096 x 8) in 32 layers, the token embedding and every RMSNorm scale (2 per layer + the final one).
    lora = 32 * 4 * (8 * 4096 + 4096 * 8)
    embedding = 32_000 * 4096
    norms = (2 * 32 + 1) * 4096
    assert (lora, embedding, norms) == (8_388_608, 131_072_000, 266_240)
    trainable = 139_726_848
    assert lora + embedding + norms == trainable
    base = 6_738_415_616  # Llama 2 7B's published parameter count
    gpus = 8
    # With fp32 master copies (the recipe's default): fp32 parameter, fp32 gradient (FSDP2 reduces into
    # fp32) and AdamW's two fp32 moments; else all three follow bf16. Each rank holds 1/8 (FSDP2 shards).
    param_b, grad_b, adam_b = (4, 4, 8) if fp32_trainable_params else (2, 2, 4)

    result = plan(
        "7b", 8192, gpus=gpus, dtype="bf16", fp32_trainable_params=fp32_trainable_params, suggest=False
    )

    assert result.trainable_params == trainable and result.total_params == base + lora
    assert result.memory["trainable params"] == param_b * trainable // gpus
    assert result.memory["gradients"] == grad_b * trainable // gpus
    assert result.memory["optimizer (AdamW)"] == adam_b * trainable // gpus
    # The frozen base weights stay bf16 either way.
    assert result.memory["weights (frozen)"] == 2 * (base - embedding - norms) // gpus


def test_fp32_trainable_params_changes_only_the_trainable_state():
    fp32 = plan("7b", 32768, gpus=8, fp32_trainable_params=True, suggest=False)
    bf16 = plan("7b", 32768, gpus=8, fp32_trainable_params=False, suggest=False)
    extra = 8 * 139_726_848 // 8  # (4 + 4 + 8) - (2 + 2 + 4) bytes per trainable parameter, over 8 GPUs
    changed = {k for k in fp32.memory if fp32.memory[k] != bf16.memory[k]}
    state = {"trainable params", "gradients", "optimizer (AdamW)"}
    assert changed == state | {"overhead (context, fragmentation)"}
    assert fp32.peak_bytes - bf16.peak_bytes == pytest.approx(1.05 * extra, abs=8)  # 5% fragmentation
    # An fp32 run has nothing to keep apart: 4 + 4 + 8 bytes with or without the flag.
    full = [plan("7b", 8192, dtype="fp32", fp32_trainable_params=f, suggest=False) for f in (True, False)]
    assert full[0].memory == full[1].memory
    assert full[0].memory["optimizer (AdamW)"] == 8 * 139_726_848 // 8


@pytest.fixture
def single_rank_group(tmp_path):
    """A one-process gloo group, as the recipe's FSDP2 sharding needs (skipped if one already exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_trainable_state_bytes_match_what_fsdp2_and_adamw_hold(single_rank_group):
    # The recipe's arrangement (_setup_model) on one CPU rank: bf16 model, trainable tensors cast to fp32,
    # FSDP2 with MixedPrecisionPolicy(bf16, reduce fp32), AdamW over the trainable set after one step.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shape = SHAPES[0][0]
    for fp32_masters in (True, False):
        model = _build(shape, 64, dtype=torch.bfloat16, s2=True, checkpoint=False)
        policy = None
        if fp32_masters:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.float32)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for name, module in reversed(list(model.named_modules())):
            if training.get_shard_conditions(name, module):
                fully_shard(module, mp_policy=policy or MixedPrecisionPolicy())
        fully_shard(model, mp_policy=policy or MixedPrecisionPolicy())
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        _loss(model, shape, 64, 1, 2).backward()
        optimizer.step()

        def local_bytes(t: torch.Tensor) -> int:
            t = t.to_local()
            return t.numel() * t.element_size()

        held = {
            "trainable params": sum(local_bytes(p) for p in trainable),
            "gradients": sum(local_bytes(p.grad) for p in trainable),
            "optimizer (AdamW)": sum(
                local_bytes(v) for p in trainable for k, v in optimizer.state[p].items() if k != "step"
            ),
        }
        planned = plan(
            shape, 64, gpus=1, dtype="bf16", fp32_trainable_params=fp32_masters, suggest=False
        ).memory
        assert held == {k: planned[k] for k in held}, fp32_masters


def test_trainable_extras_follow_the_peft_rule():
    # LoRA only (the paper's ablation): the 7B hand count without embedding and norms.
    assert parameter_counts(_LLAMA2_7B, trainable_extras=())[0] == 8_388_608
    assert parameter_counts(_LLAMA2_7B, trainable_extras=("norm",))[0] == 8_388_608 + 266_240
    with pytest.raises(ValueError, match="Unknown trainable extras"):
        parameter_counts(_LLAMA2_7B, trainable_extras=("head",))


def _builder_error(**kwargs) -> str:
    shape = SHAPES[0][0]
    with torch.device("meta"), pytest.raises(ValueError) as err:
        longlora_llama2(**_sizes(shape), **kwargs)
    return str(err.value)


@pytest.mark.parametrize(
    "max_seq_len,ratio,full_attn",
    [(1002, 0.25, False), (1002, 0.5, False), (1002, 0.25, True)],
    ids=["ratio_x_len_not_integer", "group_size_odd", "full_attn_builder_still_resolves"],
)
def test_group_size_is_the_builders_or_its_error(max_seq_len, ratio, full_attn):
    # 0.25 x 1002 = 250.5 and 0.5 x 1002 = 501: the builder refuses both (the planner used to round them).
    shape = SHAPES[0][0]
    expected = _builder_error(max_seq_len=max_seq_len, s2_group_size_ratio=ratio, use_full_attn=full_attn)
    with pytest.raises(ValueError) as err:
        plan(shape, max_seq_len, group_size_ratio=ratio, s2=not full_attn, gpus=1, suggest=False)
    assert str(err.value) == expected
    assert plan(shape, 1000, group_size_ratio=ratio, gpus=1, suggest=False).group_size == int(1000 * ratio)


def test_cli_refuses_a_config_the_recipe_refuses_in_one_line(tmp_path, capsys):
    path = tmp_path / "odd.yaml"
    path.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama2_7b\n  max_seq_len: 10001\n"
        "  s2_group_size_ratio: 0.25\n"
    )
    assert main(["--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "longlora_tune.plan: error: group_size_ratio 0.25 * max_seq_len 10001 = 2500.25 is not an integer; "
        "pick a ratio that divides max_seq_len or set group_size\n"
    )
    # An odd length has no even group size that divides it; the recipe's length check says so too.
    assert main(["--config", str(path), "--group-size", "2"]) == 2
    assert "training length 10001 is not divisible by the S2 group size 2" in capsys.readouterr().err
    # A length the ratio divides plans (the model is built for --seq-len too: G = 2500).
    assert main(["--config", str(path), "--seq-len", "10000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["group_size"] == 2500


def _config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama2_7b\n  max_seq_len: 8192\n" + body
    )
    return str(path)


def test_training_length_and_its_checks_are_the_recipes(tmp_path):
    # dataset.block_size is the training length; the group is 1/4 of the model's max_seq_len.
    settings = load_config_settings(_config(tmp_path, "dataset:\n  block_size: 4096\n"))
    assert settings["seq_len"] == 4096 and settings["max_seq_len"] == 8192
    result = plan(**settings, suggest=False)
    assert (result.seq_len, result.max_seq_len, result.group_size) == (4096, 8192, 2048)
    # SFT data: dataset.max_seq_len; else the tokenizer's.
    settings = load_config_settings(_config(tmp_path, "dataset:\n  max_seq_len: 6144\n"))
    assert settings["seq_len"] == 6144
    settings = load_config_settings(_config(tmp_path, "dataset: {}\ntokenizer:\n  max_seq_len: 2048\n"))
    assert settings["seq_len"] == 2048
    # Lengths the recipe refuses: not whole groups, or longer than the model.
    settings = load_config_settings(_config(tmp_path, "dataset:\n  block_size: 6000\n"))
    with pytest.raises(ValueError, match="training length 6000 is not divisible by the S2 group size 2048"):
        plan(**settings, suggest=False)
    settings = load_config_settings(_config(tmp_path, "dataset:\n  block_size: 16384\n"))
    with pytest.raises(ValueError, match="training length 16384 exceeds model.max_seq_len=8192"):
        plan(**settings, suggest=False)


def test_fp32_trainable_params_is_read_from_the_config_and_the_cli(tmp_path, capsys):
    assert load_config_settings("llama2_7b_100k")["fp32_trainable_params"] is True
    path = _config(tmp_path, "dtype: bf16\nfp32_trainable_params: false\n")
    assert load_config_settings(path)["fp32_trainable_params"] is False

    def optimizer_bytes(*argv: str) -> int:
        main([*argv, "--gpus", "8", "--json"])
        return json.loads(capsys.readouterr().out)["memory"]["optimizer (AdamW)"]

    assert optimizer_bytes("--config", path) == 4 * 139_726_848 // 8
    assert optimizer_bytes("--config", path, "--fp32-trainable-params") == 8 * 139_726_848 // 8
    assert optimizer_bytes("--model", "7b", "--seq-len", "8192") == 8 * 139_726_848 // 8  # recipe default
    assert optimizer_bytes("--model", "7b", "--seq-len", "8192", "--no-fp32-trainable-params") == (
        4 * 139_726_848 // 8
    )


def test_gradient_accumulation_is_the_recipes(tmp_path, capsys):
    settings = load_config_settings("llama2_7b_8k")
    assert plan(**settings, gpus=8, suggest=False).gradient_accumulation_steps == 8
    assert plan(**settings, gpus=2, suggest=False).gradient_accumulation_steps == 32
    assert main(["--config", "llama2_7b_8k", "--gpus", "3"]) == 2
    assert capsys.readouterr().err.startswith(
        "longlora_tune.plan: error: global_batch_size=64 is not divisible by batch_size=1 x world_size=3"
    )
    assert main(["--config", "llama2_7b_8k", "--gpus", "3", "--global-batch-size", "63"]) == 0
    # The batch-size suggestion names the accumulation the recipe would then use.
    tight = plan("7b", 32768, gpus=8, gpu_memory_gib=32, batch_size=2, global_batch_size=64)
    assert not tight.fits and tight.gradient_accumulation_steps == 4
    assert any(
        s.startswith("batch_size=1 with gradient accumulation 8 (global_batch_size 64 unchanged)")
        for s in tight.suggestions
    ), tight.suggestions


def test_fsdp_cpu_offload_is_neither_read_nor_suggested(tmp_path):
    # longlora_distributed has no fsdp_cpu_offload: a config that sets it runs without offloading, so it
    # is planned without, and the planner does not suggest a setting the recipe would ignore.
    plain = load_config_settings(_config(tmp_path, ""))
    offload = load_config_settings(_config(tmp_path, "fsdp_cpu_offload: true\n"))
    assert offload == plain
    tight = plan("7b", 100_000, gpus=8, gpu_memory_gib=40, activation_checkpointing=False)
    assert tight.suggestions and not any("cpu_offload" in s for s in tight.suggestions), tight.suggestions


def test_nf4_bytes_match_torchao_and_a_hand_count():
    import torch
    from torchao.dtypes.nf4tensor import to_nf4

    for rows, cols, dtype, name in ((256, 512, torch.bfloat16, "bf16"), (128, 256, torch.float32, "fp32")):
        nf4 = to_nf4(torch.randn(rows, cols, dtype=dtype))
        names, _ = nf4.__tensor_flatten__()
        measured = sum(getattr(nf4, n).numel() * getattr(nf4, n).element_size() for n in names)
        assert nf4_bytes(rows * cols, name) == measured
    # Hand count, 4096 x 4096 in bf16: 8388608 packed bytes, 262144 int8 block scales, 1024 bf16 group
    # scales, one bf16 mean and 16 bf16 levels.
    assert nf4_bytes(4096 * 4096) == 8_388_608 + 262_144 + 2 * 1024 + 2 + 32
    with pytest.raises(ValueError, match="multiple of 16384"):
        nf4_bytes(4096)


def test_qlora_frozen_weights_and_verdicts():

    p = plan("7b", 32768, gpus=1, gpu_memory_gib=48, quantize_base=True)
    d, i, layers = 4096, 11008, 32
    nf4 = layers * (4 * nf4_bytes(d * d) + 3 * nf4_bytes(d * i))
    head = 2 * 32000 * d  # the LM head stays bf16
    assert p.memory["weights (frozen)"] == nf4 + head
    bf16 = plan("7b", 32768, gpus=1, gpu_memory_gib=48)
    assert p.fits and bf16.memory["weights (frozen)"] > 3 * (nf4 + head)
    # 70B at 32k: 8 x 32 GB needs QLoRA and activation offloading; 4 x 80 GB fits with QLoRA alone.
    assert plan("70b", 32768, gpus=8, gpu_memory_gib=32, quantize_base=True, activation_offloading=True).fits
    assert not plan("70b", 32768, gpus=8, gpu_memory_gib=32, activation_offloading=True).fits
    assert not plan("70b", 32768, gpus=8, gpu_memory_gib=32, quantize_base=True).fits
    assert plan("70b", 32768, gpus=4, gpu_memory_gib=80, quantize_base=True).fits
    assert not plan("70b", 32768, gpus=4, gpu_memory_gib=80).fits
    unfit = plan("70b", 32768, gpus=4, gpu_memory_gib=80)
    assert any(s.startswith("model.quantize_base=true") and s.endswith(": fits") for s in unfit.suggestions)


def test_config_quantize_base_reaches_the_plan():

    assert load_config_settings("llama2_7b_longalpaca_32k_qlora")["quantize_base"] is True
    assert "quantize_base" not in load_config_settings("llama2_7b_longalpaca_32k")


# ------------------------------------------------------------------------------------ context parallelism


def test_context_parallel_divides_activations_and_reports_halo_traffic(capsys):
    from longlora_tune.plan.communication import halo_bytes_per_layer, ring_bytes_per_layer

    split = plan("7b", 262_144, gpus=8, context_parallel_degree=8, global_batch_size=64, loss_chunks=16)
    shape = split.shape
    slice_alone = plan("7b", 32_768, gpus=8, global_batch_size=64, loss_chunks=16, group_size=65_536 // 2)
    # Each GPU keeps the activations of its 32768-token slice, not of the 262144-token sequence.
    assert split.memory["activations saved"] == slice_alone.memory["activations saved"]
    assert split.memory["weights (frozen)"] == slice_alone.memory["weights (frozen)"]  # FSDP over all 8
    # Global batch 64 over 8 / 8 = 1 data replica: 64 micro-batches per step (not 8).
    assert split.gradient_accumulation_steps == 64
    halo = halo_bytes_per_layer(
        batch_size=1, num_heads=32, head_dim=128, group_size=65_536, degree=8, dtype_bytes=2, recompute=True
    )
    ring = ring_bytes_per_layer(
        batch_size=1, num_kv_heads=32, head_dim=128, slice_len=32_768, degree=8, dtype_bytes=2, recompute=True
    )
    assert split.communication_per_layer["halo"] == halo
    assert split.communication_per_layer["ring"] == ring > 10 * halo
    assert split.communication_per_step["halo"] == halo * shape.num_layers * 64
    # The same run without context parallelism does not fit 80 GiB; the planner says which degree does.
    whole = plan("7b", 262_144, gpus=8, global_batch_size=64, loss_chunks=16)
    assert split.fits and not whole.fits and not whole.communication_per_layer
    assert any(s.startswith("context_parallel_degree=") and s.endswith("fits") for s in whole.suggestions)
    # The longest length grows with the degree, in whole 1024-token slices.
    longest = [
        plan("7b", 32_768, gpus=8, context_parallel_degree=p).max_seq_len_fitting for p in (1, 2, 4, 8)
    ]
    assert longest == sorted(longest) and longest[3] > 3 * longest[0]
    assert all(n % (1024 * p) == 0 for n, p in zip(longest, (1, 2, 4, 8)))

    code = main(
        ["--config", "llama2_7b_100k", "--gpus", "8", "--gpu-memory", "80", "--context-parallel", "8"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "context parallel 8 (1 data x 8 context, 12500 tokens/GPU)" in out
    assert "| S2 halo exchange (this recipe) |" in out and "| ring attention |" in out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_parallel_degree": 3}, "context_parallel_degree=3 must be a positive divisor of gpus=8"),
        ({"context_parallel_degree": 2, "s2": False}, "needs S2 attention"),
        # G = 32768 / 4 = 8192 with 16 ranks: slices of 2048 < G/2.
        ({"context_parallel_degree": 16, "gpus": 16}, "each rank's slice must be a multiple of G/2=4096"),
    ],
)
def test_context_parallel_degrees_the_recipe_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan("7b", 32_768, **{"gpus": 8, **kwargs})


@pytest.mark.parametrize("name", ["llama2_7b_256k", "llama2_7b_1008k"])
def test_context_parallel_configs_fit_only_with_their_degree(name):
    settings = load_config_settings(name)
    assert settings["context_parallel_degree"] == 8 and settings["seq_len"] % (8 * 1024) == 0
    split = plan(**settings, gpus=8, gpu_memory_gib=80.0)
    assert split.fits and split.group_size == settings["seq_len"] // 4  # G = N/4 <= 2 * slice (N/8)
    assert split.gradient_accumulation_steps == 64  # global batch 64 over 1 data replica
    assert not plan(**{**settings, "context_parallel_degree": 1}, gpus=8, gpu_memory_gib=80.0).fits


# ------------------------------------------------------------------------------------------ model families

# Tiny models of every family (GQA, 4 heads over 2 KV heads), extended past their original context so the
# family's RoPE extension is the module that runs: linear (Llama 3, Mistral), llama3 over an already
# scaled Llama 3.1-style checkpoint, YaRN over Qwen2 (half-rotation RoPE, q/k/v biases), tied heads.
_FAMILY_CASES = {
    "llama3": ("llama3", ModelShape(256, 2, 4, 2, 64, 128), dict(original_max_seq_len=64)),
    "llama3_2_tied": (
        "llama3",
        FamilyShape(256, 2, 4, 2, 64, 128, tie_word_embeddings=True),
        dict(
            tie_word_embeddings=True,
            original_max_seq_len=64,
            checkpoint_rope_scaling={
                "rope_type": "llama3",
                "factor": 2.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),  # fmt: skip
    ),
    "mistral": ("mistral", ModelShape(256, 2, 4, 2, 64, 128), dict(original_max_seq_len=64)),
    "qwen2": ("qwen2", FamilyShape(256, 2, 4, 2, 64, 128, qkv_bias=True), dict(original_max_seq_len=64)),
    "qwen2_tied": (
        "qwen2",
        FamilyShape(256, 2, 4, 2, 64, 128, qkv_bias=True, tie_word_embeddings=True),
        dict(tie_word_embeddings=True, original_max_seq_len=64),
    ),
}


def _build_family(case: str, seq_len: int, *, dtype: torch.dtype, s2: bool, checkpoint: bool):
    from longlora_tune import models

    family, shape, extra = _FAMILY_CASES[case]
    torch.manual_seed(0)
    with training.set_default_dtype(dtype):
        model = getattr(models, f"longlora_{family}")(
            **_sizes(shape), max_seq_len=seq_len, s2_backend="sdpa", use_full_attn=not s2, **extra
        )
    set_trainable_params(model)
    if checkpoint:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.train()
    return model


@pytest.mark.parametrize("case", sorted(_FAMILY_CASES))
@pytest.mark.parametrize("s2", [True, False], ids=["s2", "full"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["no_ac", "ac"])
def test_family_activation_estimate_matches_autograd(case, s2, checkpoint):
    # The family terms (Qwen2's cos/sin, a trained tied head's input) are 2-7% here: a 0.5% bound sees them.
    family, shape, _ = _FAMILY_CASES[case]
    seq_len, batch, chunks = 256, 2, 4
    model = _build_family(case, seq_len, dtype=torch.bfloat16, s2=s2, checkpoint=checkpoint)
    measured = _saved_bytes(model, shape, seq_len, batch, chunks)
    estimate = activation_bytes(
        shape, seq_len, batch, s2=s2, activation_checkpointing=checkpoint, loss_chunks=chunks, family=family
    )
    assert abs(estimate.saved - measured) <= 0.005 * measured, (estimate.saved, measured)


@pytest.mark.parametrize("case", ["qwen2_tied", "llama3"])
def test_family_flops_match_flop_counter(case):
    # A trained tied head also computes its weight gradient (vocab x embed_dim per token).
    family, shape, _ = _FAMILY_CASES[case]
    seq_len, batch = 128, 2
    model = _build_family(case, seq_len, dtype=torch.float32, s2=True, checkpoint=True)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _loss(model, shape, seq_len, batch, 2).backward()
    expected = step_flops(shape, seq_len, batch, group_size=seq_len // 4, attention="dense")
    assert counter.get_total_flops() == pytest.approx(expected.total, rel=1e-9)
    untrained_head = step_flops(shape, seq_len, batch, group_size=32, attention="dense", trainable_extras=())
    head_grad = 2 * batch * seq_len * shape.embed_dim * shape.vocab_size
    assert expected.backward - untrained_head.backward == (head_grad if shape.tie_word_embeddings else 0)


@pytest.mark.parametrize("case", sorted(_FAMILY_CASES))
@pytest.mark.parametrize("extras", [("embed", "norm"), ("norm",), ()], ids=["embed_norm", "norm", "lora"])
def test_family_parameter_counts_match_the_model(case, extras):
    # The model the recipe trains, built on meta with the family's builder and made trainable by the
    # recipe's set_trainable_params (requires_grad), against the planner's numbers.
    family, shape, extra = _FAMILY_CASES[case]
    with torch.device("meta"):
        model = _build_family(case, 256, dtype=torch.float32, s2=True, checkpoint=False)
    set_trainable_params(model, extras=extras)
    params = list(model.parameters())  # a tied head is the embedding: listed once
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    assert parameter_counts(shape, trainable_extras=extras) == (trainable, total)
    assert parameter_counts(shape, trainable_extras=extras, family=family) == (trainable, total)
    # LoRA rank 8 on q and o (64 -> 64) and k, v (64 -> 32: 2 KV heads) in 2 layers; 5 RMSNorm scales.
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))
    assert trainable == lora + ("embed" in extras) * 256 * 64 + ("norm" in extras) * 5 * 64
    biases = 2 * (64 + 32 + 32) if family == "qwen2" else 0
    heads = 1 if shape.tie_word_embeddings else 2
    assert total == lora + heads * 256 * 64 + 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128) + 5 * 64 + biases


# Published totals (Hugging Face model cards / safetensors metadata) and the LongLoRA trainable set (LoRA
# rank 8 on q, k, v, o + embeddings + norms; a tied head is the embedding, trained once).
_PUBLISHED = {
    "llama3_8b": (8_030_261_248, 532_418_560),
    "llama3_1_70b": (70_553_706_496, 1_084_760_064),
    "llama3_2_1b": (1_235_814_400, 264_439_808),
    "llama3_2_3b": (3_212_749_824, 398_765_056),
    "mistral_7b": (7_248_023_552, 141_299_712),
    "qwen2_5_0_5b": (494_032_768, 137_259_904),
    "qwen2_5_7b": (7_615_616_512, 550_247_936),
    "qwen2_5_72b": (72_706_203_648, 1_279_795_200),
}


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_published_family_shapes_give_the_published_parameter_counts(name):
    from longlora_tune import models
    from longlora_tune.models.shapes import MODEL_SHAPES

    total, trainable = _PUBLISHED[name]
    shape = MODEL_SHAPES[name]
    result = plan(name, 8192, gpus=8, suggest=False)
    assert (result.trainable_params, result.total_params - shape.lora_params(8)) == (trainable, total)
    # The sized builder the configs name makes the same model.
    with torch.device("meta"):
        model = getattr(models, f"longlora_{name}")(max_seq_len=8192)
    set_trainable_params(model)
    counts = (
        [p.numel() for p in model.parameters()],
        [p.numel() for p in model.parameters() if p.requires_grad],
    )
    assert (sum(counts[1]), sum(counts[0])) == (result.trainable_params, result.total_params)
    # Frozen weights sharded over 8 GPUs in bf16: the tied head is not counted twice.
    assert result.memory["weights (frozen)"] == 2 * (result.total_params - trainable) // 8


def test_family_vocabularies_size_the_loss_phase():
    # The loss keeps fp32 log-probabilities for every token: 4 x tokens x vocab bytes.
    for name, vocab in (
        ("7b", 32_000),
        ("llama3_1_8b", 128_256),
        ("mistral_7b", 32_768),
        ("qwen2_5_7b", 152_064),
    ):
        estimate = plan(name, 32768, gpus=8, suggest=False)
        assert estimate.shape.vocab_size == vocab and estimate.family == model_family(name)
        act = activation_bytes(estimate.shape, 32768, loss_chunks=8, family=estimate.family)
        assert act.loss_saved == 4 * 32768 * vocab
        assert estimate.memory["loss phase: fp32 log-probs + logits (*)"] == act.loss_phase


def test_family_of_models_shapes_and_configs(tmp_path):
    assert [model_family(n) for n in ("7b", "70b", "llama3_2_1b", "mistral_7b", "qwen2_5_72b")] == [
        "llama2",
        "llama2",
        "llama3",
        "mistral",
        "qwen2",
    ]
    assert model_family(FamilyShape(256, 2, 4, 2, 64, 128, qkv_bias=True)) == "qwen2"
    assert model_family(FamilyShape(256, 2, 4, 2, 64, 128, tie_word_embeddings=True)) == "llama3"
    with pytest.raises(ValueError, match="ties its embeddings and longlora_mistral cannot build it"):
        model_family(FamilyShape(256, 2, 4, 2, 64, 128, tie_word_embeddings=True), "mistral")
    with pytest.raises(ValueError, match="has no q/k/v biases and longlora_qwen2 cannot build it"):
        plan(ModelShape(256, 2, 4, 2, 64, 128), 256, family="qwen2")
    with pytest.raises(ValueError, match="Unknown family 'gemma'"):
        model_family("7b", "gemma")
    # Sized builders name their published shape; component builders take explicit sizes.
    sized = tmp_path / "sized.yaml"
    sized.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_qwen2_5_7b\n  max_seq_len: 131072\n"
    )
    assert {k: load_config_settings(str(sized))[k] for k in ("model", "family")} == {
        "model": "qwen2_5_7b",
        "family": "qwen2",
    }
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_qwen2\n  vocab_size: 256\n  num_layers: 2\n"
        "  num_heads: 4\n  num_kv_heads: 2\n  embed_dim: 64\n  intermediate_dim: 96\n  max_seq_len: 512\n"
        "  tie_word_embeddings: true\n"
    )
    settings = load_config_settings(str(explicit))
    assert settings["family"] == "qwen2"
    assert settings["model"] == FamilyShape(256, 2, 4, 2, 64, 96, tie_word_embeddings=True, qkv_bias=True)
    explicit.write_text(explicit.read_text().replace("  intermediate_dim: 96\n", ""))
    with pytest.raises(ValueError, match="longlora_qwen2 needs model.intermediate_dim"):
        load_config_settings(str(explicit))
    llama3 = tmp_path / "llama3.yaml"
    llama3.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama3\n  vocab_size: 256\n  num_layers: 2\n"
        "  num_heads: 4\n  num_kv_heads: 2\n  embed_dim: 4096\n  max_seq_len: 512\n"
    )
    # torchtune's Llama 3 width rule when intermediate_dim is not given (lora_llama3_2's default).
    from torchtune.models.llama3._model_utils import scale_hidden_dim_for_mlp

    assert load_config_settings(str(llama3))["model"].intermediate_dim == scale_hidden_dim_for_mlp(4096)


@pytest.mark.parametrize("name", ["llama3_8b_64k", "llama3_1_8b_256k", "mistral_7b_64k", "qwen2_5_7b_128k"])
def test_family_configs_plan_on_the_command_line(name, capsys):
    assert main(["--config", name, "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"## {name} (") and "**FITS**" in out


# ------------------------------------------------------------- memory-budgeted activation checkpointing


@pytest.mark.parametrize("layers", [1, 2])
def test_activation_estimate_matches_autograd_with_some_layers_checkpointed(layers):
    from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing

    shape, seq_len, batch = SHAPES[1]  # 3 layers
    chunks = 4
    model = _build(shape, seq_len, dtype=torch.bfloat16, s2=True, checkpoint=False)
    apply_activation_checkpointing(model, layers)
    measured = _saved_bytes(model, shape, seq_len, batch, chunks)
    estimate = activation_bytes(
        shape, seq_len, batch, dtype="bf16", checkpoint_layers=layers, loss_chunks=chunks
    )
    assert abs(estimate.saved - measured) <= 0.15 * measured, (estimate.saved, measured)
    # Between all and none, in proportion to the layers that keep their activations.
    every = activation_bytes(shape, seq_len, batch, dtype="bf16", loss_chunks=chunks)
    none = activation_bytes(
        shape, seq_len, batch, dtype="bf16", activation_checkpointing=False, loss_chunks=chunks
    )
    assert every.saved < estimate.saved < none.saved


def test_flops_with_some_layers_checkpointed_match_flop_counter():
    from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing

    shape, seq_len, batch = SHAPES[1]
    model = _build(shape, seq_len, dtype=torch.float32, s2=True, checkpoint=False)
    apply_activation_checkpointing(model, 1)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _loss(model, shape, seq_len, batch, 2).backward()
    expected = step_flops(
        shape, seq_len, batch, group_size=seq_len // 4, checkpoint_layers=1, attention="dense"
    )
    assert counter.get_total_flops() == pytest.approx(expected.total, rel=1e-9)
    every = step_flops(shape, seq_len, batch, group_size=seq_len // 4, attention="dense")
    assert expected.recompute == pytest.approx(every.recompute / 3, rel=1e-12)


def test_peak_for_n_checkpointed_layers_is_the_per_layer_arithmetic():
    shape, seq_len = plan("7b", 32_768).shape, 32_768
    layers = shape.num_layers
    per_layer = activation_bytes(shape, seq_len, activation_checkpointing=False).per_layer_saved
    layer_input = 2 * seq_len * shape.embed_dim  # bf16 hidden state: all a checkpointed layer keeps
    every = plan("7b", seq_len, gpus=8, gpu_memory_gib=80)
    none = plan("7b", seq_len, gpus=8, gpu_memory_gib=80, activation_checkpointing=False)
    head = every.memory["activations saved"] - layers * layer_input
    grads = none.memory["layer backward phase: recompute + grads (*)"]
    every_phase = every.memory["layer backward phase: recompute + grads (*)"]
    assert every.checkpoint_layers == layers and none.checkpoint_layers == 0
    assert every.checkpoint_layers_peak_bytes == none.checkpoint_layers_peak_bytes
    assert len(every.checkpoint_layers_peak_bytes) == layers + 1
    for n in (0, 1, 7, 16, layers - 1, layers):
        p = plan("7b", seq_len, gpus=8, gpu_memory_gib=80, checkpoint_layers=n)
        assert p.checkpoint_layers == n
        assert p.peak_bytes == every.checkpoint_layers_peak_bytes[n]
        # A checkpointed layer keeps its input, the others everything; the first N are the checkpointed
        # ones, so a recompute only adds a layer's activations to the backward phase when all N are.
        assert p.memory["activations saved"] == n * layer_input + (layers - n) * per_layer + head
        if n < layers:
            assert p.memory["layer backward phase: recompute + grads (*)"] == grads
        else:
            assert every_phase - per_layer == 3 * 2 * seq_len * shape.intermediate_dim  # the MLP's gradients
        # Everything else in the plan is unchanged; the peak counts the larger phase, 5% fragmentation and
        # the CUDA context.
        phases = max(
            p.memory["loss phase: fp32 log-probs + logits (*)"],
            p.memory["layer backward phase: recompute + grads (*)"],
        )
        fixed = sum(
            v
            for k, v in p.memory.items()
            if k not in ("activations saved", "overhead (context, fragmentation)") and "(*)" not in k
        )
        live = fixed + p.memory["activations saved"] + phases
        assert p.peak_bytes == live + int(1.5 * 2**30) + int(0.05 * live)
        assert p.flops.recompute == pytest.approx(every.flops.recompute * n / layers, rel=1e-12)
    peaks = every.checkpoint_layers_peak_bytes
    # Each layer that keeps its activations instead of its input adds their difference (times 1.05).
    assert peaks[0] - peaks[1] == pytest.approx(1.05 * (per_layer - layer_input), abs=2)
    with pytest.raises(ValueError, match=r"activation_checkpointing_layers=33 must be in \[0, 32\]"):
        plan("7b", seq_len, checkpoint_layers=33)
    with pytest.raises(
        ValueError, match="activation_checkpointing_layers=2 needs activation checkpointing on"
    ):
        plan("7b", seq_len, checkpoint_layers=2, activation_checkpointing=False)


@pytest.mark.parametrize(
    ("model", "seq_len", "memory"),
    [
        ("7b", 8192, 80),
        ("7b", 16_384, 80),
        ("7b", 32_768, 80),
        ("7b", 100_000, 80),
        ("13b", 32_768, 80),
        ("13b", 16_384, 40),
    ],
)
def test_suggestion_is_the_smallest_number_of_checkpointed_layers_that_fits(model, seq_len, memory):
    result = plan(model, seq_len, gpus=8, gpu_memory_gib=memory)
    layers = result.shape.num_layers
    capacity = memory * 2**30
    suggestion = result.checkpoint_suggestion
    k = suggestion["layers"]
    assert plan(model, seq_len, gpus=8, gpu_memory_gib=memory, checkpoint_layers=k).fits
    assert suggestion["peak_bytes"] == result.checkpoint_layers_peak_bytes[k] <= capacity
    for fewer in range(k):
        assert not plan(
            model, seq_len, gpus=8, gpu_memory_gib=memory, checkpoint_layers=fewer, suggest=False
        ).fits
    every = result.flops
    assert suggestion["flops_saved_vs_all"] == pytest.approx(
        every.recompute * (layers - k) / layers, rel=1e-12
    )
    assert suggestion["fraction_of_step_saved_vs_all"] == pytest.approx(
        suggestion["flops_saved_vs_all"] / every.total
    )
    assert f"is {k} of {layers}" in result.table()


def test_checkpointing_suggestions_at_both_ends():
    # 7B at 8k on 80 GiB fits without any recompute: a quarter of the step's FLOPs is saved.
    short = plan("7b", 8192, gpus=8, gpu_memory_gib=80).checkpoint_suggestion
    assert short["layers"] == 0 and 0.25 < short["fraction_of_step_saved_vs_all"] < 1 / 3
    # 70B at 32k on 8 x 80 GiB does not fit with any number of checkpointed layers.
    big = plan("70b", 32_768, gpus=8, gpu_memory_gib=80)
    assert not big.fits and big.checkpoint_suggestion is None
    assert "no number of checkpointed layers fits" in big.table()
    # Only some layers checkpointed and too big: the planner says that all of them would fit.
    some = plan("7b", 32_768, gpus=8, gpu_memory_gib=80, checkpoint_layers=4)
    assert not some.fits and any(
        s.startswith("activation_checkpointing_layers=all: fits (+") for s in some.suggestions
    )


def test_odd_head_count_plans_with_the_shifted_heads_at_the_seam():
    # SmolLM2-135M's 9 query heads: 4 unshifted, 5 shifted. A slice start at a multiple of G has the 5
    # shifted heads straddling it, so the halo and the seam are sized for 5 heads.
    from longlora_tune.plan.communication import halo_bytes_per_layer

    smol = ModelShape(49_152, 30, 9, 3, 576, 1536)
    split = plan(smol, 16_384, gpus=2, context_parallel_degree=2)  # G = 4096, slices of 8192
    halo = dict(batch_size=1, num_heads=9, head_dim=64, group_size=4096, degree=2, dtype_bytes=2)
    assert split.communication_per_layer["halo"] == halo_bytes_per_layer(**halo, recompute=True)
    alone = plan(smol, 8192, gpus=2, group_size=4096)
    # Halo k+v, the seam's k+v (G keys) and its output, bf16, for 5 heads of dim 64.
    seam = 2 * 5 * 64 * (2 * 2048 + 2 * 4096 + 2048)
    assert split.memory[LAYER_PHASE] - alone.memory[LAYER_PHASE] == seam


def test_context_parallel_traffic_counts_only_recomputed_layers_twice():
    from longlora_tune.plan.communication import halo_bytes_per_layer

    kwargs = dict(gpus=8, context_parallel_degree=8, global_batch_size=64, loss_chunks=16)
    halo = dict(batch_size=1, num_heads=32, head_dim=128, group_size=65_536, degree=8, dtype_bytes=2)
    twice, once = halo_bytes_per_layer(**halo, recompute=True), halo_bytes_per_layer(**halo, recompute=False)
    assert twice > once
    some = plan("7b", 262_144, checkpoint_layers=10, **kwargs)
    assert some.communication_per_step["halo"] == (10 * twice + 22 * once) * 64


def test_cli_and_config_read_the_number_of_checkpointed_layers(tmp_path, capsys):
    # The config's auto levers, fixed on the command line (llama2_7b_100k's values before they became auto).
    fixed = ["--checkpoint-layers", "all", "--loss-chunks", "16", "--sequence-tile-tokens", "off"]
    fixed += ["--no-activation-offloading"]
    args = ["--config", "llama2_7b_100k", "--gpus", "8", "--gpu-memory", "80", "--no-linear-ce", *fixed]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint_layers"] == 32 and len(out["checkpoint_layers_peak_bytes"]) == 33
    k = out["checkpoint_suggestion"]["layers"]
    assert 0 < k < 32 and out["checkpoint_layers_peak_bytes"][k - 1] > 80 * 2**30
    assert main(args) == 0
    assert f"`activation_checkpointing_layers: {k}`" in capsys.readouterr().out
    assert main([*args, "--checkpoint-layers", "4", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["checkpoint_layers"] == 4
    for bad, message in (
        ("40", "must be in [0, 32]"),
        ("x", "activation_checkpointing_layers='x' must be all"),
    ):
        assert main([*args, "--checkpoint-layers", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama2_7b\n  max_seq_len: 32768\n"
        "enable_activation_checkpointing: true\nactivation_checkpointing_layers: 22\n"
    )
    assert load_config_settings(str(config))["checkpoint_layers"] == 22
    assert plan(**load_config_settings(str(config))).checkpoint_layers == 22


def _linear_ce_held_bytes(model, shape: ModelShape, seq_len: int, batch: int, chunks: int) -> int:
    """What forward + ChunkedLinearCrossEntropyLoss hold for backward: packed tensors and the op's gradients.

    The op computes its input gradients in forward and keeps them on its autograd node (not through
    ``save_for_backward``), so they are read from that node.
    """
    from longlora_tune.modules.linear_ce import ChunkedLinearCrossEntropyLoss

    loss_fn = ChunkedLinearCrossEntropyLoss(num_output_chunks=chunks)
    loss_fn.set_model_output(model)
    storages: dict[int, int] = {}
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq_len), generator=generator)
    labels = torch.randint(0, shape.vocab_size, (batch, seq_len), generator=generator)
    with _counting_saved_storages(model, storages), loss_fn.scoring(labels):
        loss = model(tokens)
    assert torch.isfinite(loss)
    nodes, seen, held = [loss.grad_fn], set(), []
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "grads"):
            held += [g for g in node.grads if g is not None]
        nodes += [n for n, _ in node.next_functions]
    assert held, "the linear cross-entropy node was not found"
    return sum(storages.values()) + sum(g.untyped_storage().nbytes() for g in held)


@pytest.mark.parametrize("case", ["llama2", "qwen2_tied"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["no_ac", "ac"])
def test_linear_ce_activation_estimate_matches_autograd(case, checkpoint):
    # No vocabulary-sized tensor is held for backward: the estimate drops the fp32 log-probs and the tied
    # head's input, and keeps the hidden-state (and tied weight) gradient.
    if case == "llama2":
        family, (shape, seq_len, batch) = "llama2", SHAPES[0]
        model = _build(shape, seq_len, dtype=torch.bfloat16, s2=True, checkpoint=checkpoint)
    else:
        family, shape, _ = _FAMILY_CASES[case]
        seq_len, batch = 256, 2
        model = _build_family(case, seq_len, dtype=torch.bfloat16, s2=True, checkpoint=checkpoint)
    measured = _linear_ce_held_bytes(model, shape, seq_len, batch, 4)
    estimate = activation_bytes(
        shape,
        seq_len,
        batch,
        activation_checkpointing=checkpoint,
        loss_chunks=4,
        family=family,
        linear_ce=True,
    )
    assert abs(estimate.saved - measured) <= 0.01 * measured, (estimate.saved, measured)
    chunked = activation_bytes(
        shape, seq_len, batch, activation_checkpointing=checkpoint, loss_chunks=4, family=family
    )
    assert chunked.loss_saved == 4 * batch * seq_len * shape.vocab_size > estimate.loss_saved


def test_linear_ce_is_read_from_the_config_and_the_cli(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama2_7b\n  max_seq_len: 100000\n"
        "loss:\n  _component_: longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss\n"
        "  num_output_chunks: 16\n"
    )
    settings = load_config_settings(str(cfg))
    assert settings["linear_ce"] is True and settings["loss_chunks"] == 16
    fused, plain = plan(**settings), plan(**{**settings, "linear_ce": False})
    # 100k tokens x 32000 vocabulary: the fp32 log-probs alone are 11.9 GiB. The fused loss holds the bf16
    # hidden-state gradient and its bf16 input (100k x 4096 each) and one 6250-token chunk's fp32 logits
    # with their bf16 copy: 2.6 GiB.
    assert plain.memory["loss phase: fp32 log-probs + logits (*)"] > 19 * 2**30
    hand_count = 2 * (2 * 100_000 * 4096) + (4 + 2) * 6250 * 32_000
    assert fused.memory["loss phase: one chunk's logits + hidden-state gradient (*)"] == hand_count
    assert fused.checkpoint_suggestion["layers"] < plain.checkpoint_suggestion["layers"]
    assert main(["--config", str(cfg), "--no-linear-ce"]) == 0
    assert "loss CEWithChunkedOutputLoss in 16 chunks" in capsys.readouterr().out
    assert main(["--config", str(cfg), "--linear-ce"]) == 0
    assert "loss ChunkedLinearCrossEntropyLoss in 16 chunks" in capsys.readouterr().out


def test_fsdp_root_is_gathered_through_forward_and_backward_as_planned(single_rank_group):
    # The recipe's shard_model: the root unit (embeddings, norm, head) is all-gathered while the layers run
    # forward and again while they run backward, so a full compute-dtype copy is held through both phases.
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    from longlora_tune.training.distributed import shard_model

    shape = SHAPES[0][0]
    model = _build(shape, 64, dtype=torch.float32, s2=True, checkpoint=False)
    shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    root = {"embed": lambda: model.tok_embeddings.weight, "head": lambda: model.output.weight}
    seen: dict[str, dict[str, tuple[bool, torch.dtype]]] = {}

    def probe(phase: str):
        def hook(*_):
            seen[phase] = {k: (isinstance(get(), DTensor), get().dtype) for k, get in root.items()}

        return hook

    model.layers[-1].register_forward_pre_hook(probe("last layer forward"))
    model.layers[0].register_full_backward_pre_hook(probe("first layer backward"))
    _loss(model, shape, 64, 1, 2).backward()
    gathered = {k: (False, torch.bfloat16) for k in root}
    assert seen == {"last layer forward": gathered, "first layer backward": gathered}
    assert all(isinstance(get(), DTensor) for get in root.values())  # resharded after the step
    planned = plan(shape, 64, gpus=2, dtype="bf16", suggest=False).memory
    full_bytes = sum(2 * get().numel() for get in root.values())
    assert planned["fsdp root gathered (embeddings, head)"] == full_bytes
    assert (
        plan(shape, 64, gpus=2, fsdp=False, suggest=False).memory["fsdp root gathered (embeddings, head)"]
        == 0
    )


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages that ops under this mode allocate while they are alive, and their peak.

    Followed per storage, not per tensor: a tensor can die while a view or a detached alias keeps its
    storage (activation checkpointing keeps the recomputed tensors as detached aliases).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._alive.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            # New storage only: not an input written in place or through out=, not a view of one.
            if ptr not in inputs and ptr not in self._alive and storage.nbytes():
                self._alive.add(ptr)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr, storage.nbytes())
        return out


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_trained"])
def test_linear_ce_loss_phase_is_what_the_op_allocates(dtype, tied):
    # The op alone, its input made before: the gradients it keeps, one chunk's logits, the tied head's
    # fp32 weight-gradient accumulators.
    from longlora_tune.modules.linear_ce import linear_cross_entropy

    shape = FamilyShape(512, 1, 4, 4, 64, 128, tie_word_embeddings=tied)
    tokens, chunks, torch_dtype = 1024, 4, _DTYPES[dtype]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, 64, generator=generator).to(torch_dtype).requires_grad_()
    weight = torch.randn(512, 64, generator=generator).to(torch_dtype).requires_grad_(tied)
    labels = torch.randint(0, 512, (tokens,), generator=generator)
    with _LiveBytes() as tracker:
        loss = linear_cross_entropy(hidden, weight, labels, num_chunks=chunks)
    assert torch.isfinite(loss)
    act = activation_bytes(
        shape, tokens, dtype=dtype, loss_chunks=chunks, activation_checkpointing=False, linear_ce=True
    )
    planned = act.loss_phase - hidden.numel() * hidden.element_size()  # the input is not the op's
    assert abs(tracker.peak - planned) <= 0.02 * planned, (tracker.peak, planned)


# ----------------------------------------------------------------------------------- sequence tiling


def _tiled(shape: ModelShape, seq_len: int, *, dtype: torch.dtype, tile: int, checkpoint_layers: int):
    """The recipe's arrangement: the MLP blocks tiled, the first N layers checkpointed by our wrapper."""
    from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing
    from longlora_tune.training.sequence_tiling import apply_sequence_tiling

    model = _build(shape, seq_len, dtype=dtype, s2=True, checkpoint=False)
    apply_sequence_tiling(model, tile)
    apply_activation_checkpointing(model, checkpoint_layers)
    return model


@pytest.mark.parametrize("tile", [128, 100])  # divides 2 x 384 tokens, does not
@pytest.mark.parametrize("checkpoint_layers", [0, 1])
def test_tiled_activation_estimate_matches_autograd(tile, checkpoint_layers):
    # A tiled MLP block keeps only its input: the second norm's float32 tensors and the three SwiGLU tensors
    # are no longer saved by the layers that keep their activations.
    shape, seq_len, batch = SHAPES[1]
    model = _tiled(shape, seq_len, dtype=torch.bfloat16, tile=tile, checkpoint_layers=checkpoint_layers)
    measured = _saved_bytes(model, shape, seq_len, batch, 4)
    kwargs = dict(dtype="bf16", checkpoint_layers=checkpoint_layers, loss_chunks=4)
    estimate = activation_bytes(shape, seq_len, batch, sequence_tile_tokens=tile, **kwargs)
    assert abs(estimate.saved - measured) <= 0.05 * measured, (estimate.saved, measured)
    # Hand count of a tiled layer: its input and the MLP block's, attention's q, k, v, output, float32
    # log-sum-exp and S² re-assembled output, and the output projection's LoRA B input.
    t, e, d = batch * seq_len, 2, shape.embed_dim
    attention = 5 * e * t * d + 4 * t * shape.num_heads
    assert estimate.per_layer_saved == 2 * e * t * d + attention + e * t * 8


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("tile", [128, 100])
def test_tile_backward_is_what_the_ops_allocate(dtype, tile):
    # The tiled MLP block's backward alone (its input and the incoming gradient made before): the input
    # gradient it fills, plus one tile's rebuilt norm and SwiGLU tensors and their gradients at a time
    # (the last tile of 100 is shorter: the peak is a full tile's).
    from longlora_tune.training.sequence_tiling import tiled_position_wise

    shape, seq_len, batch = SHAPES[1]
    layer = _build(shape, seq_len, dtype=_DTYPES[dtype], s2=True, checkpoint=False).layers[0]
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq_len, shape.embed_dim, generator=generator).to(_DTYPES[dtype]).requires_grad_()
    out = tiled_position_wise((layer.mlp_norm, layer.mlp, layer.mlp_scale), h, tile)
    grad = torch.randn(out.shape, generator=generator).to(out.dtype)
    with _LiveBytes() as tracker:
        out.backward(grad)
    planned = h.numel() * h.element_size() + tile_backward_bytes(shape, tile, dtype)
    assert abs(tracker.peak - planned) <= 0.05 * planned, (tracker.peak, planned)
    untiled = activation_bytes(shape, seq_len, batch, dtype=dtype, activation_checkpointing=False)
    tiled = activation_bytes(
        shape, seq_len, batch, dtype=dtype, activation_checkpointing=False, sequence_tile_tokens=tile
    )
    # A kept layer's backward then holds one tile's MLP tensors instead of the MLP-wide gradients.
    hidden = h.element_size() * batch * seq_len * shape.embed_dim
    assert tiled.recompute_transient == 5 * hidden + tile_backward_bytes(shape, tile, dtype)
    assert tiled.recompute_transient < untiled.recompute_transient


@pytest.mark.parametrize(
    ("seq_len", "tile"), [(2048, 256), (4096, 64), (2048, None)], ids=["mlp_tile", "recompute_end", "untiled"]
)
def test_checkpointed_layer_backward_phase_is_what_the_ops_allocate(seq_len, tile):
    # One checkpointed layer's recompute and backward (its input and the incoming gradient made before),
    # with Llama proportions (GQA 4:1, MLP 3.5x): tiled, the peak is the MLP tiles' backward for a large
    # tile and the recompute's end at the output projection for a small one; untiled, the whole rebuilt
    # layer and its gradients (the term is not pessimistic: within 5% of the measured peak).
    from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing
    from longlora_tune.training.sequence_tiling import apply_sequence_tiling

    shape = ModelShape(512, 2, 8, 2, 512, 1792)
    model = _build(shape, seq_len, dtype=torch.bfloat16, s2=True, checkpoint=False)
    apply_sequence_tiling(model, tile)
    apply_activation_checkpointing(model, 2)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq_len, shape.embed_dim, generator=generator).bfloat16().requires_grad_()
    out = model.layers[1](x)
    grad = torch.randn(out.shape, generator=generator).bfloat16()
    with _LiveBytes() as tracker:
        out.backward(grad)
    measured = tracker.peak + grad.numel() * grad.element_size()
    planned = activation_bytes(shape, seq_len, 1, sequence_tile_tokens=tile).recompute_transient
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


@pytest.mark.parametrize(
    ("intermediate", "kv_heads", "dtype"),
    [(512, 8, torch.bfloat16), (512, 2, torch.float32), (1792, 2, torch.bfloat16), (2560, 8, torch.float32)],
    ids=["attention-mha-bf16", "attention-gqa-fp32", "mlp-gqa-bf16", "mlp-mha-fp32"],
)
def test_kept_layer_backward_phase_is_what_the_ops_allocate(intermediate, kv_heads, dtype):
    # The backward of a layer that kept its activations (the incoming gradient made before): the larger of
    # the SwiGLU product's backward (a wide MLP) and attention's (a narrow one), within 5%, never under.
    shape = ModelShape(512, 2, 8, kv_heads, 512, intermediate)
    model = _build(shape, 2048, dtype=dtype, s2=True, checkpoint=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2048, shape.embed_dim, generator=generator).to(dtype).requires_grad_()
    out = model.layers[1](x)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    with _LiveBytes() as tracker:
        out.backward(grad)
    measured = tracker.peak + grad.numel() * grad.element_size()
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    planned = activation_bytes(shape, 2048, 1, dtype=name, checkpoint_layers=1).recompute_transient
    assert measured <= planned <= 1.05 * measured, (planned, measured)


@pytest.mark.parametrize("checkpoint_layers", [0, 1, 3])
def test_tiled_flops_match_flop_counter(checkpoint_layers):
    # Every layer reruns its MLP tile by tile in backward; a checkpointed layer's recompute skips the MLP.
    shape, seq_len, batch = SHAPES[1]
    model = _tiled(shape, seq_len, dtype=torch.float32, tile=100, checkpoint_layers=checkpoint_layers)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _loss(model, shape, seq_len, batch, 2).backward()
    kwargs = dict(group_size=seq_len // 4, checkpoint_layers=checkpoint_layers, attention="dense")
    kwargs["activation_checkpointing"] = checkpoint_layers > 0
    expected = step_flops(shape, seq_len, batch, sequence_tile_tokens=100, **kwargs)
    assert counter.get_total_flops() == pytest.approx(expected.total, rel=1e-9)
    # Against untiled: one MLP forward more per layer kept whole, one down projection per checkpointed one
    untiled = step_flops(shape, seq_len, batch, **kwargs)
    t, d, i, kv = batch * seq_len, shape.embed_dim, shape.intermediate_dim, shape.kv_dim
    extra = (shape.num_layers - checkpoint_layers) * 2 * t * 3 * d * i + checkpoint_layers * 2 * t * i * d
    # ... and every layer's q/k/v projections with their rank-8 LoRA once more in backward.
    extra += shape.num_layers * 2 * t * (d * d + 2 * d * kv + 8 * (4 * d + 2 * kv))
    assert expected.total - untiled.total == pytest.approx(extra, rel=1e-12)


def test_tiling_takes_the_mlp_out_of_the_layer_phase_at_length():

    kwargs = dict(gpus=1, gpu_memory_gib=80, quantize_base=True, linear_ce=True, activation_offloading=True)
    untiled = plan("llama3_1_8b", 393_216, **kwargs)
    tiled = plan("llama3_1_8b", 393_216, sequence_tile_tokens=8192, **kwargs)
    shape, t = tiled.shape, 393_216
    d, e = shape.embed_dim, 2
    # Every layer is checkpointed: the tiled layer-backward phase is the recompute's end (incoming gradient,
    # attention's tensors, the output projection's four hidden-size tensors) or the MLP tiles' backward.
    attention = 5 * e * t * d + 4 * t * shape.num_heads + e * t * 8
    tile = tile_backward_bytes(shape, 8192)
    assert tiled.memory[LAYER_PHASE] == e * t * d + attention + max(4 * e * t * d, 2 * e * t * d + tile)
    # The final norm keeps its bf16 input either way; untiled also its float32 inverse RMS.
    assert untiled.memory["activations saved"] - tiled.memory["activations saved"] == 4 * t
    assert not untiled.fits and tiled.fits and tiled.sequence_tile_tokens == 8192
    assert tiled.max_seq_len_fitting > 1.6 * untiled.max_seq_len_fitting
    assert any(s.startswith("sequence_tile_tokens=8192 (") for s in untiled.suggestions)
    # Already tiled: no suggestion tiles again (turning it off, where that fits at fewer FLOPs, may be one).
    tiled_suggestions = plan("7b", 262_144, sequence_tile_tokens=4096).suggestions
    assert not any(
        "sequence_tile_tokens=" in s and "sequence_tile_tokens=null" not in s for s in tiled_suggestions
    )
    with pytest.raises(ValueError, match=r"sequence_tile_tokens=0 must be a positive integer or null"):
        plan("7b", 8192, sequence_tile_tokens=0)


def test_tiling_is_read_from_the_config_and_the_cli(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  _component_: longlora_tune.models.longlora_llama3_1_8b\n  max_seq_len: 262144\n"
        "sequence_tile_tokens: 4096\n"
    )
    assert load_config_settings(str(config))["sequence_tile_tokens"] == 4096
    args = ["--config", str(config), "--gpus", "8"]
    main([*args, "--json"])
    assert json.loads(capsys.readouterr().out)["sequence_tile_tokens"] == 4096
    main(args)
    assert "MLP in tiles of 4096 tokens" in capsys.readouterr().out
    main([*args, "--sequence-tile-tokens", "off", "--json"])
    assert json.loads(capsys.readouterr().out)["sequence_tile_tokens"] is None
    main([*args, "--sequence-tile-tokens", "1000", "--json"])
    assert json.loads(capsys.readouterr().out)["sequence_tile_tokens"] == 1000
    for bad in ("0", "8k"):
        assert main([*args, "--sequence-tile-tokens", bad]) == 2
        err = capsys.readouterr().err
        assert f"sequence_tile_tokens={bad if bad == '0' else repr(bad)} must be a positive integer" in err
        assert err.count("\n") == 1


# ------------------------------------------------------------------------------- activation offloading


def _offloaded_by_torchtune_rule(
    model, shape: ModelShape, seq_len: int, batch: int, chunks: int
) -> list[int]:
    """The bytes OffloadActivations would copy: its pack rule (>= 1024 bytes, not a Parameter object) on
    every save inside the model's forward, with the LM head excluded as get_act_offloading_ctx_manager does.
    (Its CUDA streams cannot run here; the rule is the same pack hook.)"""
    copied: list[int] = []
    head = [False]
    model.output.register_forward_pre_hook(lambda *args: head.__setitem__(0, True))
    model.output.register_forward_hook(lambda *args: head.__setitem__(0, False))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.element_size() * tensor.nelement()
        if not head[0] and nbytes >= 1024 and not isinstance(tensor, torch.nn.Parameter):
            copied.append(nbytes)
        return tensor

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq_len), generator=generator)
    model.set_num_output_chunks(chunks)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens)
    return copied


@pytest.mark.parametrize("checkpoint_layers", [0, 1, 3])
@pytest.mark.parametrize("tile", [None, 128])
def test_offloaded_bytes_are_what_torchtune_offloading_copies(checkpoint_layers, tile):
    from longlora_tune.plan.activations import offloaded_tensor_bytes, pinned_bytes
    from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing
    from longlora_tune.training.sequence_tiling import apply_sequence_tiling

    shape, seq_len, batch = SHAPES[1]
    model = _build(shape, seq_len, dtype=torch.bfloat16, s2=True, checkpoint=False)
    apply_sequence_tiling(model, tile)
    apply_activation_checkpointing(model, checkpoint_layers)
    measured = _offloaded_by_torchtune_rule(model, shape, seq_len, batch, 4)
    planned = offloaded_tensor_bytes(
        shape,
        seq_len,
        batch,
        checkpoint_layers=checkpoint_layers,
        sequence_tile_tokens=tile,
        group_size=seq_len // 4,
    )
    assert abs(sum(planned) - sum(measured)) <= 0.05 * sum(measured), (sum(planned), sum(measured))
    assert abs(pinned_bytes(planned) - pinned_bytes(measured)) <= 0.05 * pinned_bytes(measured)
    # The pinned allocator's power-of-two blocks: 3 x 384 x 1000 bytes take 3 x 512 KiB.
    assert pinned_bytes([384_000] * 3) == 3 * 2**19


# ------------------------------------------------------------------- levers sized to the budget


def test_loss_chunks_are_the_fewest_that_take_the_loss_phase_off_the_peak():
    from longlora_tune.plan.memory import LINEAR_CE_PHASE
    from longlora_tune.plan.scenario import resolve
    from longlora_tune.plan.suggestions import loss_chunks_for

    kwargs = dict(gpus=1, gpu_memory_gib=80, quantize_base=True, linear_ce=True, sequence_tile_tokens=8192)
    base = plan("llama3_1_8b", 262_144, suggest=False, **kwargs)
    args = {f: getattr(base, f) for f in ("batch_size", "dtype", "fsdp", "s2", "lora_rank")}
    scenario = resolve(
        "llama3_1_8b", 262_144, **{**_PLAN_DEFAULTS, **kwargs, **args, "activation_offloading": False}
    )
    chunks = loss_chunks_for(scenario)
    phases = {
        n: plan("llama3_1_8b", 262_144, suggest=False, loss_chunks=n, **kwargs).memory
        for n in (chunks // 2, chunks)
    }
    assert phases[chunks][LINEAR_CE_PHASE] <= phases[chunks][LAYER_PHASE]
    assert phases[chunks // 2][LINEAR_CE_PHASE] > phases[chunks // 2][LAYER_PHASE]


def test_suggestions_find_the_fused_loss_and_offloading_for_llama3_8b_64k_on_4x24(capsys):
    # The reported bug: "still too big" although the fused loss plus offloading fits (llama3_8b_64k's
    # settings before its levers became auto: torchtune's chunked loss, every layer checkpointed).
    args = ["--model", "llama3_8b", "--seq-len", "65536", "--gpus", "4", "--gpu-memory", "24"]
    assert main(args) == 1
    out = capsys.readouterr().out
    cheapest = next(line for line in out.splitlines() if line.startswith("- cheapest that fits: "))
    assert "enable_activation_offloading=true" in cheapest
    assert "loss._component_=longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss" in cheapest
    assert "all of the above together: peak" in out and "(fits)" in out
    # Levers are listed in order of the FLOPs they add.
    added = [
        0.0 if "TFLOPs" not in s else float(s.split("(+")[1].split(" TFLOPs")[0])
        for s in plan("llama3_8b", 65536, gpus=4, gpu_memory_gib=24).suggestions
        if s.endswith(("alone", "fits", ")"))
        and not s.startswith(("cheapest", "all of", "longest", "context_parallel"))
    ]
    assert added == sorted(added)
    # The shipped config leaves these levers to auto: the planner chooses them as the recipe would.
    assert main(["--config", "llama3_8b_64k", "--gpus", "4", "--gpu-memory", "24"]) == 0
    assert (
        "The config's auto levers, chosen as the recipe chooses them at start-up:" in capsys.readouterr().out
    )


def test_choose_settings_is_the_cheapest_set_that_fits_by_brute_force():
    from longlora_tune.plan import choose_settings

    kwargs = dict(gpus=8, dtype="bf16")
    chosen = choose_settings("7b", 102_400, budget_gib=60, **kwargs)
    assert chosen.plan.fits and chosen.plan.peak_bytes <= 60 * 2**30
    assert set(chosen.settings) == {
        "activation_checkpointing_layers",
        "loss.num_output_chunks",
        "sequence_tile_tokens",
        "enable_activation_offloading",
        "enable_activation_checkpointing",
    }
    assert len(chosen.reasons) == 5
    # Independent reference: every (N, tile) without offloading at the chosen chunk count, through plan().
    chunks = chosen.settings["loss.num_output_chunks"]
    best = min(
        (p.flops.total, n, tile)
        for tile in (None, 8192)
        for n in range(33)
        for p in [
            plan(
                "7b",
                102_400,
                gpu_memory_gib=60,
                checkpoint_layers=n,
                activation_checkpointing=n > 0,
                sequence_tile_tokens=tile,
                loss_chunks=chunks,
                suggest=False,
                **kwargs,
            )
        ]
        if p.fits
    )
    layers = chosen.settings["activation_checkpointing_layers"]
    assert (layers if layers != "all" else 32, chosen.settings["sequence_tile_tokens"]) == best[1:]
    assert chosen.plan.flops.total == best[0] and not chosen.settings["enable_activation_offloading"]
    # Levers not free keep their values.
    fixed = choose_settings("7b", 102_400, budget_gib=60, free=["loss.num_output_chunks"], **kwargs)
    assert set(fixed.settings) == {"loss.num_output_chunks", "enable_activation_checkpointing"}
    assert fixed.plan.checkpoint_layers == 32
    with pytest.raises(ValueError, match="budget_gib, not gpu_memory_gib"):
        choose_settings("7b", 8192, budget_gib=60, gpu_memory_gib=80)


@pytest.mark.parametrize("model,gpus,quantize", [("7b", 1, True), ("llama3_1_8b", 8, False)])
def test_longest_table_length_fits_and_one_more_slice_does_not(model, gpus, quantize):
    """``python -m longlora_tune.plan.longest``: its length fits by plan() with every lever on, and the next
    1024-token slice per rank does not, whatever the loss chunk count."""
    from longlora_tune.plan.longest import ALL_LEVERS, longest_length

    fit = longest_length(model, gpus=gpus, gpu_memory_gib=80.0, quantize_base=quantize)
    common = dict(
        gpus=gpus, gpu_memory_gib=80.0, context_parallel_degree=gpus, quantize_base=quantize, **ALL_LEVERS
    )
    at = plan(model, fit.seq_len, loss_chunks=fit.loss_chunks, suggest=False, **common)
    assert at.fits and abs(at.peak_bytes / GIB - fit.peak_gib) < 0.06
    assert at.host_memory_bytes / GIB == pytest.approx(fit.host_gib, abs=0.06)
    beyond = fit.seq_len + 1024 * gpus
    assert not any(
        plan(model, beyond, loss_chunks=c, suggest=False, **common).fits
        for c in (1, 2, 4, 8, 16, 32, 64, 128)
    )
