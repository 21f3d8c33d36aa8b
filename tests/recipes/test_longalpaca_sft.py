"""LongAlpaca supervised fine-tuning with the longlora_distributed recipe (tiny random Llama 2, CPU, gloo).

* a 2-process torchrun run of ``tiny_longalpaca.yaml`` trains and writes every output;
* right-padded batches are rounded up to the S² group size (or ``pad_to_multiple_of``), computed
  independently from the sampler's order and the samples' lengths;
* packed batches reach the model with their document mask and per-document positions: with full
  attention a pack's loss equals the sum of its documents' losses computed one by one, and with S² the
  loss of the later documents does not depend on the first document's tokens;
* the shipped SFT configs build on the meta device and carry the published settings (docs/reference.md).
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runner import CONFIGS, run_recipe, training_parts
from test_longlora_distributed import (
    _bind,
    _env,
    _expected_base_keys,
    _losses,
    _recipe_cmd,
    assert_compile_auto_gives_the_eager_losses,
)
from torchtune import config

from longlora_tune._compat import import_object
from longlora_tune.config import validation as config_checks
from longlora_tune.data import padded_collate_s2
from longlora_tune.data.loader import pad_multiple
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models.longlora import describe
from longlora_tune.modules.loss import summed_token_loss
from longlora_tune.quickstart import tiny

REPO = Path(__file__).resolve().parents[2]
TINY = CONFIGS / "tiny_longalpaca.yaml"
SFT_CONFIGS = sorted(CONFIGS.glob("llama2_*_longalpaca_*.yaml"))
GROUP = 64  # tiny_longalpaca: max_seq_len 256, S2 ratio 1/4
STEPS = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    base = tiny.make_hf_checkpoint(root / "base")
    # Long stories (many trimmed to 256 tokens) and short ones (padded), for the padded runs.
    mixed = tiny.make_longalpaca_json(root / "mixed.json", n=32, seed=0, min_sentences=2, max_sentences=40)
    # Short records, several to a 256-token pack.
    short = tiny.make_longalpaca_json(root / "short.json", n=24, seed=1, min_sentences=2, max_sentences=6)
    return {"root": root, "base": base, "mixed": mixed, "short": short}


def _overrides(assets: dict[str, Path], out: Path, data: str = "mixed", **extra: object) -> list[str]:
    values = {
        "checkpoint_dir": assets["base"],
        "dataset.data_files": assets[data],
        "output_dir": out,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _cfg(assets: dict[str, Path], out: Path, data: str = "mixed", **extra: object):
    cfg = OmegaConf.load(TINY)
    cfg.merge_with_dotlist(_overrides(assets, out, data, **extra))
    return cfg


# ----------------------------------------------------------------------------------------- 2-process run


@pytest.mark.slow
def test_two_process_sft_run_trains_and_exports(assets):
    out = assets["root"] / "two"
    cmd = _recipe_cmd(TINY, _overrides(assets, out, max_steps=STEPS, save_every_n_steps=4), nproc=2)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1] - 0.2, losses
    # The same kinds of outputs as continued pretraining.
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
    assert (out / "peft" / "adapter_config.json").is_file()
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "trainable.safetensors").is_file() and (
        out / "adapter" / "longlora.json"
    ).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{STEPS:06d}"]  # keep_last_n 1
    assert OmegaConf.load(out / "hf" / "config.json").rope_scaling.factor == 4.0
    # num_trimmed / num_skipped are logged, with the dataset's own counts.
    cfg = _cfg(assets, out)
    ds = config.instantiate(cfg.dataset, config.instantiate(cfg.tokenizer))
    assert ds.num_trimmed > 0
    logged = re.findall(
        r"(\d+) samples trimmed .*\(num_trimmed\), (\d+) skipped \(num_skipped\)", proc.stderr
    )
    assert logged == [(str(ds.num_trimmed), str(ds.num_skipped))], proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------- padded batches


def _expected_lengths(r: dict, multiple: int | None) -> list[int]:
    """Padded length of each batch, from the sampler's order and the samples' own lengths."""
    order = list(r["sampler"])
    ds = r["dataset"]
    out = []
    for i in range(0, len(order), r["batch_size"]):
        n = max(len(ds[j]["tokens"]) for j in order[i : i + r["batch_size"]])
        out.append(n if multiple is None else -(-n // multiple) * multiple)
    return out


@pytest.mark.parametrize(
    ("extra", "multiple"),
    [({}, GROUP), ({"pad_to_multiple_of": 128}, 128), ({"model.use_full_attn": "true"}, None)],
    ids=["group_size", "explicit", "full_attention"],
)
def test_padded_batches_round_up_to_group_size(assets, tmp_path, extra, multiple):
    r = training_parts(_cfg(assets, tmp_path / "o", **extra))
    lengths = [b["tokens"].shape[1] for b in r["loader"]]
    assert lengths == _expected_lengths(r, multiple)
    if multiple is not None:
        assert all(n % multiple == 0 for n in lengths)
    assert min(lengths) < 256 and max(lengths) <= 256  # real variable-length batches
    assert set(next(iter(r["loader"]))) == {"tokens", "labels"}


def test_compile_auto_compiles_each_padded_length_and_gives_the_eager_losses(
    assets, tmp_path, monkeypatch, caplog
):
    # Padded to the group: at most 256 / 64 = 4 lengths, each compiled once; the losses are eager's.
    assert_compile_auto_gives_the_eager_losses(
        lambda out, **extra: _cfg(assets, out, **extra), tmp_path, monkeypatch, caplog, steps=4
    )
    # 16-token multiples would be 16 lengths, each a compile: auto stays eager, and says why.
    caplog.clear()
    run_recipe(_cfg(assets, tmp_path / "many", compile="auto", pad_to_multiple_of=16, max_steps=1))
    assert "auto: compile: false (16 padded sequence lengths would each compile (more than 8)" in caplog.text


def test_pad_multiple_must_divide_training_length():
    with pytest.raises(
        LongLoRAConfigError, match="pad_to_multiple_of=96 does not divide the training length 256"
    ):
        pad_multiple(96, GROUP, 256)
    assert pad_multiple(None, GROUP, 256) == GROUP and pad_multiple(None, None, 256) is None


# ----------------------------------------------------------------------------------------- packed batches


def test_packed_run_with_epochs_has_finite_falling_loss(assets, tmp_path):
    out = tmp_path / "packed"
    cfg = _cfg(
        assets,
        out,
        "short",
        **{
            "dataset.packed": "true",
            "batch_size": 1,
            "global_batch_size": 2,
            "epochs": 2,
            "max_steps": "null",
        },
        export_formats="[]",
    )
    run_recipe(cfg)
    losses = _losses(out)
    packed = config.instantiate(cfg.dataset, config.instantiate(cfg.tokenizer))
    assert len(packed.ds) > len(packed) > 2  # several samples per pack
    # epochs=2: two passes of whole 2-pack steps.
    assert sorted(losses) == list(range(1, 2 * (len(packed) // 2) + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[len(losses)] < losses[1]


def _first_pack(r: dict) -> tuple[dict, list[dict]]:
    """The first packed batch and the samples it holds (PackedDataset packs greedily in order)."""
    packed = r["dataset"]
    batch = next(iter(r["loader"]))
    seq_lens = packed[0]["seq_lens"].tolist()
    docs = []
    for i, n in enumerate(seq_lens):
        sample = packed.ds[i]
        if len(sample["tokens"]) != n:
            break  # the rest is padding
        docs.append(sample)
    assert len(docs) >= 2, seq_lens
    offset = sum(len(d["tokens"]) for d in docs)
    assert torch.equal(batch["tokens"][0, :offset], torch.tensor([t for d in docs for t in d["tokens"]]))
    return batch, docs


def _loss_sum(r: dict, batch: dict) -> float:
    with torch.no_grad():
        loss, n_tokens = summed_token_loss(
            r["model"], r["loss_fn"], batch, device=r["device"], ignore_index=-100
        )
    assert n_tokens > 0
    return float(loss)


def test_packed_loss_equals_documents_alone_with_full_attention(assets, tmp_path):
    extra = {"dataset.packed": "true", "batch_size": 1, "global_batch_size": 1, "shuffle": "false"}
    r = training_parts(_cfg(assets, tmp_path / "o", "short", **{**extra, "model.use_full_attn": "true"}))
    batch, docs = _first_pack(r)
    assert set(batch) == {"tokens", "labels", "input_pos", "mask"}
    alone = sum(_loss_sum(r, padded_collate_s2([d])) for d in docs)
    packed = _loss_sum(r, batch)
    plain = _loss_sum(r, {"tokens": batch["tokens"], "labels": batch["labels"]})
    # Measured: agreement ~1e-7; the control below differs by ~2e-4 (only answers are scored).
    assert packed == pytest.approx(alone, rel=1e-6)
    # Control: the same tokens without document mask and positions give another loss.
    assert plain != pytest.approx(alone, rel=1e-5)


def test_packed_s2_documents_do_not_see_each_other(assets, tmp_path):
    extra = {"dataset.packed": "true", "batch_size": 1, "global_batch_size": 1, "shuffle": "false"}
    r = training_parts(_cfg(assets, tmp_path / "o", "short", **extra))
    batch, docs = _first_pack(r)
    n1 = len(docs[0]["tokens"])
    end = sum(len(d["tokens"]) for d in docs)
    # Score every token of the later documents (the first ones share S2 groups with the first
    # document), none of the first document and not the next document's BOS it would predict.
    batch["labels"][0] = -100
    batch["labels"][0, n1 + 1 : end] = batch["tokens"][0, n1 + 1 : end]
    other = {k: v.clone() for k, v in batch.items()}
    gen = torch.Generator().manual_seed(0)
    other["tokens"][0, 1:n1] = torch.randint(3, 512, (n1 - 1,), generator=gen)
    same, changed = _loss_sum(r, batch), _loss_sum(r, other)
    plain = _loss_sum(r, {k: batch[k] for k in ("tokens", "labels")})
    plain_other = _loss_sum(r, {k: other[k] for k in ("tokens", "labels")})
    assert changed == pytest.approx(same, rel=1e-6)  # measured: equal to the last bit
    # Control: without the document mask the later documents read the first one (measured ~3e-3).
    assert plain_other != pytest.approx(plain, rel=1e-5)


# ----------------------------------------------------------------------------------------- validation


# ----------------------------------------------------------------------------------------- shipped configs


def test_sft_configs_are_shipped():
    assert {p.stem for p in SFT_CONFIGS} == {
        "llama2_7b_longalpaca_16k",
        "llama2_13b_longalpaca_16k",
        "llama2_7b_longalpaca_32k",
        "llama2_70b_longalpaca_32k",
        "llama2_7b_longalpaca_32k_qlora",
        "llama2_70b_longalpaca_32k_qlora",
    }


@pytest.mark.parametrize("path", [*SFT_CONFIGS, TINY], ids=lambda p: p.stem)
def test_sft_config_instantiates_without_weights(path):
    from longlora_tune.modules.s2_attention import S2Attention

    text = path.read_text()
    cfg = OmegaConf.load(path)
    assert f"--config {path.stem}" in text
    for line in text.splitlines():
        value = line.split("#", 1)[0]
        if ":" in value:
            assert "=" not in value.split(":", 1)[1], line  # overrides split on "="
    config.validate(cfg)
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    num_layers = len(model.layers)
    # Parameter names: a QLoRA model's state_dict() dequantizes its NF4 weights, impossible on meta.
    keys = {k for k, _ in model.named_parameters()}
    lora = {k for k in keys if ".lora_" in k}
    assert keys - lora == _expected_base_keys(num_layers)
    assert len(lora) == 2 * 4 * num_layers
    assert cfg.model.get("quantize_base", False) == path.stem.endswith("_qlora")
    s2 = [m for m in model.modules() if isinstance(m, S2Attention)]
    assert len(s2) == num_layers
    length = config_checks.training_length(cfg)
    assert length == cfg.model.max_seq_len == cfg.tokenizer.max_seq_len == cfg.dataset.max_seq_len
    assert {m.group_size for m in s2} == {length // 4}
    config_checks.check_training_length(length, cfg.model.max_seq_len, length // 4)
    config_checks.check_sft_batching(cfg)
    for section in ("optimizer", "loss", "metric_logger"):
        _bind(cfg[section], *([[]] if section == "optimizer" else []))
    _bind(cfg.lr_scheduler, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    _bind(cfg.dataset, object())
    _bind(cfg.tokenizer)
    assert import_object(cfg.collate_fn) is padded_collate_s2
    assert cfg.dataset._component_ == "longlora_tune.data.longalpaca_dataset"
    assert (cfg.dataset.template, cfg.dataset.truncation, cfg.dataset.packed) == (
        "llama2_chat",
        "left",
        False,
    )
    assert cfg.pad_to_multiple_of is None and cfg.model.s2_wrap_around is False
    assert (cfg.max_steps is None) != (cfg.epochs is None)
    if path == TINY:
        assert cfg.dtype == "fp32" and cfg.device == "cpu" and length == 256
        return
    # The published SFT settings (docs/reference.md).
    size = re.search(r"llama2_(\d+)b_", path.stem).group(1)
    assert cfg.hf_repo_id == f"meta-llama/Llama-2-{size}b-chat-hf" and cfg.hf_repo_id in text
    assert "--ignore-patterns" in text
    assert describe(model).rope_scaling_factor == length / 4096
    if path.stem.endswith("_16k"):
        assert length == 16384 and cfg.dataset.source == "Yukang/LongAlpaca-16k-length" and cfg.epochs == 5
    else:
        # October 2023 README: 32768, LongAlpaca-12k, 3 epochs (with the current README's batch).
        assert length == 32768 and cfg.dataset.source == "Yukang/LongAlpaca-12k" and cfg.epochs == 3
    assert config_checks.gradient_accumulation_steps(cfg.global_batch_size, cfg.batch_size, 8) == 8
    assert cfg.batch_size == 1 and cfg.max_steps is None
    assert cfg.optimizer.lr == 2e-5 and cfg.optimizer.weight_decay == 0.0
    schedule = "longlora_tune.training.schedulers.get_constant_schedule_with_warmup"
    assert cfg.lr_scheduler._component_ == schedule
    assert cfg.lr_scheduler.num_warmup_steps == 20
    assert cfg.dtype == "bf16" and cfg.enable_activation_checkpointing is True
    assert cfg.model.s2_group_size_ratio == 0.25 and list(cfg.trainable_extras) == ["embed", "norm"]
    assert cfg.model.use_full_attn is False
