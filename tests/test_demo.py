"""``python -m longlora_tune.quickstart.demo --sft``: tiny LongAlpaca assets and its training command."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torchtune.models.llama2 import llama2_tokenizer

from longlora_tune import resources
from longlora_tune.data import check_dataset_source, longalpaca_dataset
from longlora_tune.quickstart import demo

RECIPE = str(resources.recipe_path("longlora_distributed"))


def test_sft_command_runs_tiny_longalpaca_on_the_workdir_files(tmp_path):
    cmd = demo.build_command(tmp_path, 1, ["max_steps=2"], use_tune=True, sft=True)
    assert cmd[1:] == [
        "run",
        "longlora_distributed",
        "--config",
        "tiny_longalpaca",
        f"checkpoint_dir={tmp_path / 'base'}",
        f"dataset.data_files={tmp_path / 'longalpaca.json'}",
        f"output_dir={tmp_path / 'out'}",
        "max_steps=2",
    ]
    cmd = demo.build_command(tmp_path, 2, [], use_tune=False, sft=True)
    config = resources.config_path("tiny_longalpaca")
    assert config.is_file() and cmd[-5:-3] == ["--config", str(config)]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and RECIPE in cmd
    # The pretraining demo is unchanged.
    assert demo.build_command(tmp_path, 1, [], use_tune=True)[4:6] == [
        "tiny_demo",
        f"checkpoint_dir={tmp_path / 'base'}",
    ]


def test_sft_assets_only_writes_what_the_config_reads(tmp_path, capsys):
    assert demo.main(["--sft", "--assets-only", "--workdir", str(tmp_path)]) == 0
    assert "tiny_longalpaca" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    cfg = OmegaConf.load(resources.config_path("tiny_longalpaca"))
    # The default work folder is the config's own, so the documented command needs no overrides.
    assert Path(cfg.checkpoint_dir) == Path("/tmp") / demo._SFT.workdir / "base"
    assert Path(cfg.dataset.data_files) == Path("/tmp") / demo._SFT.workdir / demo._SFT.data_file
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (tmp_path / "base" / name).is_file()
    data = tmp_path / "longalpaca.json"
    cfg.dataset.data_files = str(data)
    check_dataset_source(cfg.dataset)
    tokenizer = llama2_tokenizer(str(tmp_path / "base" / "tokenizer.model"), prompt_template=None)
    ds = longalpaca_dataset(
        tokenizer, source="json", data_files=str(data), max_seq_len=cfg.dataset.max_seq_len
    )
    assert len(ds) == 32 >= cfg.global_batch_size
    # A second call re-uses the files instead of rewriting them.
    before = data.stat().st_mtime_ns
    assert demo.main(["--sft", "--assets-only", "--workdir", str(tmp_path)]) == 0
    assert data.stat().st_mtime_ns == before


def test_assets_command_names_the_demo_that_creates_a_tiny_base(tmp_path):
    for config, flag in (("tiny_demo", ""), ("tiny_longalpaca", " --sft")):
        base = OmegaConf.load(resources.config_path(config)).checkpoint_dir
        command = demo.assets_command(base)
        parent = Path(base).parent
        expected = f"python -m longlora_tune.quickstart.demo{flag} --assets-only --workdir {parent}"
        assert command == expected
        # Running it creates exactly the folder the config reads.
        workdir = tmp_path / Path(base).parent.name
        args = command.split()[3:-1] + [str(workdir)]
        assert demo.main(args) == 0
        assert (workdir / "base" / "config.json").is_file()
    assert demo.assets_command("/models/Llama-2-7b-hf") is None
    assert demo.assets_command("/tmp/elsewhere/base") is None


@pytest.mark.slow
def test_sft_demo_trains_and_exports(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "longlora_tune.quickstart.demo",
            "--sft",
            "--workdir",
            str(tmp_path),
            "max_steps=2",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--config tiny_longalpaca" in proc.stdout
    # Next steps: passkey and generate on hf/ (no plain-text corpus for perplexity), with the passkey note.
    assert "--config eval/tiny_passkey" in proc.stdout and "eval/tiny_perplexity" not in proc.stdout
    assert "expected to fail retrieval" in proc.stdout and "-m longlora_tune.eval.generate" in proc.stdout
    assert (tmp_path / "out" / "hf" / "config.json").is_file()
    assert (tmp_path / "out" / "peft" / "adapter_config.json").is_file()


def test_tiny_eval_configs_default_to_the_quick_start_output():
    # `python -m longlora_tune.quickstart.demo` (default workdir <tmp>/longlora_demo) then the eval commands
    # of the
    # README with no overrides evaluate what the demo trained, with the checkpoint's own RoPE factor.
    import tempfile

    workdir = Path(tempfile.gettempdir()) / "longlora_demo"
    for name in ("eval/tiny_perplexity", "eval/tiny_passkey"):
        cfg = OmegaConf.load(resources.config_path(name))
        assert Path(cfg.checkpoint_dir) == workdir / "out" / "hf", name
        assert cfg.training_length is None and cfg.rope_scaling_factor is None, name
    perplexity = OmegaConf.load(resources.config_path("eval/tiny_perplexity"))
    assert Path(perplexity.dataset.path) == workdir / "corpus.jsonl"
