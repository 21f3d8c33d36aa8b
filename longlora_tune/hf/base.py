"""A Hugging Face base-model folder, read once, and its ``tokenizer.json`` as a torchtune model tokenizer.

The training recipe, the exports and the evaluation loader all need the same facts about the base
checkpoint (what ``tune download <repo>`` writes): its ``config.json``, its model family
(:mod:`longlora_tune.models.families`: Llama 2, Llama 3.x, other Llama-architecture models, Mistral,
Qwen2), the builder arguments it implies, its context length and RoPE setting, its tokenizer, and its
weights in torchtune names. :class:`HFBaseModel` reads the folder once and answers all of them, so a run
parses ``config.json`` once and every consumer derives the builder arguments the same way.

:class:`HFTokenizer` is the tokenizer of a folder that has only a Hugging Face ``tokenizer.json``
(SmolLM2, ...): torchtune's ``HuggingFaceBaseTokenizer`` with what torchtune's training and our recipes
need from a model tokenizer besides ``encode``/``decode``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

from longlora_tune._compat import import_object
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models.families import (
    HF_TOKENIZER,
    HF_TOKENIZER_FILES,
    ModelFamily,
    detect_family,
    log_assumption,
    tokenizer_files_in,
)
from longlora_tune.modules.position_interpolation import position_interpolation_factor
from longlora_tune.modules.rope_config import RopeScaling

__all__ = ["HFBaseModel", "HFTokenizer", "chat_template", "download_command"]

#: Keys every supported ``config.json`` has (a Llama-style decoder).
_REQUIRED_KEYS = (
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "intermediate_size",
)


def download_command(repo_id: Optional[str], checkpoint_dir: str | Path) -> str:
    """Return the ``tune download`` command that fills ``checkpoint_dir`` with a Hugging Face checkpoint.

    Args:
        repo_id: Hugging Face repository id (e.g. ``meta-llama/Llama-2-7b-hf``); a placeholder when None.
        checkpoint_dir: the folder the recipe reads.

    Returns:
        The command line (original ``.pth`` files are skipped: only the HF safetensors are needed).
    """
    repo = repo_id or "<hf-repo-id>"
    return f'tune download {repo} --output-dir {checkpoint_dir} --ignore-patterns "*.pth"'


def _missing(what: str, path: Path, repo_id: Optional[str], checkpoint_dir: Path) -> LongLoRAConfigError:
    return LongLoRAConfigError(
        f"{what} not found: {path}; download the base model with: {download_command(repo_id, checkpoint_dir)}"
    )


@dataclasses.dataclass(frozen=True)
class HFBaseModel:
    """A Hugging Face checkpoint folder (Llama 2/3.x, Mistral, Qwen2): config parsed, weight files listed.

    Build it with :meth:`read`. Weights are loaded only when :meth:`load_state_dict` is called.

    Attributes:
        path: the folder.
        config: the parsed ``config.json``.
        weight_files: ``*.safetensors`` files, or ``pytorch_model*.bin`` when there are none.
        repo_id: the Hugging Face repository id, used only in download hints.
    """

    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    repo_id: Optional[str] = None

    @classmethod
    def read(cls, checkpoint_dir: str | Path, *, repo_id: Optional[str] = None) -> HFBaseModel:
        """Read ``config.json`` and list the weight files of a checkpoint folder.

        Args:
            checkpoint_dir: the folder.
            repo_id: Hugging Face repository id for the download hint in error messages.

        Returns:
            The checkpoint description.

        Raises:
            LongLoRAConfigError: naming the missing file and the ``tune download`` command, or when
                ``config.json`` is unreadable, not a Llama-style config, of an unsupported ``model_type``
                or with a RoPE scaling LongLoRA cannot continue from.
        """
        ckpt = Path(checkpoint_dir).expanduser()
        path = ckpt / "config.json"
        if not path.is_file():
            raise _missing("model config", path, repo_id, ckpt)
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LongLoRAConfigError(f"cannot read {path}: {e}") from e
        if not isinstance(config, dict):
            raise LongLoRAConfigError(f"{path} is not a JSON object: not a Hugging Face config")
        absent = [k for k in _REQUIRED_KEYS if k not in config]
        if absent:
            raise LongLoRAConfigError(f"{path} lacks {', '.join(absent)}: not a Hugging Face Llama config")
        files = sorted(ckpt.glob("*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
        if not files:
            what = "model weights (*.safetensors or pytorch_model*.bin)"
            raise _missing(what, ckpt / "*.safetensors", repo_id, ckpt)
        base = cls(path=ckpt, config=config, weight_files=tuple(files), repo_id=repo_id)
        # Refuse an unsupported family or RoPE scaling at read time, not at export.
        _ = base.family
        _ = base.rope
        return base

    @functools.cached_property
    def family(self) -> ModelFamily:
        """The model family (:func:`longlora_tune.models.families.detect_family`), from ``config.json`` and
        the folder's tokenizer files.

        Raises:
            LongLoRAConfigError: for an unsupported ``model_type`` or feature.
        """
        try:
            files = tokenizer_files_in(self.path)
            return detect_family(self.config, files, source=str(Path(self.path) / "config.json"))
        except LongLoRAConfigError as e:
            raise LongLoRAConfigError(f"{self.path}: {e}") from None

    @property
    def rope(self) -> RopeScaling:
        """The checkpoint's RoPE setting (method, factor, original context, theta).

        Raises:
            LongLoRAConfigError: for a RoPE type LongLoRA cannot continue from (dynamic, longrope, ...).
        """
        try:
            return RopeScaling.from_hf_config(self.config)
        except LongLoRAConfigError as e:
            raise LongLoRAConfigError(f"{self.path}: {e}") from None

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the LM head is the token embedding (absent = False, as for every supported family)."""
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def checkpointer_model_type(self) -> str:
        """torchtune ``FullModelHFCheckpointer`` ``model_type`` (``LLAMA3_2`` for a tied Llama 3)."""
        return self.family.checkpointer_type(self.tie_word_embeddings)

    def document_end_id(self, tokenizer_eos_id: Optional[int]) -> Optional[int]:
        """The token that ends a pretraining document, when the tokenizer's EOS is not the model's.

        The base model was pretrained with documents ending in its ``config.json`` ``eos_token_id``.
        torchtune's tokenizer can name another token EOS: its Qwen2.5 tokenizer ends text with the chat
        token ``<|im_end|>``, while Qwen2.5 base models end documents with ``<|endoftext|>``. Continued
        pretraining should keep the base model's. Only families whose tokenizer does that
        (``ModelFamily.chat_eos``) are changed: elsewhere ``eos_token_id`` is the generation stop token,
        which an instruct model sets to its end-of-turn token (Llama 3 Instruct's ``<|eot_id|>``).

        Args:
            tokenizer_eos_id: the tokenizer's ``eos_id``.

        Returns:
            The config's ``eos_token_id`` (the first, when it lists several) if the family's tokenizer ends
            text with a chat token and the tokenizer's is not among them, else None.
        """
        if not self.family.chat_eos:
            return None
        ids = self.config.get("eos_token_id")
        ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else list(ids or [])
        if not ids or tokenizer_eos_id in ids:
            return None
        return int(ids[0])

    def tokenizer_config(self, **extra: Any) -> dict[str, Any]:
        """The ``tokenizer`` config section for this checkpoint, chosen from the files the folder has.

        The family's torchtune tokenizer when its files are there; otherwise, when the folder has a
        ``tokenizer.json``, :class:`HFTokenizer` over it (one line logs the choice); otherwise the family's
        (whose missing file the caller reports).

        Args:
            **extra: further tokenizer arguments (``max_seq_len``, ...).

        Returns:
            ``{"_component_": ..., "path": <folder>/<file>, ...}``, with ``special_tokens_path`` when the
            folder has the family's special-tokens file.
        """
        family = self.family
        component, names = family.tokenizer, family.tokenizer_files
        missing = [name for _, name in names if not (self.path / name).is_file()]
        if missing and (self.path / HF_TOKENIZER_FILES[0][1]).is_file():
            component, names = HF_TOKENIZER, HF_TOKENIZER_FILES
            log_assumption(
                f"{self.path}: no {', '.join(missing)} for torchtune's {family.name} tokenizer; using the "
                f"folder's {HF_TOKENIZER_FILES[0][1]} ({HF_TOKENIZER})"
            )
        files = {arg: str(self.path / name) for arg, name in names}
        special = family.special_tokens_file
        if component == family.tokenizer and special and (self.path / special).is_file():
            files["special_tokens_path"] = str(self.path / special)
        return {"_component_": component, **files, **extra}

    def model_section(self, model: Mapping[str, Any]) -> dict[str, Any]:
        """A ``model`` config section without ``_component_`` completed from this checkpoint.

        What the ``hf_checkpoint`` config leaves out: the family's LongLoRA builder and the shapes of
        :attr:`builder_kwargs` (the RoPE facts come with :meth:`training_overrides`, as for every config).

        Args:
            model: the config's section (LoRA, S² and length settings); its keys win.

        Returns:
            The section with ``_component_`` and the shape arguments.
        """
        shapes = {k: v for k, v in self.builder_kwargs.items() if k != "rope_base"}
        return {"_component_": self.family.builder, **shapes, **model}

    def builder_rope_kwargs(self) -> dict[str, Any]:
        """The RoPE facts of the checkpoint as LongLoRA builder arguments (for all four families).

        Returns:
            ``original_max_seq_len`` (``max_position_embeddings``), ``rope_base`` (theta) and
            ``checkpoint_rope_scaling`` (the ``config.json`` entry, None when unscaled).
        """
        rope = self.rope
        entry = rope.rope_entry()
        if entry is not None:
            entry = {k: v for k, v in entry.items() if k != "type"}
        return {
            "original_max_seq_len": self.original_max_seq_len,
            "rope_base": float(rope.rope_theta),
            "checkpoint_rope_scaling": entry,
        }

    def rope_kwargs_for(self, component: str) -> dict[str, Any]:
        """:meth:`builder_rope_kwargs` when the builder ``component`` takes them, else nothing.

        Every longlora_tune builder takes ``checkpoint_rope_scaling``; a user's own builder may not.

        Args:
            component: Dotted path of the model builder.

        Returns:
            The RoPE facts as builder arguments, or an empty dict.

        Raises:
            LongLoRAConfigError: If ``component`` cannot be imported.
        """
        builder = import_object(component, "model._component_")
        if "checkpoint_rope_scaling" not in inspect.signature(builder).parameters:
            return {}
        return self.builder_rope_kwargs()

    def dataset_overrides(self, dataset: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
        """Dataset builder arguments of a training run that come from this checkpoint.

        ``eos_id`` (:meth:`document_end_id`) for a builder that takes it (``packed_blocks_dataset``),
        unless the config sets it.

        Args:
            dataset: The config's ``dataset`` section (``_component_`` and builder arguments).
            tokenizer: The run's tokenizer.

        Returns:
            Keyword arguments for the dataset builder, on top of the ``dataset`` section (often none).

        Raises:
            LongLoRAConfigError: If the dataset ``_component_`` cannot be imported.
        """
        builder = import_object(dataset.get("_component_"), "dataset._component_")
        if "eos_id" in dataset or "eos_id" not in inspect.signature(builder).parameters:
            return {}
        end = self.document_end_id(getattr(tokenizer, "eos_id", None))
        return {} if end is None else {"eos_id": end}

    def training_overrides(
        self, model: Mapping[str, Any], rope_scaling: Optional[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Builder arguments of a training run that come from this checkpoint rather than the config.

        ``original_max_seq_len`` is the checkpoint's ``max_position_embeddings`` (and must agree with the
        config when set). Builders that take ``checkpoint_rope_scaling`` (every longlora_tune builder) also
        get the checkpoint's ``rope_theta`` and ``rope_scaling``, and the ``rope_scaling`` request when set.
        A checkpoint that already has a linear RoPE factor keeps it when it covers the training length and
        is replaced by ``ceil(length / original)`` otherwise (never compounded), unless the config sets
        ``rope_scaling_factor`` or ``rope_scaling``.

        Args:
            model: The config's ``model`` section (``_component_`` and builder arguments).
            rope_scaling: The config's top-level ``rope_scaling`` request, or None.

        Returns:
            Keyword arguments for the builder, on top of the ``model`` section.

        Raises:
            LongLoRAConfigError: If ``model.original_max_seq_len`` or ``model.rope_base`` contradict
                ``config.json``.
        """
        checkpoint_ctx = self.original_max_seq_len
        configured = model.get("original_max_seq_len", None)
        if configured is not None and int(configured) != checkpoint_ctx:
            raise LongLoRAConfigError(
                f"model.original_max_seq_len={configured} but {self.path}/config.json has "
                f"max_position_embeddings={checkpoint_ctx}; set model.original_max_seq_len={checkpoint_ctx}"
            )
        overrides: dict[str, Any] = {"original_max_seq_len": checkpoint_ctx}
        existing = self.rope.factor if self.rope.rope_type == "linear" else 1.0
        if existing > 1.0 and model.get("rope_scaling_factor", None) is None and rope_scaling is None:
            target = int(model.get("max_seq_len", checkpoint_ctx))
            overrides["rope_scaling_factor"] = position_interpolation_factor(target, checkpoint_ctx, existing)
        rope_facts = self.rope_kwargs_for(model["_component_"])
        configured = model.get("rope_base", None)
        if rope_facts and configured is not None and float(configured) != rope_facts["rope_base"]:
            raise LongLoRAConfigError(
                f"model.rope_base={configured} but {self.path}/config.json has rope_theta="
                f"{rope_facts['rope_base']}; remove model.rope_base"
            )
        overrides.update(rope_facts)
        if rope_scaling is not None:
            overrides["rope_scaling"] = dict(rope_scaling)
        return overrides

    @property
    def builder_kwargs(self) -> dict[str, Any]:
        """Shape arguments of the model builders (``longlora_llama2``, torchtune's ``llama2``).

        Returns:
            ``vocab_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``embed_dim``,
            ``intermediate_dim``, ``norm_eps`` and ``rope_base``; plus ``tie_word_embeddings`` for the
            families whose builders take it (Llama 3, Qwen2).
        """
        c = self.config
        kwargs = {
            "vocab_size": int(c["vocab_size"]),
            "num_layers": int(c["num_hidden_layers"]),
            "num_heads": int(c["num_attention_heads"]),
            "num_kv_heads": int(c.get("num_key_value_heads", c["num_attention_heads"])),
            "embed_dim": int(c["hidden_size"]),
            "intermediate_dim": int(c["intermediate_size"]),
            "norm_eps": float(c.get("rms_norm_eps", 1e-5)),
            # transformers 5 writes the RoPE base only inside rope_parameters: read by the one RoPE parser.
            "rope_base": self.rope.rope_theta,
        }
        if self.family.ties:
            kwargs["tie_word_embeddings"] = self.tie_word_embeddings
        return kwargs

    @property
    def head_dim(self) -> Optional[int]:
        """The explicit ``head_dim`` of the config, or None when it is ``hidden_size / heads``."""
        value = self.config.get("head_dim")
        return int(value) if value else None

    @property
    def original_max_seq_len(self) -> int:
        """The unscaled context the RoPE factor multiplies (``max_position_embeddings``, 4096 if absent)."""
        return int(self.config.get("max_position_embeddings", 4096))

    @property
    def rope_scaling_factor(self) -> float:
        """The checkpoint's own linear RoPE factor (1.0 without ``rope_scaling``); see :attr:`rope` for all.

        Raises:
            LongLoRAConfigError: for RoPE scaling other than linear.
        """
        rope = self.rope
        if rope.rope_type not in ("default", "linear"):
            raise LongLoRAConfigError(
                f"{self.path}/config.json has RoPE scaling type {rope.rope_type!r}; LongLoRA's linear "
                "interpolation continues only from unscaled or linear RoPE scaling"
            )
        return rope.factor

    def load_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """Load the weights in torchtune parameter names.

        Args:
            dtype: cast each floating tensor to this dtype while loading (halves peak memory for fp32
                files); None keeps the stored dtype.

        The family's torchtune conversion: Llama-style q/k row permutation (all but Qwen2), Qwen2's
        biases; a tied checkpoint's ``lm_head.weight``, if the files hold one, is dropped (the model's
        head is its embedding, as torchtune's ``LLAMA3_2``/``QWEN2`` checkpointers do).

        Returns:
            The state dict (``tok_embeddings.weight``, ``layers.0.attn.q_proj.weight``, ...).

        Raises:
            LongLoRAConfigError: for an untied checkpoint without ``lm_head.weight``.
        """
        from safetensors.torch import load_file

        hf_sd: dict[str, torch.Tensor] = {}
        for f in self.weight_files:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)
            for k, v in part.items():
                hf_sd[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            del part
        if self.tie_word_embeddings:
            hf_sd.pop("lm_head.weight", None)
        elif "lm_head.weight" not in hf_sd:
            raise LongLoRAConfigError(
                f"{self.path}: the weights have no lm_head.weight but config.json does not set "
                "tie_word_embeddings=true; a checkpoint whose head is its embedding must say so"
            )
        return self._convert(self.family.hf_to_tune, hf_sd)

    def to_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A torchtune state dict of this checkpoint's model in Hugging Face names (the family's conversion).

        Args:
            state_dict: the weights in torchtune names (a tied model's without ``output.weight``).

        Returns:
            The state dict in Hugging Face names (q/k rows permuted back where the family permutes them).
        """
        return self._convert(self.family.tune_to_hf, state_dict)

    def _convert(self, conversion: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one of the family's torchtune weight conversions with this checkpoint's shapes."""
        convert = import_object(conversion, "the family's weight conversion")
        kw = self.builder_kwargs
        args: dict[str, Any] = {
            "num_heads": kw["num_heads"],
            "num_kv_heads": kw["num_kv_heads"],
            "dim": kw["embed_dim"],
            "head_dim": self.head_dim,
        }
        if "tie_word_embeddings" in inspect.signature(convert).parameters:
            args["tie_word_embeddings"] = self.tie_word_embeddings
        return convert(state_dict, **args)


def chat_template(folder: str | Path) -> Optional[str]:
    """The chat template a Hugging Face folder ships, if any.

    transformers 5 writes it to ``chat_template.jinja``; older folders keep it in ``tokenizer_config.json``
    (a string, or a list of named templates of which ``default`` is the chat one).

    Args:
        folder: the checkpoint folder.

    Returns:
        The Jinja source, or None.
    """
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def _beside(path: Path, name: str, given: Optional[str]) -> Optional[str]:
    if given is not None:
        return str(given)
    sibling = path.parent / name
    return str(sibling) if sibling.is_file() else None


class HFTokenizer(HuggingFaceBaseTokenizer):
    """A Hugging Face ``tokenizer.json`` as a torchtune model tokenizer (training, evaluation, generation).

    torchtune 0.6.1's ``HuggingFaceBaseTokenizer`` only encodes and decodes. This adds what the recipes
    read from a model tokenizer: ``max_seq_len``, ``pad_id``, ``vocab_size``, ``special_tokens``,
    ``stop_tokens`` (``generation_config.json``'s EOS ids with the tokenizer's), and ``tokenize_messages``
    rendered by the checkpoint's own chat template (for ``dataset.template: chat`` and ``generate``).
    ``encode`` is exact: BOS and EOS exactly when asked, never the ones a ``tokenizer.json``
    post-processor adds (Llama 3's adds BOS, which torchtune's class keeps even with ``add_bos=False``).

    Args:
        path: the ``tokenizer.json``.
        tokenizer_config_path: ``tokenizer_config.json`` (BOS, EOS and pad tokens); None: the one beside
            ``path``, if any.
        generation_config_path: ``generation_config.json`` (BOS/EOS ids when the tokenizer config has none,
            the stop tokens); None: the one beside ``path``, if any.
        chat_template_path: a Jinja chat template file; None: the folder's (:func:`chat_template`).
        max_seq_len: ``tokenize_messages`` truncates to it (None: no truncation), as torchtune's do.

    Raises:
        LongLoRAConfigError: for a missing ``tokenizer.json``, neither config file, or BOS/EOS tokens
            neither names.
    """

    def __init__(
        self,
        path: str,
        *,
        tokenizer_config_path: Optional[str] = None,
        generation_config_path: Optional[str] = None,
        chat_template_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
    ) -> None:
        file = Path(path)
        if not file.is_file():
            raise LongLoRAConfigError(f"tokenizer file not found: {file}")
        tokenizer_config_path = _beside(file, "tokenizer_config.json", tokenizer_config_path)
        generation_config_path = _beside(file, "generation_config.json", generation_config_path)
        try:
            super().__init__(
                str(file),
                tokenizer_config_json_path=tokenizer_config_path,
                generation_config_path=generation_config_path,
            )
        except ValueError as e:
            raise LongLoRAConfigError(
                f"{file}: {e} (tokenizer_config.json: {tokenizer_config_path}, generation_config.json: "
                f"{generation_config_path}); a Hugging Face tokenizer needs one of them to name BOS and EOS"
            ) from None
        self.max_seq_len = max_seq_len
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special
        }
        generation = self.generation_config or {}
        pad = (self.config or {}).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        # Padding positions are never attended nor scored (labels -100): any id does, 0 as torchtune's.
        self.pad_id = pad_id if pad_id is not None else generation.get("pad_token_id") or 0
        stops = generation.get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        self.stop_tokens = sorted({self.eos_id, *stops})
        if chat_template_path is not None:
            self.chat_template: Optional[str] = Path(chat_template_path).read_text()
        else:
            self.chat_template = chat_template(file.parent)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS and EOS exactly when asked.

        Args:
            text: the text.
            add_bos: start with the BOS id.
            add_eos: end with the EOS id.

        Returns:
            The ids.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``.

        Args:
            token_ids: the ids.
            skip_special_tokens: leave special tokens out (Hugging Face's default).

        Returns:
            The text.
        """
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _compiled_chat_template(self) -> Any:
        # Hugging Face renders chat templates with these Jinja settings (trim_blocks, lstrip_blocks, a
        # sandbox, raise_exception); jinja2 comes with torch. Compiled per call, not kept: the tokenizer
        # stays picklable for the tokenizing worker processes.
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Tokens and loss mask of a conversation in the checkpoint's chat template.

        Each message's tokens are what the template adds for it (an assistant turn's header, the
        template's generation prompt, separately), masked as the message says. Without end tokens a last
        assistant message is left open: the generation prompt and its text, nothing after.

        Args:
            messages: the conversation.
            add_end_tokens: close the last turn as the template does.

        Returns:
            ``(tokens, mask)``; True in the mask = not trained on.

        Raises:
            ValueError: when the folder has no chat template, or the template renders a conversation
                other than as its turns one after another.
        """
        if not self.chat_template:
            raise ValueError(
                "the checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)"
            )
        template = self._compiled_chat_template()
        special = {
            "bos_token": self.tokenizer.id_to_token(self.bos_id),
            "eos_token": self.tokenizer.id_to_token(self.eos_id),
        }

        def render(turns: list[dict[str, str]], add_generation_prompt: bool) -> str:
            return template.render(messages=turns, add_generation_prompt=add_generation_prompt, **special)

        turns = [{"role": m.role, "content": m.text_content} for m in messages]
        tokens: list[int] = []
        mask: list[bool] = []
        rendered = ""
        for i, message in enumerate(messages):
            pieces = []
            if message.role == "assistant":
                # The generation prompt is a piece of its own, so a prompt ends exactly at it.
                pieces.append(render(turns[:i], add_generation_prompt=True))
            if not add_end_tokens and i == len(messages) - 1 and message.role == "assistant":
                pieces.append(pieces[-1] + turns[i]["content"])
            else:
                pieces.append(render(turns[: i + 1], add_generation_prompt=False))
            for text in pieces:
                if not text.startswith(rendered):
                    raise ValueError(
                        "the chat template does not render the conversation as its turns one after another"
                    )
                ids = self.tokenizer.encode(text[len(rendered) :], add_special_tokens=False).ids
                tokens.extend(ids)
                mask.extend([message.masked] * len(ids))
                rendered = text
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask
