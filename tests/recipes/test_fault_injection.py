"""Fault injection on the training recipe: changed data on resume, a kill or a full disk during the final
export, bad and empty records, and failed runs that must leave no ``output_dir`` behind.

Tiny random Llama 2 on CPU, 2 optimizer steps per run, one process (in-process ``runpy`` runs, and a
subprocess where the process must die by SIGKILL).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runner import CONFIGS, RECIPE, RecipeFailed, run_recipe
from safetensors.torch import load_file

from longlora_tune.quickstart import tiny
from longlora_tune.training.checkpointing import format as ckpt_format
from longlora_tune.training.checkpointing import lineage

REPO = Path(__file__).resolve().parents[2]
TINY = CONFIGS / "tiny_demo.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    base = tiny.make_hf_checkpoint(root / "base")
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=24)
    return {"root": root, "base": base, "corpus": corpus, "cache": root / "cache"}


def _overrides(assets: dict[str, Path], out: Path, **extra: object) -> dict[str, object]:
    return {
        "checkpoint_dir": assets["base"],
        "dataset.data_files": assets["corpus"],
        "dataset.cache_dir": assets["cache"],
        "output_dir": out,
        "max_steps": 2,
        "save_every_n_steps": 1,
        "keep_last_n": 1,
        "export_formats": "[]",
        "lr_scheduler.num_warmup_steps": 1,
        **extra,
    }


def _cfg(assets: dict[str, Path], out: Path, **extra: object):
    cfg = OmegaConf.load(TINY)
    cfg.merge_with_dotlist([f"{k}={v}" for k, v in _overrides(assets, out, **extra).items()])
    return cfg


def _error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("longlora_tune: error:")]


def _losses(out: Path) -> dict[int, float]:
    losses = {}
    for f in sorted((out / "logs").glob("*.txt")):
        for m in re.finditer(r"^Step (\d+) \| loss:(\S+)", f.read_text(), flags=re.M):
            losses[int(m.group(1))] = float(m.group(2))
    return losses


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".longlora.lock")


# ------------------------------------------------------------------------------ dataset changed on resume


def test_resume_refuses_changed_data_in_one_line_and_resumes_on_the_same_data(assets, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    original = assets["corpus"].read_bytes()
    corpus.write_bytes(original)
    out = tmp_path / "o"
    run_recipe(_cfg(assets, out, **{"dataset.data_files": corpus}))
    ckpt = out / "checkpoints" / "step_000002"
    recorded = ckpt_format.read_manifest(ckpt)[ckpt_format.DATASET_FINGERPRINT_KEY]
    assert isinstance(recorded, str) and len(recorded) == 64

    resume = {"max_steps": 3, "resume_from_checkpoint": "true", "dataset.data_files": corpus}
    # Same path, same config, four documents fewer.
    lines = original.decode().splitlines(keepends=True)
    corpus.write_text("".join(lines[:-4]))
    with pytest.raises(RecipeFailed) as e:
        run_recipe(_cfg(assets, out, **resume))
    assert e.value.code == 2 and "Traceback" not in e.value.stderr
    assert len(_error_lines(e.value.stderr)) == 1
    assert str(e.value).startswith(f"the training data or tokenizer differ from those {ckpt} was trained on")
    assert str(e.value).endswith("or start a new run in another output_dir")
    assert lineage.list_checkpoints(out / "checkpoints") == [ckpt]

    corpus.write_bytes(original)
    run_recipe(_cfg(assets, out, **resume))
    step3 = out / "checkpoints" / "step_000003"
    assert ckpt_format.read_manifest(step3)[ckpt_format.DATASET_FINGERPRINT_KEY] == recorded


def test_a_checkpoint_without_a_fingerprint_resumes_with_one_warning(assets, tmp_path, caplog):
    out = tmp_path / "o"
    run_recipe(_cfg(assets, out))
    ckpt = out / "checkpoints" / "step_000002"
    manifest = json.loads((ckpt / ckpt_format.MANIFEST_FILE).read_text())
    del manifest[ckpt_format.DATASET_FINGERPRINT_KEY]  # as written before manifests recorded it
    (ckpt / ckpt_format.MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="longlora_tune"):
        run_recipe(_cfg(assets, out, max_steps=3, resume_from_checkpoint="true"))
    warned = [r for r in caplog.records if "recorded the dataset's fingerprint" in r.getMessage()]
    assert len(warned) == 1
    assert lineage.list_checkpoints(out / "checkpoints")[-1].name == "step_000003"


# --------------------------------------------------------------------- failed checks leave no output_dir


def test_a_data_error_found_while_building_the_dataset_leaves_no_output_dir(assets, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "The cat sees the red ball."}) + "\n")
    out = tmp_path / "o"
    with pytest.raises(RecipeFailed, match="dataset: .*0 blocks of 256 tokens") as e:
        run_recipe(_cfg(assets, out, **{"dataset.data_files": short, "dataset.cache_dir": tmp_path / "c"}))
    assert e.value.code == 2
    assert not out.exists()


def test_a_bad_record_at_line_5000_is_one_line_before_training_and_leaves_no_output_dir(assets, tmp_path):
    lines = assets["corpus"].read_text().splitlines()
    records = [lines[i % len(lines)] for i in range(6000)]
    records[4999] = '{"text": "an unfinished record}'
    data = tmp_path / "large.jsonl"
    data.write_text("\n".join(records) + "\n")
    out = tmp_path / "o"
    with pytest.raises(RecipeFailed) as e:
        run_recipe(_cfg(assets, out, **{"dataset.data_files": data, "dataset.cache_dir": tmp_path / "c"}))
    assert e.value.code == 2 and "Traceback" not in e.value.stderr
    assert len(_error_lines(e.value.stderr)) == 1
    assert str(e.value).startswith(
        f"dataset: {data}:5000: invalid JSON in the record starting on this line (Expecting"
    ), str(e.value)
    assert not out.exists()


# ------------------------------------------------------------------------------------- empty documents


def test_empty_pretraining_documents_never_give_a_nan_loss(assets, tmp_path):
    # Empty texts only add an end-of-document token to the stream; every block still has real labels.
    docs = assets["corpus"].read_text().splitlines()
    empty = json.dumps({"text": ""})
    data = tmp_path / "with_empty.jsonl"
    data.write_text("".join(f"{d}\n{empty}\n{empty}\n" for d in docs))
    out = tmp_path / "o"
    run_recipe(_cfg(assets, out, **{"dataset.data_files": data, "dataset.cache_dir": tmp_path / "c"}))
    losses = _losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses


# -------------------------------------------------------------------------- kill / full disk in export


_KILL_AFTER_FIRST_EXPORT_FILE = """
import os, runpy, signal, sys
from longlora_tune.hf import export

real = export._save_safetensors

def save_then_die(tensors, path):
    real(tensors, path)
    os.kill(os.getpid(), signal.SIGKILL)  # the first file of hf/ is written, the rest is not

export._save_safetensors = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_the_final_export_leaves_no_half_folder_and_a_rerun_exports_without_training(
    assets, tmp_path
):
    out = tmp_path / "o"
    overrides = _overrides(assets, out, export_formats="[hf,peft,adapter]")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", _KILL_AFTER_FIRST_EXPORT_FILE, str(RECIPE), "--config", str(TINY)]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    # Killed inside hf/: only its hidden temporary folder exists, no hf/, peft/ or adapter/.
    assert not (out / "hf").exists() and not (out / "peft").exists() and not (out / "adapter").exists()
    assert [n.split("-")[0] for n in _hidden(out)] == [".hf.tmp"]
    ckpt = out / "checkpoints" / "step_000002"
    ckpt_format.verify_checkpoint(ckpt)
    write_seq = ckpt_format.read_manifest(ckpt)["write_seq"]

    stderr = run_recipe(_cfg(assets, out, export_formats="[hf,peft,adapter]", resume_from_checkpoint="true"))
    assert "train: 100%" in stderr  # the progress bar starts (and ends) at step 2: no step is trained
    assert _hidden(out) == []  # the dead run's temporary folder is gone
    assert lineage.list_checkpoints(out / "checkpoints") == [ckpt]
    assert ckpt_format.read_manifest(ckpt)["write_seq"] == write_seq  # no training, no new checkpoint
    merged = load_file(str(out / "hf" / "model.safetensors"))
    trained = ckpt_format.read_checkpoint_trainable(ckpt)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], trained["tok_embeddings.weight"])
    assert json.loads((out / "hf" / "config.json").read_text())["rope_scaling"]["factor"] >= 1
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "trainable.safetensors").is_file()


def test_disk_full_during_the_export_is_one_line_and_keeps_the_checkpoint(assets, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def fill_disk(tensors, filename, metadata=None):
        if ".hf.tmp-" not in str(filename):
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fill_disk)
    out = tmp_path / "o"
    with pytest.raises(RecipeFailed) as e:
        run_recipe(_cfg(assets, out, export_formats="[hf]"))
    ckpt = out / "checkpoints" / "step_000002"
    assert e.value.code == 4 and "Traceback" not in e.value.stderr
    assert len(_error_lines(e.value.stderr)) == 1
    message = str(e.value)
    assert re.fullmatch(
        rf"no space left on device while writing {re.escape(str(out / 'hf' / 'model.safetensors'))} "
        r"\(the whole output needs about [0-9.]+ (KiB|MiB)\); the partial output was removed and what was "
        r"there before is unchanged; free disk space, then run the same command with "
        rf"resume_from_checkpoint=true: it exports again from {re.escape(str(ckpt))} without training",
        message,
    ), message
    assert not (out / "hf").exists() and _hidden(out) == []
    ckpt_format.verify_checkpoint(ckpt)

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run_recipe(_cfg(assets, out, export_formats="[hf]", resume_from_checkpoint="true"))
    assert (out / "hf" / "model.safetensors").is_file()
