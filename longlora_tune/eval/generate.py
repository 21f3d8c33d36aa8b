"""Ask a LongLoRA model a question about a long text file, streaming the answer to stdout.

::

    python -m longlora_tune.eval.generate --checkpoint /path/to/run/hf --file paper.txt \\
        --question "Summarize the paper in five sentences." \\
        [--max-new-tokens 512 --temperature 0.6 --top-p 0.9 --template chat]

Every supported family works (Llama 2, Llama 3, other Llama-architecture models, Mistral, Qwen2.5): the
checkpoint's ``config.json`` and tokenizer files pick the model and the tokenizer (its family's torchtune
tokenizer, or the folder's ``tokenizer.json``:
:meth:`longlora_tune.hf.base.HFBaseModel.tokenizer_config`). The prompt template defaults by family:

* Llama 2: ``llama2_chat``, LongLoRA's inference prompt ``[INST]{material}\\n{question}[/INST]`` (the same
  function renders LongAlpaca training prompts);
* the other families' chat models (a chat template in ``chat_template.jinja`` or
  ``tokenizer_config.json``): ``chat``, the tokenizer's own chat format with ``{material}\\n{question}``
  as the user turn, up to the assistant header (what ``dataset.template: chat`` trains on,
  :class:`longlora_tune.data.chat_format.ChatFormat`); their base models: ``none``.

``alpaca`` and ``none`` (material, newline, question) are available too. Generation stops at the
tokenizer's stop tokens (Llama 3's ``<|eot_id|>``, Qwen's ``<|im_end|>``). The model uses full attention, a KV
cache
and the RoPE factor of the training length (``--training-length``/``--rope-scaling-factor``, else the
checkpoint's ``rope_scaling``). ``--adapter`` loads an unmerged ``adapter/`` folder on top of a base
checkpoint. Defaults follow LongLoRA's ``inference.py`` (temperature 0.6, top-p 0.9); temperature 0 is
greedy. Missing files end with one ``longlora_tune: error: ...`` line and exit code 2.

A prompt longer than the context the model was trained on still runs (the RoPE cache is sized for it),
but positions past the trained context were never seen in training, so the command prints one
``longlora_tune: warning: ...`` line on stderr naming both lengths (:func:`trained_context_length`,
:func:`context_warning`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from longlora_tune.errors import LongLoRAConfigError, report_errors
from longlora_tune.modules.rope_config import RopeScaling

#: Prompt templates: text templates rendered by :func:`build_prompt`, and ``chat`` (the tokenizer's own).
TEMPLATES = ("chat", "llama2_chat", "alpaca", "none")
_TEXT_TEMPLATES = TEMPLATES[1:]


def build_prompt(material: str, question: str, template: str = "llama2_chat") -> str:
    """Render the inference prompt for a document and a question.

    Args:
        material: the long text.
        question: the question about it.
        template: ``llama2_chat`` (``[INST]{material}\\n{question}[/INST]``), ``alpaca`` or ``none``
            (``chat`` is rendered by the tokenizer: :func:`prompt_ids`).

    Returns:
        The prompt text (without BOS).

    Raises:
        LongLoRAConfigError: for an unknown template.
    """
    if template not in _TEXT_TEMPLATES:
        raise LongLoRAConfigError(f"--template {template!r} is not one of {', '.join(_TEXT_TEMPLATES)}")
    instruction = f"{material}\n{question}"
    if template == "none":
        return instruction
    from longlora_tune.data.longalpaca import longalpaca_prompt

    return longalpaca_prompt(instruction, "", template)


def prompt_ids(tokenizer: Any, material: str, question: str, template: str) -> list[int]:
    """Token ids of the prompt, BOS included: a text template encoded, or the tokenizer's chat format.

    Args:
        tokenizer: the family's torchtune tokenizer.
        material: the long text.
        question: the question about it.
        template: one of :data:`TEMPLATES`.

    Returns:
        The ids to prefill.

    Raises:
        LongLoRAConfigError: for an unknown template, or ``chat`` with a tokenizer without a chat format
            (Llama 2's: use ``llama2_chat``).
    """
    if template == "chat":
        from longlora_tune.data.chat_format import ChatFormat

        try:
            return ChatFormat(tokenizer).prompt_ids(f"{material}\n{question}")
        except LongLoRAConfigError as e:
            raise LongLoRAConfigError(f"--template chat: {e}") from None
    return tokenizer.encode(build_prompt(material, question, template), add_bos=True, add_eos=False)


def default_template(family: str, checkpoint: str | Path) -> str:
    """The prompt template a model answers in, when ``--template`` is not given.

    A family whose tokenizer has no chat format: the prompt format of ours that stands in for it
    (:attr:`longlora_tune.models.families.ModelFamily.own_template`; Llama 2: LongLoRA's ``llama2_chat``).
    The other families: their tokenizer's chat format when the checkpoint is a chat model (it ships a
    chat template, :func:`longlora_tune.hf.base.chat_template`: an instruct model, or an export of one),
    else ``none`` (a base model never saw its family's chat header tokens).

    Args:
        family: a :data:`longlora_tune.models.families.FAMILIES` name.
        checkpoint: the checkpoint folder the tokenizer files come from.

    Returns:
        ``llama2_chat``, ``chat`` or ``none``.
    """
    from longlora_tune.hf.base import chat_template
    from longlora_tune.models.families import FAMILIES

    own = FAMILIES[family].own_template
    if own is not None:
        return own
    return "chat" if chat_template(checkpoint) else "none"


def trained_context_length(
    hf_config: Mapping[str, Any],
    *,
    rope_scaling_factor: float,
    training_length: int | None = None,
    adapter_meta: Mapping[str, Any] | None = None,
) -> tuple[int, str]:
    """The context length the model was trained on, and where that number comes from.

    In order: ``--training-length`` when given; the ``training_length`` an unmerged adapter's
    ``longlora.json`` records (when the model uses that adapter's RoPE factor); else the RoPE factor the
    model is loaded with times the checkpoint's ``max_position_embeddings`` (a merged linear LongLoRA
    export keeps the base's ``max_position_embeddings`` and records the factor in ``rope_scaling``, so a
    4096 base trained at 32768 reads 8 x 4096; a checkpoint without scaling gives its own context), or for
    a yarn or llama3 setting the context it serves (which such exports write as
    ``max_position_embeddings``).

    Args:
        hf_config: the checkpoint's ``config.json``.
        rope_scaling_factor: the RoPE factor the model was loaded with.
        training_length: the ``--training-length`` argument, if given.
        adapter_meta: the adapter's ``longlora.json``, if an adapter was loaded.

    Returns:
        ``(tokens, source)``, e.g. ``(256, "RoPE factor 4 x max_position_embeddings 64")``.
    """
    if training_length:
        return int(training_length), "--training-length"
    if adapter_meta and adapter_meta.get("training_length"):
        recorded = adapter_meta.get("rope_scaling_factor")
        if recorded is None or float(recorded) == float(rope_scaling_factor):
            return int(adapter_meta["training_length"]), "training_length in the adapter's longlora.json"
    factor = float(rope_scaling_factor)
    rope = RopeScaling.from_hf_config(hf_config)
    if rope.rope_type in ("yarn", "llama3"):
        # Their exports write the served context as max_position_embeddings already (context_len); a
        # factor other than the recorded one serves proportionally more or less.
        context = round(rope.context_len * factor / rope.factor)
        return context, f"the {rope.rope_type} RoPE setting in config.json, factor {factor:g}"
    original = int(hf_config.get("max_position_embeddings", 4096))
    return round(factor * original), f"RoPE factor {factor:g} x max_position_embeddings {original}"


def context_warning(prompt_tokens: int, max_new_tokens: int, context: int, source: str) -> str | None:
    """One-line warning when the prompt (or prompt + answer) is longer than the trained context.

    Args:
        prompt_tokens: prompt length in tokens (BOS included).
        max_new_tokens: the ``--max-new-tokens`` budget.
        context: the trained context length (:func:`trained_context_length`).
        source: where ``context`` comes from (shown in the warning).

    Returns:
        The warning line, or None when prompt and answer fit.
    """
    if prompt_tokens > context:
        return (
            f"longlora_tune: warning: the prompt has {prompt_tokens:,} tokens but the model was trained on "
            f"{context:,}-token contexts ({source}); positions past {context:,} were never trained, so "
            "expect a degraded answer (repetition, text that ignores the material); shorten --file or use a "
            "model trained on longer contexts"
        )
    if prompt_tokens + max_new_tokens > context:
        return (
            f"longlora_tune: warning: the prompt ({prompt_tokens:,} tokens) plus up to {max_new_tokens:,} "
            f"new tokens passes the trained context of {context:,} tokens ({source}); the answer may degrade "
            f"after its first {context - prompt_tokens:,} tokens"
        )
    return None


class _Streamer:
    """Prints the decoded text as tokens arrive.

    SentencePiece decodes a word-start piece or an incomplete UTF-8 byte sequence differently once the
    next token is known, so the whole answer is re-decoded and only a stable extension of what was
    already printed is written.
    """

    def __init__(self, tokenizer, out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        self._emit()

    def _emit(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
        self.out.write("\n")
        self.out.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longlora_tune.eval.generate",
        description="Answer a question about a long text file with a LongLoRA model (streams to stdout).",
    )
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder (merged hf/ output)")
    p.add_argument("--adapter", default=None, help="unmerged adapter/ folder to load on top of --checkpoint")
    p.add_argument("--file", required=True, help="text file with the long material")
    p.add_argument("--question", required=True, help="question about the material")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument(
        "--template",
        default=None,
        choices=TEMPLATES,
        help="prompt format (default: llama2_chat for Llama 2; for the others their tokenizer's chat format "
        "when the checkpoint has a chat_template, else none)",
    )
    p.add_argument(
        "--training-length", type=int, default=None, help="context length the model was trained at"
    )
    p.add_argument("--rope-scaling-factor", type=float, default=None, help="explicit RoPE factor")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer's main file (default: the family's, in --checkpoint: tokenizer.model, "
        "original/tokenizer.model for Llama 3, vocab.json for Qwen2.5, tokenizer.json otherwise)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--prefill-chunk-size", type=int, default=2048)
    return p


@report_errors
def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
        out: stream for the answer (default: stdout).

    Returns:
        Exit code 0.

    Raises:
        LongLoRAConfigError: for missing files or bad values (reported as one line, exit code 2).
    """
    from longlora_tune.eval.decoding import generate
    from longlora_tune.eval.model_loading import checkpoint_tokenizer, load_eval_model
    from longlora_tune.models.families import FAMILIES
    from longlora_tune.training.distributed import resolve_device, resolve_dtype

    args = _parser().parse_args(argv)
    out = sys.stdout if out is None else out
    material_path = Path(args.file)
    if not material_path.is_file():
        raise LongLoRAConfigError(f"--file {args.file} does not exist")
    if args.max_new_tokens < 1:
        raise LongLoRAConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise LongLoRAConfigError(
            f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}"
        )

    tokenizer, family = checkpoint_tokenizer(
        args.checkpoint, path=args.tokenizer, path_hint="pass --tokenizer"
    )
    template = args.template or default_template(family, args.checkpoint)
    record = FAMILIES[family]
    if template == "chat" and record.own_template is not None:
        raise LongLoRAConfigError(
            f"--template chat: {record.label}'s tokenizer has no chat format of its own; use --template "
            f"{record.own_template} (LongLoRA's [INST] prompt)"
        )
    ids = prompt_ids(tokenizer, material_path.read_text(), args.question, template)
    device = resolve_device(args.device)
    model, info = load_eval_model(
        args.checkpoint,
        max_seq_len=len(ids) + args.max_new_tokens,
        adapter_dir=args.adapter,
        training_length=args.training_length,
        rope_scaling_factor=args.rope_scaling_factor,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
    )
    print(
        f"[prompt: {len(ids)} tokens, RoPE factor {info['rope_scaling_factor']:g}, device {device}]",
        file=sys.stderr,
        flush=True,
    )
    # load_eval_model has validated both files; read again for the lengths the model was trained on.
    context, source = trained_context_length(
        json.loads((Path(info["checkpoint_dir"]) / "config.json").read_text()),
        rope_scaling_factor=info["rope_scaling_factor"],
        training_length=args.training_length,
        adapter_meta=json.loads((Path(args.adapter) / "longlora.json").read_text()) if args.adapter else None,
    )
    warning = context_warning(len(ids), args.max_new_tokens, context, source)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    streamer = _Streamer(tokenizer, out)
    generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_tokens=list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id]),
        prefill_chunk_size=args.prefill_chunk_size,
        on_token=streamer,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        device=device,
    )
    streamer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
