"""CPU quick start: train a tiny LongLoRA model end to end in about a minute.

    python -m longlora_tune.quickstart.demo [--family F] [--sft] [--workdir DIR] [--nproc N] [--overwrite]
        [--assets-only] [k=v ...]

Writes a tiny random Llama 2 checkpoint (Hugging Face format, with a SentencePiece tokenizer), a small
text corpus and a short ``material.txt`` (for the closing generate hint) into ``DIR``, then runs the real
training command on them::

    tune run longlora_distributed --config tiny_demo checkpoint_dir=DIR/base \\
        dataset.data_files=DIR/corpus.jsonl output_dir=DIR/out

``--family llama3|mistral|qwen2`` does the same for a tiny model of that family
(:func:`longlora_tune.quickstart.tiny.make_hf_checkpoint`: its released ``config.json`` form and tokenizer
files) with
the ``tiny_demo_<family>`` config, in ``<tmp>/longlora_demo_<family>`` by default: a Llama 3.1-style model
extended with its own ``llama3`` RoPE scaling, Mistral with linear interpolation, Qwen2.5 with YaRN.

With ``--sft`` it writes the same tiny checkpoint and a LongAlpaca-format file instead, and fine-tunes on
it with the ``tiny_longalpaca`` config (``dataset.data_files=DIR/longalpaca.json``); with ``--family`` too,
``tiny_longalpaca_<family>`` in the family's own chat format, in ``<tmp>/longalpaca_demo_<family>``.
``--assets-only`` writes the files and prints the command without running it; as ``DIR`` defaults to the
config's own ``/tmp/longalpaca_demo``, ``python -m longlora_tune.quickstart.demo --sft --assets-only``
followed by
``tune run longlora_distributed --config tiny_longalpaca`` needs no overrides (so for every demo).

After training it prints the next steps on ``DIR/out/hf`` (:func:`next_steps`): the perplexity and passkey
evaluations with the tiny eval configs, ``python -m longlora_tune.eval.generate`` and loading ``hf/`` in
transformers.

(``--nproc 2`` adds ``--nproc_per_node 2``: two CPU processes over gloo). Extra ``key=value`` arguments
are passed on as config overrides. When the ``tune`` CLI does not know ``longlora_distributed`` (the
package is not installed, so its registry hook is absent) the same recipe script runs with ``python``
(or torchrun) and the config file's path.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from longlora_tune import resources
from longlora_tune._compat import registered_recipe_names
from longlora_tune.models.families import DEFAULT_FAMILY, FAMILIES
from longlora_tune.quickstart import tiny

_RECIPE = "longlora_distributed"


@dataclass(frozen=True)
class _Demo:
    config: str  # shipped config name
    data_file: str  # data file written into the work folder
    workdir: str  # default work folder: the config's own default paths live there
    family: str = DEFAULT_FAMILY  # tiny.make_hf_checkpoint family
    sft: bool = False

    @property
    def flags(self) -> str:
        """The demo's command-line flags that select this demo (empty for the default)."""
        family = f" --family {self.family}" if self.family != DEFAULT_FAMILY else ""
        return family + (" --sft" if self.sft else "")


def _family_demo(family: str, sft: bool) -> _Demo:
    """The demo of a family: ``tiny_demo``/``tiny_longalpaca`` for the default family, ``..._<family>``
    (SFT in the family's own chat format, ``dataset.template=chat``) for the others."""
    suffix = "" if family == DEFAULT_FAMILY else f"_{family}"
    if sft:
        config, workdir = f"tiny_longalpaca{suffix}", f"longalpaca_demo{suffix}"
        return _Demo(config, "longalpaca.json", workdir, family, sft=True)
    return _Demo(f"tiny_demo{suffix}", "corpus.jsonl", f"longlora_demo{suffix}", family)


#: The families the demo trains (their record's tiny facts say so), in the record's order.
_DEMO_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.tiny is not None and f.tiny.demo)
#: Every demo by (family, sft).
_DEMOS: dict[tuple[str, bool], _Demo] = {
    (family, sft): _family_demo(family, sft) for family in _DEMO_FAMILIES for sft in (False, True)
}
_PRETRAIN, _SFT = _DEMOS[(DEFAULT_FAMILY, False)], _DEMOS[(DEFAULT_FAMILY, True)]
# Records for --sft: as the tiny_longalpaca.yaml header makes them (32 records fill 8 steps of 4).
_SFT_RECORDS = 32
# A short text for the generate hint, well inside the tiny models' 256 trained tokens.
_MATERIAL = "material.txt"


def assets_command(checkpoint_dir: str | Path) -> Optional[str]:
    """The demo command that creates ``checkpoint_dir``, when it is a tiny demo's base model folder.

    The tiny configs read ``DIR/base`` with ``DIR`` named ``longlora_demo`` (``tiny_demo``),
    ``longalpaca_demo`` (``tiny_longalpaca``) or ``longlora_demo_<family>`` (``tiny_demo_<family>``); a
    recipe that finds no model there can print this command instead of a ``tune download`` one.

    Args:
        checkpoint_dir: the config's ``checkpoint_dir``.

    Returns:
        ``python -m longlora_tune.quickstart.demo [--family F] [--sft] --assets-only --workdir DIR``, or None
        for any
        other folder.
    """
    path = Path(checkpoint_dir).expanduser()
    demos = {demo.workdir: demo.flags for demo in _DEMOS.values()}
    if path.name != "base" or path.parent.name not in demos:
        return None
    flags = demos[path.parent.name]
    return f"python -m longlora_tune.quickstart.demo{flags} --assets-only --workdir {path.parent}"


def build_command(
    workdir: Path,
    nproc: int,
    overrides: list[str],
    use_tune: bool,
    *,
    sft: bool = False,
    family: str = DEFAULT_FAMILY,
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
        family: the tiny model's family, one whose record's tiny facts have ``demo`` (``llama2``, the
            default, ``llama3``, ``mistral``, ``qwen2``; config ``tiny_demo_<family>``, or
            ``tiny_longalpaca_<family>`` with ``sft``).

    Returns:
        The argument list.

    Raises:
        ValueError: for an unknown family.
    """
    demo = _demo(family, sft)
    args = [
        f"checkpoint_dir={workdir / 'base'}",
        f"dataset.data_files={workdir / demo.data_file}",
        f"output_dir={workdir / 'out'}",
        *overrides,
    ]
    return _recipe_command(_RECIPE, demo.config, args, use_tune, nproc)


def _recipe_command(recipe: str, config: str, args: list[str], use_tune: bool, nproc: int = 1) -> list[str]:
    """``tune run [--nproc_per_node N] RECIPE --config CONFIG ARGS``, or the script and file by path."""
    dist = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    if use_tune:
        tune = shutil.which("tune") or str(Path(sys.executable).with_name("tune"))
        return [tune, "run", *dist, recipe, "--config", config, *args]
    config_file = str(resources.config_path(config))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", *dist] if dist else [sys.executable]
    )
    return [*launcher, str(resources.recipe_path(recipe)), "--config", config_file, *args]


def next_steps(
    workdir: Path, *, use_tune: bool, sft: bool = False, family: str = DEFAULT_FAMILY
) -> list[tuple[str, list[str]]]:
    """What to try on a finished demo's merged ``hf/`` export: evaluations, then generation.

    Perplexity on the demo corpus (pretraining demos), passkey retrieval (the ``eval/tiny_*`` configs, with
    the family's tokenizer files from ``hf/`` for the families other than Llama 2, whose tokenizer those
    configs name) and ``python -m longlora_tune.eval.generate`` on the demo's short ``material.txt``.

    Args:
        workdir: the demo's work folder (``out/hf`` trained).
        use_tune: name recipes and configs for the ``tune`` CLI; otherwise scripts and files by path.
        sft: the LongAlpaca demo (no plain-text corpus to measure perplexity on).
        family: the tiny model's family.

    Returns:
        ``(what it shows, command)`` pairs.
    """
    from omegaconf import OmegaConf

    from longlora_tune.hf.base import HFBaseModel

    demo = _demo(family, sft)
    hf = workdir / "out" / "hf"
    tokenizer = []
    if family != DEFAULT_FAMILY:  # the tiny eval configs name the default family's tokenizer
        tokenizer = [f"tokenizer.{k}={v}" for k, v in HFBaseModel.read(hf).tokenizer_config().items()]
    common = [f"checkpoint_dir={hf}", f"output_dir={workdir / 'eval'}", *tokenizer]
    steps = []
    if not sft:
        data = [*common, f"dataset.path={workdir / demo.data_file}"]
        perplexity = _recipe_command("longlora_eval_perplexity", "eval/tiny_perplexity", data, use_tune)
        steps.append(("perplexity on the demo corpus", perplexity))
    passkey = _recipe_command("longlora_eval_passkey", "eval/tiny_passkey", common, use_tune)
    note = OmegaConf.load(resources.config_path("eval/tiny_passkey")).note  # a random model's 0%
    steps.append((f"passkey retrieval: {note}", passkey))
    generate = [sys.executable, "-m", "longlora_tune.eval.generate", "--checkpoint", str(hf)]
    generate += ["--file", str(workdir / _MATERIAL), "--question", "What does the teacher find?"]
    steps.append(("a question about a text file, any family", [*generate, "--max-new-tokens", "16"]))
    return steps


def _demo(family: str, sft: bool) -> _Demo:
    demo = _DEMOS.get((family, bool(sft)))
    if demo is None:
        raise ValueError(f"family={family!r}: use one of {', '.join(_DEMO_FAMILIES)}")
    return demo


def main(argv: list[str] | None = None) -> int:
    """Make the tiny assets and run the demo training.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The training command's exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m longlora_tune.quickstart.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--family",
        choices=list(_DEMO_FAMILIES),
        default=DEFAULT_FAMILY,
        help="the tiny model's family, trained with the tiny_demo_<family> config (default: llama2, "
        "config tiny_demo)",
    )
    parser.add_argument(
        "--sft",
        action="store_true",
        help="fine-tune on a tiny LongAlpaca-format file with the tiny_longalpaca[_<family>] config",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"folder for the tiny model, data and outputs (default: {Path(tempfile.gettempdir())}/"
        f"{_PRETRAIN.workdir}, .../{_SFT.workdir} with --sft; .../<that>_<family> with --family)",
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

    try:
        demo = _demo(args.family, args.sft)
    except ValueError as e:
        parser.error(str(e))
    workdir = args.workdir or Path(tempfile.gettempdir()) / demo.workdir
    workdir = workdir.expanduser().resolve()
    other = _base_family(workdir / "base")
    if other is not None and other != demo.family:
        parser.error(
            f"{workdir / 'base'} holds a tiny {other} model, not {demo.family}; choose another --workdir"
        )
    out = workdir / "out"
    if out.exists() and not args.assets_only:
        if not args.overwrite:
            parser.error(f"{out} exists from an earlier run; pass --overwrite or choose another --workdir")
        shutil.rmtree(out)
    start = time.perf_counter()
    what = "LongAlpaca-format file" if args.sft else "corpus"
    label, hf_class = FAMILIES[demo.family].label, FAMILIES[demo.family].hf_architecture
    print(f"[demo] writing a tiny {label} checkpoint and {what} to {workdir}", flush=True)
    if not (workdir / "base" / "model.safetensors").is_file():
        tiny.make_hf_checkpoint(workdir / "base", family=demo.family)
    data = workdir / demo.data_file
    if not data.is_file():
        if args.sft:
            tiny.make_longalpaca_json(data, n=_SFT_RECORDS)
        else:
            tiny.make_text_corpus(data, n_docs=200)
    if not (workdir / _MATERIAL).is_file():
        (workdir / _MATERIAL).write_text(tiny.make_documents(1, seed=1, max_sentences=8)[0] + "\n")

    use_tune = _RECIPE in registered_recipe_names()
    cmd = build_command(
        workdir, args.nproc, args.overrides, use_tune=use_tune, sft=args.sft, family=demo.family
    )
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
        ("hf", f"merged Hugging Face model (config.json has {_rope_summary(out / 'hf')})"),
        ("peft", "PEFT adapter for the base model"),
        ("adapter", "trainable weights in torchtune names + longlora.json"),
        ("checkpoints", "resumable checkpoints (append resume_from_checkpoint=true)"),
        ("logs", "per-step loss, lr, tokens/s"),
    ):
        print(f"  {out / name}: {what}")
    print(f"[demo] next steps (results under {workdir / 'eval'}):")
    for what, command in next_steps(workdir, use_tune=use_tune, sft=args.sft, family=demo.family):
        print(f"  # {what}\n  {shlex.join(command)}")
    print(
        f'  # the merged model in transformers\n  python -c "from transformers import {hf_class}; '
        f"print({hf_class}.from_pretrained('{out / 'hf'}'))\""
    )
    return 0


def _base_family(base: Path) -> Optional[str]:
    """The family of the tiny model already in ``base`` (None when there is none or it is unreadable)."""
    import json

    from longlora_tune.errors import LongLoRAConfigError
    from longlora_tune.models.families import detect_family, tokenizer_files_in

    try:
        return detect_family(json.loads((base / "config.json").read_text()), tokenizer_files_in(base)).name
    except (OSError, ValueError, LongLoRAConfigError):
        return None


def _rope_summary(hf_dir: Path) -> str:
    """``rope_scaling <type> <factor>`` as the exported ``config.json`` states it."""
    import json

    from longlora_tune.modules.rope_config import RopeScaling

    try:
        rope = RopeScaling.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    except (OSError, ValueError):
        return "no readable rope_scaling"
    if rope.rope_type == "default":
        return "no rope_scaling"
    return f"rope_scaling {rope.rope_type} {rope.factor}"


if __name__ == "__main__":
    sys.exit(main())
