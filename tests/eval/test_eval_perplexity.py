"""Sliding-window perplexity: window rule, edge cases, and the recipe against an independent computation."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.eval.model_loading import eval_rope_factor, load_eval_model
from longlora_tune.eval.perplexity import (
    evaluate_perplexity,
    load_token_stream,
    select_windows,
    window_starts,
)

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hf_reference_ppl(
    ckpt: Path, stream: np.ndarray, length: int, stride: int, factor: float, tmp: Path
) -> float:
    """PPL by hand: Hugging Face transformers' Llama with linear RoPE scaling, float64 log-softmax."""
    import transformers

    scaled = tmp / "hf_scaled"
    scaled.mkdir(exist_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": factor}
    (scaled / "config.json").write_text(json.dumps(config))
    if not (scaled / "model.safetensors").exists():
        (scaled / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(scaled), dtype=torch.float32)
    model.eval()
    starts = list(range(0, len(stream) - length, stride))[:-1]
    losses = []
    for s in starts:
        window = torch.tensor(stream[s : s + length].astype(np.int64))[None]
        with torch.no_grad():
            logits = model(window).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        target = window[0, 1:]
        losses.append(-logp[torch.arange(length - 1), target].mean().item())
    return math.exp(sum(losses) / len(losses))


def test_window_starts_follow_reference_rule() -> None:
    # range(0, 1000 - 300, 256) = [0, 256, 512]; the last start is dropped.
    assert window_starts(1000, 300, 256) == [0, 256]
    assert window_starts(1000, 300, 256, drop_last=False) == [0, 256, 512]
    # Too short for the dropped-last rule: no window at all.
    assert window_starts(300 + 256, 300, 256) == []
    assert window_starts(300 + 257, 300, 256) == [0]
    assert window_starts(100, 300, 256) == []


def test_select_windows_spreads_evenly() -> None:
    starts = list(range(0, 1000, 100))
    assert select_windows(starts, 4) == [0, 300, 600, 900]
    assert select_windows(starts, 1) == [0]
    assert select_windows(starts, 50) == starts
    assert select_windows(starts, None) == starts


def test_factor_is_the_checkpoints_own_and_training_length_only_fills_a_gap(tiny_ckpt: Path, caplog) -> None:
    from longlora_tune.errors import LongLoRAConfigError
    from longlora_tune.hf.base import HFBaseModel

    base = HFBaseModel.read(tiny_ckpt)  # max_position_embeddings 64, no scaling
    assert eval_rope_factor(base) == 1.0
    assert eval_rope_factor(base, training_length=200) == 4.0  # ceil(200 / 64): the checkpoint has none
    assert eval_rope_factor(base, rope_scaling_factor=3.0) == 3.0
    scaled = dataclasses.replace(
        base, config=dict(base.config, rope_scaling={"type": "linear", "factor": 8.0})
    )
    assert eval_rope_factor(scaled) == 8.0
    assert eval_rope_factor(scaled, training_length=128) == 8.0  # an existing larger factor is kept
    # The checkpoint's own factor wins over a disagreeing training length, with a warning naming both.
    merged = dataclasses.replace(
        base, config=dict(base.config, rope_scaling={"type": "linear", "factor": 4.0})
    )
    with caplog.at_level("WARNING"):
        assert eval_rope_factor(merged, training_length=512) == 4.0
    assert "trained with factor 4, training_length=512 would give 8" in caplog.text
    # An adapter's recorded factor is the checkpoint's factor for unmerged weights.
    assert eval_rope_factor(base, training_length=128, checkpoint_factor=4.0) == 4.0
    with pytest.raises(LongLoRAConfigError, match="not both"):
        eval_rope_factor(base, training_length=128, rope_scaling_factor=2.0)


def test_short_text_is_skipped_and_tail_is_never_scored(tiny_ckpt: Path) -> None:
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=128, training_length=128)
    rng = np.random.default_rng(0)
    length, stride = 32, 16
    # range(0, 120 - 32, 16) = [0, 16, ..., 80] -> dropped last -> starts up to 64: tokens >= 96 unused.
    stream = rng.integers(3, 512, size=120)
    short = evaluate_perplexity(model, stream, [112, length], stride=stride, progress=False)
    assert short[0].skipped is not None and "120 tokens" in short[0].skipped
    assert math.isnan(short[0].perplexity) and short[0].num_windows == 0
    assert short[1].skipped is None and short[1].num_windows == 5
    assert short[1].num_tokens == 5 * (length - 1)
    # Equal-length windows: per-window mean and token-weighted mean agree.
    assert short[1].perplexity == pytest.approx(short[1].token_perplexity, rel=1e-9)

    tail_changed = stream.copy()
    tail_changed[96:] = (tail_changed[96:] + 7) % 500 + 3
    same = evaluate_perplexity(model, tail_changed, [length], stride=stride, progress=False)[0]
    assert same.perplexity == pytest.approx(short[1].perplexity, rel=1e-12)
    inside_changed = stream.copy()
    inside_changed[95] = (inside_changed[95] + 7) % 500 + 3
    other = evaluate_perplexity(model, inside_changed, [length], stride=stride, progress=False)[0]
    assert other.perplexity != pytest.approx(short[1].perplexity, rel=1e-9)


def test_text_source_tokenizes_documents_with_bos_eos(tmp_path: Path, tiny_tokenizer) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "The cat sees."}) + "\n" + json.dumps({"text": "A dog."}) + "\n")
    stream = load_token_stream(source="text", path=str(path), tokenizer=tiny_tokenizer)
    expected = tiny_tokenizer.encode("The cat sees.") + tiny_tokenizer.encode("A dog.")
    assert stream.tolist() == expected and expected[0] == 1 and expected[-1] == 2
    # The hub loader path, offline through the datasets "json" builder, gives the same stream.
    hub = load_token_stream(
        source="hf",
        name="json",
        data_files=str(path),
        split="train",
        tokenizer=tiny_tokenizer,
        max_documents=1,
    )
    assert hub.tolist() == tiny_tokenizer.encode("The cat sees.")


def test_bin_source_reads_a_uint16_stream(tmp_path: Path, tiny_tokenizer) -> None:
    ids = np.array([1, 300, 7, 511, 2, 0, 42], dtype=np.uint16)
    data = tmp_path / "ok.bin"
    ids.tofile(data)
    stream = load_token_stream(source="bin", path=str(data), tokenizer=tiny_tokenizer)
    assert isinstance(stream, np.memmap) and stream.tolist() == ids.tolist()
    # A real tokenized corpus (thousands of bytes) is not mistaken for text.
    from longlora_tune.quickstart.tiny import make_documents

    corpus = [t for doc in make_documents(20) for t in tiny_tokenizer.encode(doc)]
    np.asarray(corpus, dtype=np.uint16).tofile(data)
    assert load_token_stream(source="bin", path=str(data), tokenizer=tiny_tokenizer).tolist() == corpus
    assert len(corpus) > 1000


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.bin", b"", r"is empty \(0 bytes\)"),
        ("odd.bin", np.array([1, 5, 9], dtype=np.uint16).tobytes() + b"\x00", r"odd size \(7 bytes\)"),
        # Even-sized ASCII text: every byte pair is a "token", the old reader gave an IndexError later.
        ("book.bin", ("The grass is green. The sky is blue.\n" * 40).encode(), "is a text file"),
        # Odd-sized UTF-8 text with non-ASCII characters: still recognised as text (before the size check).
        ("notes.bin", ("Café au lait, naïve façade; " * 20 + "!").encode(), "is a text file"),
        # ids 600 and 40000 are beyond the 512-id tiny tokenizer: another tokenizer's stream.
        ("other.bin", np.array([1, 30, 600, 40000, 2], dtype=np.uint16).tobytes(), "holds token id 40000"),
    ],
    ids=["empty", "odd-size", "ascii-text", "utf8-text", "other-tokenizer"],
)
def test_bin_source_rejects_files_that_are_not_token_streams(
    tmp_path: Path, tiny_tokenizer, name: str, content: bytes, message: str
) -> None:
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(LongLoRAConfigError, match=message) as info:
        load_token_stream(source="bin", path=str(data), tokenizer=tiny_tokenizer)
    text = str(info.value)
    assert "\n" not in text and str(data) in text
    assert "dataset.source=text" in text or "non-empty" in text  # every message names a fix


def test_bin_id_check_uses_explicit_vocab_size_and_is_skipped_without_one(tmp_path: Path) -> None:
    data = tmp_path / "ids.bin"
    np.array([1, 30, 600, 2], dtype=np.uint16).tofile(data)
    assert load_token_stream(source="bin", path=str(data)).tolist() == [1, 30, 600, 2]
    assert load_token_stream(source="bin", path=str(data), vocab_size=601).tolist() == [1, 30, 600, 2]
    with pytest.raises(LongLoRAConfigError, match="holds token id 600 but the vocabulary has 600 ids"):
        load_token_stream(source="bin", path=str(data), vocab_size=600)


def test_out_of_vocabulary_stream_is_a_config_error_not_an_index_error(tiny_ckpt: Path) -> None:
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=64, training_length=64)
    stream = np.full(200, 5, dtype=np.uint16)
    stream[150] = 512  # one past the tiny model's 512-entry embedding
    with pytest.raises(LongLoRAConfigError, match="holds id 512 but the model's vocabulary has 512 ids"):
        evaluate_perplexity(model, stream, [32], stride=16, progress=False)


def test_recipe_reports_a_text_file_given_as_bin_in_one_line(
    tmp_path: Path, tiny_ckpt: Path, run_eval_recipe, capsys: pytest.CaptureFixture
) -> None:
    text_file = tmp_path / "pg19.bin"
    text_file.write_text("It was the best of times, it was the worst of times.\n" * 30)
    with pytest.raises(SystemExit) as exit_info:
        run_eval_recipe(
            "longlora_eval_perplexity",
            "eval/tiny_perplexity",
            f"checkpoint_dir={tiny_ckpt}",
            "dataset.source=bin",
            f"dataset.path={text_file}",
            f"output_dir={tmp_path / 'out'}",
        )
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longlora_tune: error: ")
    assert str(text_file) in lines[0] and "is a text file" in lines[0]


@pytest.mark.slow
def test_recipe_via_torchrun_matches_independent_ppl(tmp_path: Path, tiny_ckpt: Path) -> None:
    rng = np.random.default_rng(1)
    stream = rng.integers(3, 512, size=400).astype(np.uint16)
    data = tmp_path / "val.bin"
    stream.tofile(data)
    out = tmp_path / "out"
    # Two CPU processes (gloo): windows are sharded across ranks and the sums all-reduced, so matching the
    # single-model reference also checks the sharding (5 windows at L=48: 3 on rank 0, 2 on rank 1).
    cmd = [
        "tune",
        "run",
        "--nproc_per_node",
        "2",
        "longlora_eval_perplexity",
        "--config",
        "eval/tiny_perplexity",
        f"checkpoint_dir={tiny_ckpt}",
        "dataset.source=bin",
        f"dataset.path={data}",
        "eval_lengths=[48,96,512]",
        "stride=64",
        "max_windows=null",
        "training_length=256",
        f"output_dir={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "eval_length" in proc.stdout  # the printed table

    result = json.loads((out / "perplexity.json").read_text())
    assert result["model"]["rope_scaling_factor"] == 4.0  # ceil(256 / 64), not from the eval lengths
    rows = {r["eval_length"]: r for r in result["results"]}
    for length in (48, 96):
        expected = _hf_reference_ppl(tiny_ckpt, stream, length, 64, factor=4.0, tmp=tmp_path)
        assert rows[length]["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert rows[length]["num_windows"] == len(range(0, 400 - length, 64)) - 1
    assert rows[512]["skipped"] and rows[512]["perplexity"] is None

    with (out / "perplexity.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["eval_length"]) for r in csv_rows] == [48, 96, 512]
    assert (out / "perplexity.png").read_bytes()[:8] == PNG_MAGIC


def test_recipe_config_error_is_one_line(
    tmp_path: Path, run_eval_recipe, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_eval_recipe(
            "longlora_eval_perplexity",
            "eval/tiny_perplexity",
            f"checkpoint_dir={tmp_path / 'missing'}",
            f"output_dir={tmp_path}",
        )
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longlora_tune: error: ") and "missing" in lines[0]


def _tiny_run(tmp_path: Path, tiny_ckpt: Path, *overrides: str) -> tuple[Path, list[str]]:
    """A 400-token uint16 stream and the overrides that evaluate it (stride 64) into ``tmp_path/out``."""
    data = tmp_path / "val.bin"
    if not data.exists():
        np.random.default_rng(1).integers(3, 512, size=400).astype(np.uint16).tofile(data)
    out = tmp_path / "out"
    args = [
        f"checkpoint_dir={tiny_ckpt}",
        "dataset.source=bin",
        f"dataset.path={data}",
        "stride=64",
        "max_windows=null",
        "training_length=256",
        f"output_dir={out}",
        *overrides,
    ]
    return out, args


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_run_where_every_length_is_skipped_is_a_config_error_and_keeps_earlier_results(
    tmp_path: Path, tiny_ckpt: Path, run_eval_recipe, capsys: pytest.CaptureFixture
) -> None:
    out, args = _tiny_run(tmp_path, tiny_ckpt)
    with pytest.raises(SystemExit) as first:
        run_eval_recipe("longlora_eval_perplexity", "eval/tiny_perplexity", *args, "eval_lengths=[48]")
    assert not first.value.code
    before = _files(out)
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        run_eval_recipe(
            "longlora_eval_perplexity", "eval/tiny_perplexity", *args, "eval_lengths=[100000,200000]"
        )
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longlora_tune: error: "), captured.err
    # Which lengths, why, and that nothing was replaced.
    assert "100000" in lines[0] and "200000" in lines[0] and "400 tokens" in lines[0]
    assert str(out) in lines[0] and "unchanged" in lines[0]
    assert captured.out == ""
    assert _files(out) == before


def test_a_mixed_run_marks_the_skipped_length_in_a_compact_table(
    tmp_path: Path, tiny_ckpt: Path, run_eval_recipe, capsys: pytest.CaptureFixture
) -> None:
    out, args = _tiny_run(tmp_path, tiny_ckpt, "eval_lengths=[48,512]")
    with pytest.raises(SystemExit) as exit_info:
        run_eval_recipe("longlora_eval_perplexity", "eval/tiny_perplexity", *args)
    assert not exit_info.value.code
    printed = capsys.readouterr().out.strip().splitlines()
    table = printed[:4]  # header, rule, two rows; then the reason, then the written paths
    assert table[0].split()[0] == "eval_length" and table[3].split()[0] == "512"
    assert table[3].split()[-1] == "skipped"
    assert max(len(line) for line in table) <= 80, "\n".join(table)
    assert printed[4].startswith("skipped 512: the data has 400 tokens")

    result = json.loads((out / "perplexity.json").read_text())
    assert result["incomplete"] is None
    assert "400 tokens" in result["results"][1]["skipped"] and result["results"][0]["skipped"] is None
    with (out / "perplexity.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[1]["skipped"] == result["results"][1]["skipped"] and csv_rows[0]["skipped"] == ""
    assert (out / "perplexity.txt").read_text().splitlines() == printed[:5]


@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_run_writes_the_finished_lengths_marked_incomplete(
    tmp_path: Path, tiny_ckpt: Path, run_eval_recipe_signalled, signum: int
) -> None:
    import signal

    name = signal.Signals(signum).name
    out, args = _tiny_run(tmp_path, tiny_ckpt, "eval_lengths=[48,96,512]")
    # Length 48 has 5 windows: the 6th window scored is the first of length 96, where the signal arrives.
    proc = run_eval_recipe_signalled(
        "longlora_eval_perplexity",
        "eval/tiny_perplexity",
        *args,
        signal_in="longlora_tune.eval.perplexity.score_window",
        on_call=6,
        signum=signum,
    )
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback
    assert lines[0].startswith(f"longlora_tune: stopped by {name}; 1 of 3 lengths finished")
    assert str(out / "perplexity.json") in lines[0]

    result = json.loads((out / "perplexity.json").read_text())
    assert [r["eval_length"] for r in result["results"]] == [48]
    assert result["incomplete"] == f"stopped by {name} after 1 of 3 lengths; not evaluated: 96, 512"
    with (out / "perplexity.csv").open() as f:
        assert [int(r["eval_length"]) for r in csv.DictReader(f)] == [48]
    note = f"incomplete: {result['incomplete']}"
    assert note in proc.stdout.splitlines()
    assert (out / "perplexity.txt").read_text().splitlines()[-1] == note
    assert (out / "perplexity.png").read_bytes()[:8] == PNG_MAGIC


def test_a_run_signalled_before_any_length_finished_writes_nothing(
    tmp_path: Path, tiny_ckpt: Path, run_eval_recipe_signalled
) -> None:
    out, args = _tiny_run(tmp_path, tiny_ckpt, "eval_lengths=[48,96]")
    out.mkdir()
    for suffix in ("json", "csv", "txt", "png"):
        (out / f"perplexity.{suffix}").write_text(f"an earlier run's {suffix}")
    before = _files(out)
    proc = run_eval_recipe_signalled(
        "longlora_eval_perplexity",
        "eval/tiny_perplexity",
        *args,
        signal_in="longlora_tune.eval.perplexity.score_window",
        on_call=1,
        signum=2,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "longlora_tune: stopped by SIGINT; 0 of 2 lengths finished; nothing was written "
        f"and the results in {out} are unchanged"
    ]
    assert _files(out) == before
