"""CPU quick start: train a tiny LongLoRA model end to end in about a minute.

    python -m longlora_tune.demo [--workdir DIR] [--nproc N] [--overwrite] [key=value ...]

Writes a tiny random Llama 2 checkpoint (Hugging Face format, with a SentencePiece tokenizer) and a small
text corpus into ``DIR``, then runs the real training command on them::

    tune run longlora_distributed --config tiny_demo checkpoint_dir=DIR/base \\
        dataset.data_files=DIR/corpus.jsonl output_dir=DIR/out

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
from pathlib import Path

from longlora_tune import resources, tiny
from longlora_tune._compat import registered_recipe_names

_RECIPE = "longlora_distributed"
_CONFIG = "tiny_demo"


def build_command(workdir: Path, nproc: int, overrides: list[str], use_tune: bool) -> list[str]:
    """The training command for the demo assets in ``workdir``.

    Args:
        workdir: folder holding ``base/`` and ``corpus.jsonl``; outputs go to ``workdir/out``.
        nproc: processes (1 runs without torchrun).
        overrides: extra ``key=value`` config overrides.
        use_tune: run through the ``tune`` CLI by recipe and config name; otherwise the recipe script
            with ``python`` (or torchrun) and the config file path.

    Returns:
        The argument list.
    """
    args = [
        f"checkpoint_dir={workdir / 'base'}",
        f"dataset.data_files={workdir / 'corpus.jsonl'}",
        f"output_dir={workdir / 'out'}",
        *overrides,
    ]
    dist = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    if use_tune:
        tune = shutil.which("tune") or str(Path(sys.executable).with_name("tune"))
        return [tune, "run", *dist, _RECIPE, "--config", _CONFIG, *args]
    config = str(resources.config_path(_CONFIG))
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
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "longlora_demo",
        help="folder for the tiny model, corpus and outputs (default: %(default)s)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="training processes (CPU, gloo); default 1")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete WORKDIR/out from an earlier demo first"
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must be key=value, got {bad}")
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")

    workdir = args.workdir.expanduser().resolve()
    out = workdir / "out"
    if out.exists():
        if not args.overwrite:
            parser.error(f"{out} exists from an earlier run; pass --overwrite or choose another --workdir")
        shutil.rmtree(out)
    start = time.perf_counter()
    print(f"[demo] writing a tiny Llama 2 checkpoint and corpus to {workdir}", flush=True)
    if not (workdir / "base" / "model.safetensors").is_file():
        tiny.make_hf_checkpoint(workdir / "base")
    if not (workdir / "corpus.jsonl").is_file():
        tiny.make_text_corpus(workdir / "corpus.jsonl", n_docs=200)

    cmd = build_command(workdir, args.nproc, args.overrides, use_tune=_RECIPE in registered_recipe_names())
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
