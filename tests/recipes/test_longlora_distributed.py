"""End-to-end tests of the longlora_distributed recipe on a tiny random Llama 2 (CPU, gloo).

The expensive part, four short training runs, happens once per module (``runs`` fixture):

* ``two``: 2 processes under torchrun, 6 steps (crossing an epoch boundary), checkpoint every 3 steps,
  all exports;
* ``stop`` + ``resumed``: the same run stopped after 3 steps, then resumed from its checkpoint to 6;
* ``one``: the same run as a single process without torchrun;
* ``elastic``: the 2-process step-3 checkpoint resumed by a single process.

Exports are checked against independent implementations: Hugging Face ``LlamaForCausalLM`` for the merged
checkpoint and PEFT's ``PeftModel`` for the adapter, both compared with the recipe's own model in eval mode.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from recipe_runner import CONFIGS, RECIPE, RecipeFailed, model_from_adapter, run_recipe, run_recipe_argv
from safetensors.torch import load_file
from torchtune import config
from torchtune.modules import TiedLinear

from benchmarks.tune_run import tune_command
from longlora_tune._compat import import_object
from longlora_tune.config import validation as config_checks
from longlora_tune.data.sampler import ResumableDistributedSampler
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models.families import family_of_builder
from longlora_tune.models.trainable import trainable_param_names
from longlora_tune.quickstart import tiny
from longlora_tune.training.checkpointing import format as ckpt_format
from longlora_tune.training.checkpointing import housekeeping, lineage

REPO = Path(__file__).resolve().parents[2]
TINY = CONFIGS / "tiny_demo.yaml"
STEPS = 6


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _overrides(assets: dict[str, Path], out: Path, **extra: object) -> list[str]:
    values = {
        "checkpoint_dir": assets["base"],
        "dataset.data_files": assets["corpus"],
        "dataset.cache_dir": assets["cache"],
        "output_dir": out,
        "max_steps": STEPS,
        "save_every_n_steps": 3,
        "keep_last_n": 1,
        "lr_scheduler.num_warmup_steps": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _recipe_cmd(config: Path, overrides: list[str], nproc: int) -> list[str]:
    """The recipe script, under torchrun when ``nproc`` > 1 (the path every multi-process test takes)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(RECIPE), "--config", str(config), *overrides]


def _train(assets: dict[str, Path], out: Path, nproc: int, **extra: object) -> dict[int, float]:
    cmd = _recipe_cmd(TINY, _overrides(assets, out, **extra), nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return _losses(out)


def _log_files(out: Path) -> list[Path]:
    """The run's log files, oldest first (named after run ids, so by time): later runs' steps win."""
    return sorted((out / "logs").glob("*.txt"), key=lambda f: f.stat().st_mtime_ns)


def _losses(out: Path) -> dict[int, float]:
    losses = {}
    for f in _log_files(out):
        for m in re.finditer(r"^Step (\d+) \| loss:(\S+)", f.read_text(), flags=re.M):
            losses[int(m.group(1))] = float(m.group(2))
    return losses


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    base = tiny.make_hf_checkpoint(root / "base")
    # 24 documents give 22 blocks of 256 tokens: 5 steps of 4 sequences per epoch, so 6 steps cross
    # an epoch boundary (and the resumed run crosses it after resuming).
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=24)
    return {"root": root, "base": base, "corpus": corpus, "cache": root / "cache"}


@pytest.fixture(scope="module")
def runs(assets) -> dict[str, object]:
    root = assets["root"]
    two = _train(assets, root / "two", nproc=2)
    stopped = _train(assets, root / "resumed", nproc=2, max_steps=3, export_formats="[]")
    step3 = root / "resumed" / "checkpoints" / "step_000003"
    shutil.copytree(step3, root / "step3_copy")
    resumed = _train(assets, root / "resumed", nproc=2, resume_from_checkpoint="true", export_formats="[]")
    one = _train(assets, root / "one", nproc=1, export_formats="[]")
    # The 2-process checkpoint resumed by a single process (the data position is global).
    elastic = _train(
        assets, root / "elastic", nproc=1, resume_from_checkpoint=root / "step3_copy", export_formats="[]"
    )
    return {
        "two": two,
        "stopped": stopped,
        "resumed": resumed,
        "one": one,
        "elastic": elastic,
        "out": root / "two",
    }


def _cfg(assets: dict[str, Path], out: Path, **extra: object):
    cfg = OmegaConf.load(TINY)
    cfg.merge_with_dotlist(_overrides(assets, out, **extra))
    return cfg


def _tokens() -> torch.Tensor:
    # Longer than the base model's 64-token context, so the RoPE factor matters.
    return torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_two_process_run_trains(runs):
    losses = runs["two"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.05, losses


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(runs):
    two, stopped, resumed = runs["two"], runs["stopped"], runs["resumed"]
    assert sorted(stopped) == [1, 2, 3]
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(two[step], rel=1e-6, abs=0), step


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
    elastic, two = runs["elastic"], runs["two"]
    assert sorted(elastic) == [4, 5, 6]
    for step in elastic:
        assert elastic[step] == pytest.approx(two[step], rel=1e-5), step


@pytest.mark.slow
def test_single_process_matches_two_processes(runs):
    one, two = runs["one"], runs["two"]
    assert sorted(one) == sorted(two)
    for step in two:
        assert one[step] == pytest.approx(two[step], rel=1e-5), step


@pytest.mark.slow
def test_checkpoints_hold_full_trainable_state(runs, assets):
    out = runs["out"]
    ckpts = lineage.list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == [f"step_{STEPS:06d}"]  # keep_last_n=1 pruned step 3
    ckpt = ckpts[0]
    assert {p.name for p in ckpt.iterdir()} == {
        "trainable.safetensors",
        "optimizer.pt",
        "recipe_state.pt",
        "config.yaml",
        "manifest.json",
    }
    assert ckpt_format.verify_checkpoint(ckpt)["step"] == STEPS
    state = torch.load(ckpt / "recipe_state.pt", weights_only=True)
    assert state["global_step"] == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert (state["epoch"], state["epoch_position"]) == (1, 4)  # 5 steps per epoch
    trained = load_file(str(ckpt / "trainable.safetensors"))
    meta = json.loads((out / "adapter" / "longlora.json").read_text())
    with torch.device("meta"):
        model = config.instantiate(OmegaConf.create(meta["model"]))
    assert set(trained) == trainable_param_names(model, extras=("embed", "norm"))
    base = HFBaseModel.read(assets["base"]).load_state_dict()
    # Embeddings and norms were trained (and saved), not just LoRA.
    assert not torch.equal(trained["tok_embeddings.weight"], base["tok_embeddings.weight"])
    assert not torch.equal(trained["norm.scale"], base["norm.scale"])
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(opt["state"]) == set(trained)
    assert opt["state"]["tok_embeddings.weight"]["exp_avg"].shape == trained["tok_embeddings.weight"].shape
    adapter = load_file(str(out / "adapter" / "trainable.safetensors"))
    assert set(adapter) == set(trained)
    for k in trained:
        torch.testing.assert_close(adapter[k], trained[k], rtol=0, atol=0)


@pytest.mark.slow
def test_merged_hf_export_matches_recipe_model(runs, assets):
    from transformers import LlamaForCausalLM

    out = runs["out"]
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["rope_scaling"]["factor"] == 4.0 and cfg["rope_scaling"]["type"] == "linear"
    assert cfg["max_position_embeddings"] == 64
    assert (out / "hf" / "tokenizer.model").read_bytes() == (assets["base"] / "tokenizer.model").read_bytes()
    ours = model_from_adapter(out / "adapter", assets["base"])
    hf = LlamaForCausalLM.from_pretrained(out / "hf").eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_peft_export_matches_recipe_model(runs, assets):
    from peft import PeftModel
    from transformers import AutoConfig, LlamaForCausalLM

    out = runs["out"]
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    base_cfg = AutoConfig.from_pretrained(assets["base"], rope_parameters=rope)
    base = LlamaForCausalLM.from_pretrained(assets["base"], config=base_cfg)
    peft_model = PeftModel.from_pretrained(base, out / "peft").eval()
    ours = model_from_adapter(out / "adapter", assets["base"])
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- bad inputs (fast)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"dataset.block_size": 200}, "training length 200 is not divisible by the S2 group size 64; use a "
         "length that is a multiple of 64 or change model.s2_group_size_ratio"),
        ({"model.s2_group_size": 64},
         "model.s2_group_size=64 and model.s2_group_size_ratio=0.25 are both set"),
        ({"model.lora_rank": 0}, "model.lora_rank=0 must be a positive integer (LoRA rank, 8 in LongLoRA)"),
    ],
)  # fmt: skip
def test_config_errors_come_before_output_dir_is_touched(assets, tmp_path, extra, message):
    out = tmp_path / "o"
    with pytest.raises(RecipeFailed) as e:
        run_recipe(_cfg(assets, out, **extra))
    assert e.value.code == 2 and str(e.value).startswith(message), e.value.stderr[-3000:]
    assert "Traceback" not in e.value.stderr
    assert not out.exists()


def test_a_bug_in_a_model_builder_is_not_reported_as_a_config_error(assets, tmp_path, monkeypatch):
    import functools

    from longlora_tune import models

    real = models.longlora_llama2

    @functools.wraps(real)  # same signature: the up-front checks accept the config
    def broken(*args, **kwargs):
        raise TypeError("a programming bug inside the builder")

    monkeypatch.setattr(models, "longlora_llama2", broken)
    cfg = _cfg(assets, tmp_path / "o")
    cfg.model._component_ = "longlora_tune.models.longlora_llama2"
    # Only the config boundary turns an exception into a one-line config error (exit 2); a bug propagates.
    with pytest.raises(TypeError, match="a programming bug inside the builder"):
        run_recipe(cfg)


def test_missing_base_model_names_path_and_download_command(tmp_path):
    missing = tmp_path / "Llama-2-7b-hf"
    argv = ["--config", CONFIGS / "llama2_7b_100k.yaml", f"checkpoint_dir={missing}", "device=cpu"]
    with pytest.raises(RecipeFailed) as e:
        run_recipe_argv(argv)
    assert e.value.code == 2
    err = e.value.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (
        f"longlora_tune: error: model config not found: {missing}/config.json; download the base model with: "
        f'tune download meta-llama/Llama-2-7b-hf --output-dir {missing} --ignore-patterns "*.pth"'
    )


def test_dataset_without_a_full_block_is_refused(assets, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "The cat sees the red ball."}) + "\n")
    cfg = _cfg(assets, tmp_path / "o", **{"dataset.data_files": short, "dataset.cache_dir": tmp_path / "c"})
    with pytest.raises(RecipeFailed, match="dataset: .*0 blocks of 256 tokens"):
        run_recipe(cfg)
    assert not (tmp_path / "o" / "logs").exists()  # the metric logger comes after the data


def test_nan_stops_run_and_keeps_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "o"
    overrides = _overrides(
        assets, out, **{"optimizer.lr": 1e18, "save_every_n_steps": 1, "keep_last_n": "null"}
    )  # 1e18: the next steps overflow to non-finite losses (at 1e30 this tiny run ends at a finite ln V)
    with pytest.raises(RecipeFailed) as e:
        run_recipe_argv(["--config", TINY, *overrides])
    assert e.value.code == 3
    err = [line for line in e.value.stderr.splitlines() if line.startswith("longlora_tune: error:")]
    assert len(err) == 1 and "stopped without saving this state (last good checkpoint: " in err[0], err
    ckpts = lineage.list_checkpoints(out / "checkpoints")
    assert 1 <= len(ckpts) < STEPS
    assert str(ckpts[-1]) in err[0]
    for ckpt in ckpts:
        for name, t in load_file(str(ckpt / "trainable.safetensors")).items():
            assert torch.isfinite(t).all(), (ckpt, name)
    assert not (out / "hf").exists() and not (out / "adapter").exists()


def test_original_context_must_match_checkpoint(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o", **{"model.original_max_seq_len": 128})
    with pytest.raises(RecipeFailed, match="max_position_embeddings=64; set model.original_max_seq_len=64"):
        run_recipe(cfg)


def test_existing_rope_factor_is_kept_and_exported(assets, tmp_path):
    # A base model already extended with factor 8 (512 tokens) trained further at 256 keeps factor 8.
    base = tiny.make_hf_checkpoint(tmp_path / "base8", rope_scaling={"type": "linear", "factor": 8.0})
    cfg = _cfg(assets, tmp_path / "o", checkpoint_dir=base, max_steps=1, export_formats="[adapter]")
    run_recipe(cfg)
    meta = json.loads((tmp_path / "o" / "adapter" / "longlora.json").read_text())
    assert meta["rope_scaling_factor"] == 8.0 and meta["model"]["rope_scaling_factor"] == 8.0
    assert not (tmp_path / "o" / "hf").exists() and not (tmp_path / "o" / "peft").exists()


def test_bf16_keeps_fp32_master_copies_of_trainable_params(assets, tmp_path):
    # At lr 1e-5 a norm scale near 1.0 moves by ~1e-5 per step, far below bf16's step of 2^-7 there:
    # in pure bf16 the norms (and embeddings) of LoRA+ would never change.
    extra = {"dtype": "bf16", "optimizer.lr": 1e-5, "max_steps": 2, "export_formats": "[adapter,hf]"}
    run_recipe(_cfg(assets, tmp_path / "o", **extra))
    outputs = {name: tmp_path / "o" / name for name in ("adapter", "hf")}
    trained = load_file(str(outputs["adapter"] / ckpt_format.TRAINABLE_FILE))
    base = HFBaseModel.read(assets["base"]).load_state_dict()
    assert {t.dtype for t in trained.values()} == {torch.float32}
    for key in ("norm.scale", "layers.1.mlp_norm.scale", "tok_embeddings.weight"):
        delta = (trained[key] - base[key]).abs().max().item()
        assert 0 < delta < 1e-4, (key, delta)
    merged = load_file(str(outputs["hf"] / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}


def test_resume_needs_a_checkpoint(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o", resume_from_checkpoint="true")
    with pytest.raises(RecipeFailed, match="holds no checkpoint"):
        run_recipe(cfg)
    cfg = _cfg(assets, tmp_path / "o", resume_from_checkpoint=tmp_path)
    with pytest.raises(RecipeFailed, match="is damaged: trainable.safetensors is missing"):
        run_recipe(cfg)


def test_fresh_run_refuses_an_earlier_runs_checkpoints(assets, tmp_path):
    # Otherwise the new run's step_000001 is pruned at once in favour of the old step_000002 (keep_last_n=1)
    # and a later resume_from_checkpoint=true continues the old run.
    out = tmp_path / "o"
    run_recipe(_cfg(assets, out, max_steps=2, save_every_n_steps=1, export_formats="[]"))
    assert [p.name for p in lineage.list_checkpoints(out / "checkpoints")] == ["step_000002"]
    with pytest.raises(RecipeFailed, match=r"checkpoints of an earlier run \(newest: step_000002\)"):
        run_recipe(_cfg(assets, out, max_steps=1, save_every_n_steps=1, export_formats="[]"))


def test_resume_is_exact_with_lora_dropout(assets, tmp_path):
    # Dropout draws from the global RNG; resuming mid-epoch must continue the same stream.
    extra = {"model.lora_dropout": 0.1, "save_every_n_steps": 2, "export_formats": "[]"}
    run_recipe(_cfg(assets, tmp_path / "full", **extra, max_steps=4))
    run_recipe(_cfg(assets, tmp_path / "res", **extra, max_steps=2))
    run_recipe(_cfg(assets, tmp_path / "res", **extra, max_steps=4, resume_from_checkpoint="true"))
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "res")
    assert sorted(full) == [1, 2, 3, 4]
    assert resumed == full


def test_unchunked_loss_gives_the_chunked_losses(assets, tmp_path):
    extra = {"max_steps": 2, "export_formats": "[]"}
    run_recipe(_cfg(assets, tmp_path / "chunked", **extra))
    cfg = _cfg(assets, tmp_path / "plain", **extra)
    cfg.loss = OmegaConf.create({"_component_": "torch.nn.CrossEntropyLoss"})
    run_recipe(cfg)
    chunked, plain = _losses(tmp_path / "chunked"), _losses(tmp_path / "plain")
    assert sorted(plain) == [1, 2]
    for step, loss in chunked.items():
        assert plain[step] == pytest.approx(loss, rel=1e-5)


def test_fused_linear_cross_entropy_gives_the_chunked_losses_under_fsdp2(assets, tmp_path):
    # Two processes: the output weight is sharded outside the forward (FSDP2 reshards the root after it),
    # so the fused loss must read it inside the forward. Later steps' losses check the gradients too.
    extra = {"max_steps": 3, "export_formats": "[]"}
    chunked = _train(assets, tmp_path / "chunked", nproc=2, **extra)
    fused = _train(
        assets,
        tmp_path / "fused",
        nproc=2,
        **extra,
        **{"loss._component_": "longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss"},
    )
    assert sorted(fused) == [1, 2, 3]
    for step, loss in chunked.items():
        assert fused[step] == pytest.approx(loss, rel=1e-5), step


def test_training_length_is_checked_against_a_builder_default_max_seq_len(assets, tmp_path):
    # longlora_llama2_7b defaults to max_seq_len 8192; the model is only built on the meta device here.
    cfg = _cfg(assets, tmp_path / "o", **{"dataset.block_size": 16384, "tokenizer.max_seq_len": 16384})
    cfg.model = OmegaConf.create({"_component_": "longlora_tune.models.longlora_llama2_7b"})
    with pytest.raises(RecipeFailed, match="training length 16384 exceeds model.max_seq_len=8192"):
        run_recipe(cfg)
    assert not (tmp_path / "o").exists()


def test_sampler_resumes_mid_epoch_for_any_world_size():
    data = list(range(22))

    def samplers(world_size: int, epoch: int, start: int):
        out = []
        for rank in range(world_size):
            s = ResumableDistributedSampler(
                data, num_replicas=world_size, rank=rank, global_batch_size=4, seed=3
            )
            s.set_position(epoch, start)
            out.append(s)
        return out

    full = list(samplers(1, epoch=1, start=0)[0])
    assert len(full) == 20 and len(set(full)) == 20  # whole steps only: 2 sequences wait for the next epoch
    assert full != list(samplers(1, epoch=0, start=0)[0])  # reshuffled per epoch
    two = samplers(2, epoch=1, start=8)
    assert [len(s) for s in two] == [6, 6]
    # The 2 ranks together cover exactly the sequences after the first 8, interleaved per rank.
    assert list(two[0]) == full[8::2] and list(two[1]) == full[9::2]
    # Resuming on 4 ranks after 8 sequences continues with the same unseen sequences.
    four = samplers(4, epoch=1, start=8)
    assert sorted(i for s in four for i in s) == sorted(full[8:])


# ---------------------------------------------------------------------------------- shipped configs


def _expected_base_keys(num_layers: int, *, qkv_bias: bool = False, tied: bool = False) -> set[str]:
    """torchtune's base parameter names: Qwen2 adds q/k/v biases; a tied LM head is the token embedding."""
    per_layer = [
        "attn.q_proj.weight",
        "attn.k_proj.weight",
        "attn.v_proj.weight",
        "attn.output_proj.weight",
        "mlp.w1.weight",
        "mlp.w2.weight",
        "mlp.w3.weight",
        "sa_norm.scale",
        "mlp_norm.scale",
    ]
    if qkv_bias:
        per_layer += ["attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"]
    keys = {"tok_embeddings.weight", "norm.scale"} | (set() if tied else {"output.weight"})
    keys |= {f"layers.{i}.{k}" for i in range(num_layers) for k in per_layer}
    return keys


def _bind(section, *args) -> None:
    """What ``tune validate`` checks: the section's keys bind to its component's signature."""
    import inspect

    target = import_object(section._component_)
    kwargs = {k: v for k, v in OmegaConf.to_container(section, resolve=False).items() if k != "_component_"}
    inspect.signature(target).bind(*args, **kwargs)


# Pretraining configs; the LongAlpaca SFT configs are checked in test_longalpaca_sft.py.
TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "longalpaca" not in p.stem)


def test_expected_configs_are_shipped():
    names = {p.stem for p in TRAINING_CONFIGS}
    assert {
        "llama2_7b_8k",
        "llama2_7b_16k",
        "llama2_7b_32k",
        "llama2_7b_100k",
        "llama2_13b_8k",
        "llama2_13b_16k",
        "llama2_13b_32k",
        "llama2_13b_65k",
        "llama2_70b_32k",
        "llama2_7b_8k_full_attn",
        "tiny_demo",
        "tiny_qlora",
        "llama3_8b_64k",
        "llama3_1_8b_256k",
        "mistral_7b_64k",
        "qwen2_5_7b_128k",
    } <= names


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_instantiates_without_weights(path, tmp_path):
    from longlora_tune.modules.s2_attention import S2Attention

    text = path.read_text()
    cfg = OmegaConf.load(path)
    generic = "_component_" not in cfg.model
    if generic:
        # hf_checkpoint: builder, shapes and tokenizer come from the folder (here a tiny Llama 2 one).
        cfg.checkpoint_dir = str(tiny.make_hf_checkpoint(tmp_path / "generic_base"))
        cfg.dataset.data_files = str(tmp_path / "corpus.jsonl")
        config_checks.complete_from_checkpoint(cfg)
        assert cfg.model._component_ == "longlora_tune.models.longlora_llama2"
        assert cfg.tokenizer.path == f"{cfg.checkpoint_dir}/tokenizer.model"
    assert f"--config {path.stem}" in text  # the header's tune run command names this config
    for line in text.splitlines():
        value = line.split("#", 1)[0]
        if ":" in value:
            assert "=" not in value.split(":", 1)[1], line  # overrides split on "="
    config.validate(cfg)  # what `tune validate` runs
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    num_layers = len(model.layers)
    # Parameter names: a QLoRA model's state_dict() dequantizes its NF4 weights, impossible on meta.
    keys = {k for k, _ in model.named_parameters()}
    lora = {k for k in keys if ".lora_" in k}
    family = family_of_builder(cfg.model._component_)
    tied = isinstance(model.output, TiedLinear)
    assert keys - lora == _expected_base_keys(num_layers, qkv_bias=family.qkv_bias, tied=tied)
    assert len(lora) == 2 * 4 * num_layers  # A and B for q, k, v, output
    s2 = [m for m in model.modules() if isinstance(m, S2Attention)]
    assert len(s2) == num_layers
    length = config_checks.training_length(cfg)
    assert length == cfg.model.max_seq_len == cfg.tokenizer.max_seq_len
    group = None if cfg.model.get("use_full_attn", False) else s2[0].group_size
    config_checks.check_training_length(length, cfg.model.max_seq_len, group)
    for section in ("optimizer", "loss", "metric_logger"):
        _bind(cfg[section], *([[]] if section == "optimizer" else []))
    _bind(cfg.lr_scheduler, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    _bind(cfg.dataset, object())
    _bind(cfg.tokenizer)
    import_object(cfg.collate_fn)
    if path.stem.startswith("tiny_"):
        # tiny_qlora is wider: NF4 needs whole 16384-weight scale groups per shard.
        sizes = {"embed_dim": 256, "intermediate_dim": 512} if path.stem == "tiny_qlora" else {}
        # The tiny configs must match what the demo writes for their family.
        folder = tiny.make_hf_checkpoint(tmp_path / "base", family=family.name, with_tokenizer=False, **sizes)
        base = HFBaseModel.read(folder)
        kw = base.builder_kwargs
        for key in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim"):
            assert cfg.model[key] == kw[key], key
        assert cfg.model.original_max_seq_len == base.original_max_seq_len
        assert cfg.dtype == "fp32" and cfg.device == "cpu"
        assert cfg.model.get("quantize_base", False) == (path.stem == "tiny_qlora")
        return
    # The paper's settings (docs/reference.md: training hyperparameters).
    gpus = 1 if path.stem.endswith("_1gpu") else 8
    assert config_checks.gradient_accumulation_steps(cfg.global_batch_size, cfg.batch_size, gpus) == 8
    assert cfg.max_steps == 1000 and cfg.lr_scheduler.num_warmup_steps == 20
    assert cfg.optimizer.lr == (1e-5 if "70b" in path.stem else 2e-5)
    assert list(cfg.optimizer.betas) == [0.9, 0.95] and cfg.optimizer.weight_decay == 0.0
    assert cfg.dtype == "bf16" and cfg.enable_activation_checkpointing is True
    assert cfg.model.s2_group_size_ratio == 0.25 and list(cfg.trainable_extras) == ["embed", "norm"]
    assert cfg.model.get("use_full_attn", False) == path.stem.endswith("_full_attn")
    if generic:
        assert cfg.hf_repo_id is None  # any checkpoint: no download to suggest
        return
    assert f"tune download {cfg.hf_repo_id} " in text
    # Meta's and Mistral's repos also ship the original consolidated weights, which the recipe never reads;
    # Qwen's hold only the Hugging Face files.
    assert ("--ignore-patterns" in text) == (not cfg.hf_repo_id.startswith("Qwen/"))


# ---------------------------------------------------------------------------------- demo


def test_demo_command_is_the_documented_one(tmp_path):
    from longlora_tune.quickstart import demo

    cmd = demo.build_command(tmp_path, 1, ["max_steps=5"], use_tune=True)
    assert cmd[1:] == [
        "run",
        "longlora_distributed",
        "--config",
        "tiny_demo",
        f"checkpoint_dir={tmp_path / 'base'}",
        f"dataset.data_files={tmp_path / 'corpus.jsonl'}",
        f"output_dir={tmp_path / 'out'}",
        "max_steps=5",
    ]
    cmd = demo.build_command(tmp_path, 2, [], use_tune=True)
    assert cmd[1:5] == ["run", "--nproc_per_node", "2", "longlora_distributed"]
    # Without the tune registry: the same recipe script and config by path.
    cmd = demo.build_command(tmp_path, 1, [], use_tune=False)
    assert cmd[1:4] == [str(RECIPE), "--config", str(TINY)]
    with pytest.raises(SystemExit):
        demo.main(["--workdir", str(tmp_path), "not-an-override"])


@pytest.mark.slow
def test_damaged_checkpoint_is_one_line_once_and_rank_zero_failures_stop_every_rank(assets, runs, tmp_path):
    """A damaged checkpoint is a config error that every rank stops on, printed once; a non-config failure
    on rank 0 (a corrupt base weight file) also ends all ranks instead of a hang."""
    corrupt = tmp_path / "step_000003"
    shutil.copytree(assets["root"] / "step3_copy", corrupt)
    (corrupt / ckpt_format.TRAINABLE_FILE).write_bytes(b"not a safetensors file")
    cmd = _recipe_cmd(TINY, _overrides(assets, tmp_path / "out", resume_from_checkpoint=corrupt), nproc=2)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("longlora_tune: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"checkpoint {corrupt} is damaged: trainable.safetensors" in errors[0]

    base = tmp_path / "bad_base"
    shutil.copytree(assets["base"], base)
    (base / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    cmd = _recipe_cmd(TINY, _overrides(assets, tmp_path / "out2", checkpoint_dir=base), nproc=2)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "rank 0 failed, stopping this rank too" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------- resume: what may change


def _lrs(out: Path) -> dict[int, float]:
    lrs = {}
    for f in _log_files(out):
        for m in re.finditer(r"^Step (\d+) \| .*?lr:(\S+)", f.read_text(), flags=re.M):
            lrs[int(m.group(1))] = float(m.group(2))
    return lrs


def test_log_file_is_named_after_the_run_and_holds_rounded_values(assets, tmp_path):
    out = tmp_path / "o"
    warm_up = {"lr_scheduler.num_warmup_steps": 5}
    run_recipe(_cfg(assets, out, max_steps=2, save_every_n_steps=1, export_formats="[]", **warm_up))
    run_id = json.loads((out / "checkpoints" / "step_000002" / "manifest.json").read_text())["run_id"]
    assert [f.name for f in _log_files(out)] == [f"log_{run_id}.txt"]
    first = _log_files(out)[0].read_text().splitlines()[0]
    values = dict(item.split(":") for item in first.removeprefix("Step 1 | ").split())
    assert list(values) == ["loss", "lr", "grad_norm", "tokens_per_second_per_gpu"], first
    assert values["lr"] == "0.0006", first  # 3e-3 x 1/5 of the warm-up, not 0.0006000000000000001
    digits = {k: len(v.replace(".", "").lstrip("0")) for k, v in values.items()}
    assert digits["loss"] <= 10 and digits["grad_norm"] <= 6 and digits["tokens_per_second_per_gpu"] <= 7


def test_resume_applies_a_changed_learning_rate_and_logs_it(assets, tmp_path, caplog):
    out = tmp_path / "o"
    extra = {"save_every_n_steps": 1, "export_formats": "[]", "lr_scheduler.num_warmup_steps": 2}
    run_recipe(_cfg(assets, out, max_steps=2, **extra))
    assert _lrs(out)[2] == pytest.approx(3e-3)
    with caplog.at_level("INFO"):
        run_recipe(
            _cfg(assets, out, max_steps=4, resume_from_checkpoint="true", **{"optimizer.lr": 1e-3}, **extra)
        )
    err = caplog.text
    lrs = _lrs(out)
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3), lrs
    assert "Resume changes optimizer.lr: 0.003 -> 0.001" in err
    assert "Resume changes max_steps: 2 -> 4" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.max_seq_len": 128, "tokenizer.max_seq_len": 128, "dataset.block_size": 128},
         "dataset.block_size=128 but .*step_000002 was trained with dataset.block_size=256"),
        ({"trainable_extras": "[]"},
         r"trainable_extras=\[\] but .* was trained with trainable_extras=\['embed', 'norm'\]"),
        ({"model.lora_rank": 4}, "model.lora_rank=4 but .* was trained with model.lora_rank=8"),
        ({"global_batch_size": 2}, "global_batch_size=2 but .* was trained with global_batch_size=4"),
    ],
)  # fmt: skip
def test_resume_refuses_a_changed_run_defining_setting(assets, tmp_path, override, message):
    out = tmp_path / "o"
    run_recipe(_cfg(assets, out, max_steps=2, save_every_n_steps=1, export_formats="[]"))
    with pytest.raises(RecipeFailed, match=message) as e:
        run_recipe(_cfg(assets, out, max_steps=3, resume_from_checkpoint="true", **override))
    assert e.value.code == 2 and "start a new run in another output_dir" in str(e.value)


def test_missing_tensorboard_is_one_line_with_the_install_command(assets, tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    cfg = _cfg(assets, tmp_path / "o")
    cfg.metric_logger = OmegaConf.create(
        {"_component_": "torchtune.training.metric_logging.TensorBoardLogger", "log_dir": str(tmp_path)}
    )
    with pytest.raises(RecipeFailed) as e:
        run_recipe(cfg)
    assert e.value.code == 2 and "Traceback" not in e.value.stderr
    assert str(e.value) == (
        "metric_logger torchtune.training.metric_logging.TensorBoardLogger needs the tensorboard package: "
        "pip install tensorboard (or use torchtune.training.metric_logging.DiskLogger)"
    )


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (found through /proc), children first."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    order, todo = [], [pid]
    while todo:
        p = todo.pop()
        order.append(p)
        todo.extend(children.get(p, []))
    for p in reversed(order):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_roll_back_then_kill_resumes_the_new_branch_and_keeps_every_checkpoint(assets, tmp_path):
    """Run A saves 5..20; run B resumes from A's step 10 and is killed (SIGKILL) right after saving step 13;
    ``resume_from_checkpoint=true`` must continue B (not A's step 20) and nothing of B or A is lost."""
    import time

    out = tmp_path / "o"
    ckpts = out / "checkpoints"
    extra = {"export_formats": "[]", "dataset.cache_dir": assets["cache"]}
    run_a = _overrides(assets, out, max_steps=20, save_every_n_steps=5, keep_last_n="null", **extra)
    proc = subprocess.run(_recipe_cmd(TINY, run_a, nproc=2), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_b = _overrides(
        assets, out, max_steps=25, save_every_n_steps=1, keep_last_n=2,
        resume_from_checkpoint=ckpts / "step_000010", **extra,
    )  # fmt: skip
    b = subprocess.Popen(_recipe_cmd(TINY, run_b, nproc=2), cwd=REPO, env=_env(), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (ckpts / "step_000013" / ckpt_format.MANIFEST_FILE).is_file():
        assert b.poll() is None and time.monotonic() < deadline, "run B ended before saving step 13"
        time.sleep(0.02)
    _kill_tree(b.pid)  # kill -9 of the launcher AND its workers (torchrun gives them their own sessions)
    b.wait()

    newest = lineage.find_resumable_checkpoint(ckpts)
    step_b = int(newest.name.removeprefix("step_"))
    assert 13 <= step_b < 15, newest  # B's newest (a step may have completed before the kill landed)
    # A's run is intact; B kept its own newest two and the checkpoint it resumed from.
    names = {p.name for p in ckpts.iterdir() if not p.name.startswith(".")}
    assert {"step_000005", "step_000010", "step_000015", "step_000020"} <= names
    assert {f"step_{step_b - 1:06d}", f"step_{step_b:06d}"} <= names

    run_c = _overrides(assets, out, max_steps=16, save_every_n_steps=1, keep_last_n=2,
                       resume_from_checkpoint="true", **extra)  # fmt: skip
    proc = subprocess.run(_recipe_cmd(TINY, run_c, nproc=2), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resumed from {ckpts / newest.name} at step {step_b}" in proc.stderr
    # Reaching step 15 of the abandoned run moved A's folder aside instead of overwriting or deleting it.
    assert any(p.name.startswith("step_000015.abandoned-") for p in ckpts.iterdir())
    assert (ckpts / "step_000020").is_dir() and (ckpts / "step_000010").is_dir()
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # leftovers of the kill cleaned
    assert lineage.find_resumable_checkpoint(ckpts) == ckpts / "step_000016"


def test_missing_tiny_base_points_at_the_demo_command(tmp_path):
    missing = tmp_path / "longalpaca_demo" / "base"
    with pytest.raises(RecipeFailed) as e:
        run_recipe_argv(["--config", CONFIGS / "tiny_longalpaca.yaml", f"checkpoint_dir={missing}"])
    assert str(e.value) == (
        f"tiny base model not found: {missing / 'config.json'}; create the tiny model and data with: "
        f"python -m longlora_tune.quickstart.demo --sft --assets-only --workdir {missing.parent}"
    )


def test_a_second_run_on_the_same_output_dir_is_refused(assets, tmp_path):
    out = tmp_path / "o"
    with housekeeping.OutputDirLock(out):  # another run holding the folder
        with pytest.raises(RecipeFailed, match=f"output_dir {out} is in use by pid {os.getpid()} on host"):
            run_recipe(_cfg(assets, out, max_steps=1))
    assert not (out / "checkpoints").exists()


def assert_compile_auto_gives_the_eager_losses(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch, caplog, steps: int
) -> None:
    """Train ``steps`` steps eagerly and with ``compile: auto``: auto compiles here, and the losses agree.

    aot_eager traces exactly what inductor compiles (dynamo + AOT autograd) without minutes of C++ builds;
    tests/test_compile.py runs inductor itself.
    """
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    extra = {"max_steps": steps, "export_formats": "[]"}
    run_recipe(make_cfg(tmp_path / "eager", **extra))
    caplog.set_level("INFO")
    run_recipe(make_cfg(tmp_path / "compiled", compile="auto", **extra))
    assert "auto: compile: true (aot_eager compiles on cpu;" in caplog.text
    assert "torch.compile (aot_eager): 2 decoder layers and the loss" in caplog.text
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(compiled) == sorted(eager) == list(range(1, steps + 1))
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4), step


def test_compile_auto_compiles_and_gives_the_eager_losses(assets, tmp_path, monkeypatch, caplog):
    # `auto` (the shipped configs') resolves to true here; compile=true runs in
    # tests/recipes/test_activation_checkpointing_recipe.py.
    assert_compile_auto_gives_the_eager_losses(
        lambda out, **extra: _cfg(assets, out, **extra), tmp_path, monkeypatch, caplog, steps=3
    )


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_under_tune_run_stops_every_rank_with_one_line_and_resume_gives_the_same_losses(
    assets, runs, tmp_path, signum
):
    """Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) or SIGTERM during a
    2-process ``tune run``: no traceback from any rank or from torchrun, exit 130/143, the resume line
    once; ``resume_from_checkpoint=true`` then reaches the uninterrupted run's losses."""
    import time

    out = tmp_path / "o"
    ckpts = out / "checkpoints"
    overrides = _overrides(assets, out, save_every_n_steps=1, keep_last_n=2)
    cmd = tune_command(
        "run", "--nproc_per_node", "2", "longlora_distributed", "--config", str(TINY), *overrides
    )
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (ckpts / "step_000002" / ckpt_format.MANIFEST_FILE).is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before saving step 2"
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-6000:]
    lines = [x for x in stderr.splitlines() if "resume_from_checkpoint=true" in x]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"longlora_tune: stopped by {signal.Signals(signum).name}; at step ")
    newest = lineage.find_resumable_checkpoint(ckpts)
    assert f"checkpoint {newest} is intact" in lines[0]

    before = set((out / "logs").glob("*.txt"))
    _train(assets, out, nproc=2, resume_from_checkpoint="true")
    (log,) = set((out / "logs").glob("*.txt")) - before
    resumed = {int(m.group(1)): float(m.group(2))
               for m in re.finditer(r"^Step (\d+) \| loss:(\S+)", log.read_text(), flags=re.M)}  # fmt: skip
    assert min(resumed) == int(newest.name.removeprefix("step_")) + 1 and max(resumed) == STEPS
    for step, loss in resumed.items():
        assert loss == pytest.approx(runs["two"][step], rel=1e-5), step
