"""CPU quick start: train a tiny LongLoRA model end to end in about a minute.

    python -m longlora_tune.demo [--sft] [--workdir DIR] [--nproc N] [--overwrite] [--assets-only] [k=v ...]

Writes a tiny random Llama 2 checkpoint (Hugging Face format, with a SentencePiece tokenizer) and a small
text corpus into ``DIR``, then runs the real training command on them::

    tune run longlora_distributed --config tiny_demo checkpoint_dir=DIR/base \\
        dataset.data_files=DIR/corpus.jsonl output_dir=DIR/out

With ``--sft`` it writes the same tiny checkpoint and a LongAlpaca-format file instead, and fine-tunes on
it with the ``tiny_longalpaca`` config (``dataset.data_files=DIR/longalpaca.json``). ``--assets-only``
writes the files and prints the command without running it; as ``DIR`` defaults to the config's own
``/tmp/longalpaca_demo``, ``python -m longlora_tune.demo --sft --assets-only`` followed by
``tune run longlora_distributed --config tiny_longalpaca`` needs no overrides.

(``--nproc 2`` adds ``--nproc_per_node 2``: two CPU processes over gloo). Extra ``key=value`` arguments
are passed on as config overrides. When the ``tune`` CLI does not know ``longlora_distributed`` (the
package is not installed, so its registry hook is absent) the same recipe script runs with ``python``
(or torchrun) and the config file's path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from longlora_tune import resources, tiny
from longlora_tune._compat import registered_recipe_names

_RECIPE = "longlora_distributed"


@dataclass(frozen=True)
class _Demo:
    config: str  # shipped config name
    data_file: str  # data file written into the work folder
    workdir: str  # default work folder: the config's own default paths live there


_PRETRAIN = _Demo("tiny_demo", "corpus.jsonl", "longlora_demo")
_SFT = _Demo("tiny_longalpaca", "longalpaca.json", "longalpaca_demo")
# Records for --sft: as the tiny_longalpaca.yaml header makes them (32 records fill 8 steps of 4).
_SFT_RECORDS = 32


def assets_command(checkpoint_dir: str | Path) -> Optional[str]:
    """The demo command that creates ``checkpoint_dir``, when it is a tiny demo's base model folder.

    The tiny configs read ``DIR/base`` with ``DIR`` named ``longlora_demo`` (``tiny_demo``) or
    ``longalpaca_demo`` (``tiny_longalpaca``); a recipe that finds no model there can print this command
    instead of a ``tune download`` one.

    Args:
        checkpoint_dir: the config's ``checkpoint_dir``.

    Returns:
        ``python -m longlora_tune.demo [--sft] --assets-only --workdir DIR``, or None for any other folder.
    """
    path = Path(checkpoint_dir).expanduser()
    demos = {_PRETRAIN.workdir: "", _SFT.workdir: " --sft"}
    if path.name != "base" or path.parent.name not in demos:
        return None
    return f"python -m longlora_tune.demo{demos[path.parent.name]} --assets-only --workdir {path.parent}"


def build_command(
    workdir: Path, nproc: int, overrides: list[str], use_tune: bool, *, sft: bool = False
) -> list[str]:
    """The training command for the demo assets in ``workdir``.

    Args:
        workdir: folder holding ``base/`` and ``corpus.jsonl`` (``longalpaca.json`` with ``sft``); outputs
            go to ``workdir/out``.
        nproc: processes (1 runs without torchrun).
        overrides: extra ``key=value`` config overrides.
        use_tune: run through the ``tune`` CLI by recipe and config name; otherwise the recipe script
            with ``python`` (or torchrun) and the config file path.
        sft: the ``tiny_longalpaca`` fine-tuning demo instead of ``tiny_demo`` pretraining.

    Returns:
        The argument list.
    """
    demo = _SFT if sft else _PRETRAIN
    args = [
        f"checkpoint_dir={workdir / 'base'}",
        f"dataset.data_files={workdir / demo.data_file}",
        f"output_dir={workdir / 'out'}",
        *overrides,
    ]
    dist = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    if use_tune:
        tune = shutil.which("tune") or str(Path(sys.executable).with_name("tune"))
        return [tune, "run", *dist, _RECIPE, "--config", demo.config, *args]
    config = str(resources.config_path(demo.config))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", *dist] if dist else [sys.executable]
    )
    return [*launcher, str(resources.recipe_path(_RECIPE)), "--config", config, *args]


def main(argv: list[str] | None = None) -> int:
    """Make the tiny assets and run the demo training.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The training command's exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m longlora_tune.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sft",
        action="store_true",
        help="fine-tune on a tiny LongAlpaca-format file with the tiny_longalpaca config",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"folder for the tiny model, data and outputs (default: {Path(tempfile.gettempdir())}/"
        f"{_PRETRAIN.workdir}, or .../{_SFT.workdir} with --sft)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="training processes (CPU, gloo); default 1")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete WORKDIR/out from an earlier demo first"
    )
    parser.add_argument(
        "--assets-only", action="store_true", help="write the model and data, print the command, do not train"
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must be key=value, got {bad}")
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")

    demo = _SFT if args.sft else _PRETRAIN
    workdir = args.workdir or Path(tempfile.gettempdir()) / demo.workdir
    workdir = workdir.expanduser().resolve()
    out = workdir / "out"
    if out.exists() and not args.assets_only:
        if not args.overwrite:
            parser.error(f"{out} exists from an earlier run; pass --overwrite or choose another --workdir")
        shutil.rmtree(out)
    start = time.perf_counter()
    what = "LongAlpaca-format file" if args.sft else "corpus"
    print(f"[demo] writing a tiny Llama 2 checkpoint and {what} to {workdir}", flush=True)
    if not (workdir / "base" / "model.safetensors").is_file():
        tiny.make_hf_checkpoint(workdir / "base")
    data = workdir / demo.data_file
    if not data.is_file():
        if args.sft:
            tiny.make_longalpaca_json(data, n=_SFT_RECORDS)
        else:
            tiny.make_text_corpus(data, n_docs=200)

    use_tune = _RECIPE in registered_recipe_names()
    cmd = build_command(workdir, args.nproc, args.overrides, use_tune=use_tune, sft=args.sft)
    if args.assets_only:
        print("[demo] assets written; train with:\n  " + " ".join(cmd), flush=True)
        return 0
    print("[demo] running:\n  " + " ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    # A tiny model gains nothing from intra-op threads; they only oversubscribe small machines.
    env.setdefault("OMP_NUM_THREADS", "1")
    rc = subprocess.call(cmd, env=env)
    elapsed = time.perf_counter() - start
    if rc != 0:
        print(f"[demo] training failed with exit code {rc} after {elapsed:.0f} s", file=sys.stderr)
        return rc
    print(f"[demo] done in {elapsed:.0f} s. Outputs under {out}:")
    for name, what in (
        ("hf", "merged Hugging Face model (config.json has rope_scaling linear 4)"),
        ("peft", "PEFT adapter for the base model"),
        ("adapter", "trainable weights in torchtune names + longlora.json"),
        ("checkpoints", "resumable checkpoints (append resume_from_checkpoint=true)"),
        ("logs", "per-step loss, lr, tokens/s"),
    ):
        print(f"  {out / name}: {what}")
    print(
        '[demo] try: python -c "from transformers import LlamaForCausalLM; '
        f"print(LlamaForCausalLM.from_pretrained('{out / 'hf'}'))\""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
