"""The model families LongLoRA trains, and how a Hugging Face checkpoint folder picks one.

One table, read by the training recipe, the evaluation loader and the exports (through
:class:`longlora_tune.hf.base.HFBaseModel`), so the three can never disagree about a checkpoint:

============  ================  ==================  =================  ==================================
family        config.json       LongLoRA builder    checkpointer type  tokenizer (files)
============  ================  ==================  =================  ==================================
``llama2``    ``llama``         ``longlora_llama2``  ``LLAMA2``         ``llama2_tokenizer``
                                                                        (``tokenizer.model``)
``llama3``    ``llama``         ``longlora_llama3``  ``LLAMA3``         ``llama3_tokenizer``
                                                     (``LLAMA3_2`` tied) (``original/tokenizer.model``)
``hf_llama``  ``llama``         ``longlora_llama3``  ``LLAMA3``         ``longlora_tune.hf.base.HFTokenizer``
                                                     (``LLAMA3_2`` tied) (``tokenizer.json``)
``mistral``   ``mistral``       ``longlora_mistral`` ``MISTRAL``        ``mistral_tokenizer``
                                                                        (``tokenizer.model``)
``qwen2``     ``qwen2``         ``longlora_qwen2``   ``QWEN2``          ``qwen2_5_tokenizer``
                                                                        (``vocab.json``, ``merges.txt``)
============  ================  ==================  =================  ==================================

Three families share ``model_type: llama`` and the architecture. **Llama 3** is recognised from
``config.json`` alone when it says so exactly: Meta's ``llama3`` RoPE scaling (3.1+) or Llama 3's
128256-token tiktoken vocabulary. Otherwise the tokenizer files of the folder decide, in this order:
``original/tokenizer.model`` (Meta's tiktoken file where a Hugging Face Llama 3 folder keeps it) is
**Llama 3**; ``tokenizer.model`` (SentencePiece) is **Llama 2** (the LongLoRA paper's models, TinyLlama and
other SentencePiece Llamas); only ``tokenizer.json`` is **hf_llama**, any other Llama-architecture model
(SmolLM2, ...) with a Hugging Face tokenizer, any RoPE base and tied or untied embeddings, built like
Llama 3 (torchtune's ``llama3_2`` components take ``tie_word_embeddings``; the RoPE base and scaling come
from ``config.json``). When neither decides (a folder without tokenizer files, or a config read without
its folder), the old rule is the fallback, logged once as an assumption: Llama 3 when
``rope_theta >= 500000`` or ``vocab_size >= 128000``, Llama 2 otherwise.

The record is the only place that knows a family: everything else (the checkpoint reader, the weight
conversion both ways, the exports, the evaluation loader, ``generate``, the tiny checkpoints and the demo)
reads its :class:`ModelFamily`. A new Llama-architecture family is one :data:`FAMILIES` entry, its builder
module and its published shapes (:mod:`longlora_tune.models.shapes`).

Pure Python (no torch import at module level), so the planner and config checks can read it cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Optional

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.rope_config import hf_rope_entries, hf_rope_theta, hf_rope_type

__all__ = [
    "DEFAULT_FAMILY",
    "family_of_shape",
    "sized_shape_name",
    "FAMILIES",
    "HF_TOKENIZER",
    "HF_TOKENIZER_FILES",
    "ModelFamily",
    "TinyFacts",
    "detect_family",
    "family_of_builder",
    "log_assumption",
    "tokenizer_files_in",
    "trusted_builder",
]

log = logging.getLogger(__name__)

#: torchtune's ``HuggingFaceBaseTokenizer`` as a model tokenizer (``tokenizer.json``, with the
#: ``tokenizer_config.json``, ``generation_config.json`` and chat template beside it): the ``hf_llama``
#: family's tokenizer, and any family's when its own files are missing but ``tokenizer.json`` is there.
HF_TOKENIZER = "longlora_tune.hf.base.HFTokenizer"
HF_TOKENIZER_FILES: tuple[tuple[str, str], ...] = (("path", "tokenizer.json"),)


@dataclasses.dataclass(frozen=True)
class TinyFacts:
    """How :func:`longlora_tune.quickstart.tiny.make_hf_checkpoint` writes a tiny checkpoint of a family.

    Attributes:
        tokenizer_format: The tiny tokenizer's file format, one of
            :data:`longlora_tune.quickstart.tiny.TOKENIZER_FORMATS` (``sentencepiece``,
            ``sentencepiece_identity``, ``tiktoken``, ``gpt2_bpe``, ``tokenizer_json``); its files go where
            :attr:`ModelFamily.tokenizer_files` says the family's tokenizer reads them.
        num_kv_heads: Key/value heads (GQA when fewer than the tiny model's 4 query heads).
        rope_theta: The family's RoPE base.
        tie_word_embeddings: The LM head is the token embedding, as in the family's small models.
        norm_eps: RMSNorm epsilon.
        rope_scaling: ``max_position_embeddings -> config.json rope_scaling`` entry, for a family whose
            released checkpoints are scaled already (Llama 3.1); None: unscaled.
        release_keys: Edits a Llama-style ``config.json`` dict in place into the keys the family's
            released configs have (Mistral's ``sliding_window: null``, ...); None: Llama's as they are.
        demo: The quick-start demo trains it (with the ``tiny_demo_<family>`` and
            ``tiny_longalpaca_<family>`` configs; the default family's are ``tiny_demo``/``tiny_longalpaca``).
    """

    tokenizer_format: str
    num_kv_heads: int
    rope_theta: float
    tie_word_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_scaling: Optional[Callable[[int], dict[str, Any]]] = None
    release_keys: Optional[Callable[[dict[str, Any]], None]] = None
    demo: bool = False


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What LongLoRA needs to know about one model family.

    Attributes:
        name: ``llama2``, ``llama3``, ``hf_llama``, ``mistral`` or ``qwen2``.
        hf_model_type: ``config.json`` ``model_type``.
        builder: Dotted path of the LongLoRA component builder (takes every shape), as configs name it
            (``longlora_tune.models.<builder>``, exported from :attr:`builder_module`).
        builder_module: The :mod:`longlora_tune.models` submodule that defines the builders.
        sized_builders: The sized builders (published shapes,
            :data:`~longlora_tune.models.shapes.MODEL_SHAPES`) the module defines beside the component
            builder; :mod:`longlora_tune.models` exports them all.
        base_builder: Dotted path of torchtune's plain (non-LoRA) component builder, for merged checkpoints.
        checkpointer_model_type: torchtune ``FullModelHFCheckpointer`` ``model_type`` (untied).
        tied_checkpointer_model_type: The same for checkpoints with ``tie_word_embeddings``, or None when
            the family never ties.
        tokenizer: Dotted path of torchtune's tokenizer builder.
        tokenizer_files: Tokenizer builder argument -> file in the checkpoint folder.
        special_tokens_file: A file in the checkpoint folder that, when present, the tokenizer builder reads
            as ``special_tokens_path`` (special tokens at other ids than the released model's, as in the
            tiny test checkpoints); released checkpoints have none and get torchtune's defaults.
        chat_eos: torchtune's tokenizer names the chat end-of-turn token EOS (Qwen2.5's ``<|im_end|>``) where
            the base model ends documents with another (``config.json`` ``eos_token_id``); packed
            pretraining then takes the latter (:meth:`longlora_tune.hf.base.HFBaseModel.document_end_id`).
        default_rope_type: How an unscaled checkpoint is extended when the config does not say (a scaled
            one keeps its own method).
        qk_permuted: torchtune's Hugging Face conversion permutes q/k rows into interleaved RoPE pairs (all
            but Qwen2, whose RoPE rotates head halves as Hugging Face does).
        qkv_bias: q/k/v projections have biases.
        ties: The builder takes ``tie_word_embeddings`` (a tied checkpoint of another family is refused).
        download_repo: The Hugging Face repository named in download hints when a config names none
            (None: a placeholder; only Llama 2 has one model every config of the family fits).
        label: What the family is called in messages and the demo (``Llama 2``, ``Qwen2.5-style``, ...).
        hf_architecture: ``config.json`` ``architectures[0]``, the transformers class that loads an export.
        hf_to_tune: Dotted path of torchtune's Hugging Face -> torchtune weight conversion
            (``state_dict, num_heads, num_kv_heads, dim, head_dim`` and, where it takes it,
            ``tie_word_embeddings``).
        tune_to_hf: The conversion back, with the same arguments.
        tokenizer_kwargs: Fixed arguments of :attr:`tokenizer` (Llama 2's ``prompt_template: null``: our
            templates render its prompts).
        own_template: A prompt format of our own that stands in for a chat format the family's tokenizer
            lacks (Llama 2: LongLoRA's ``llama2_chat``, ``[INST]...[/INST]``); ``generate`` defaults to it
            and refuses ``--template chat``. None: the tokenizer's chat format (``chat``).
        linear_rope_path: Evaluation of an unscaled or linearly scaled checkpoint takes LongLoRA's linear
            position-interpolation path (the paper's factor rule over :attr:`base_builder`) rather than
            the general RoPE setting; Llama 2 only, the paper's models.
        config_marks: ``config.json`` fields alone say the family exactly, among those of its
            ``model_type`` (Llama 3: the ``llama3`` RoPE type or the 128256-token vocabulary); None: its
            tokenizer files decide (see the module docstring).
        tiny: How a tiny random checkpoint of the family is written, or None when it has none.
    """

    name: str
    hf_model_type: str
    builder: str
    builder_module: str
    sized_builders: tuple[str, ...]
    base_builder: str
    checkpointer_model_type: str
    tied_checkpointer_model_type: Optional[str]
    tokenizer: str
    tokenizer_files: tuple[tuple[str, str], ...]
    special_tokens_file: Optional[str] = None
    chat_eos: bool = False
    default_rope_type: str = "linear"
    qk_permuted: bool = True
    qkv_bias: bool = False
    ties: bool = False
    download_repo: Optional[str] = None
    label: str = ""
    hf_architecture: str = "LlamaForCausalLM"
    hf_to_tune: str = "torchtune.models.convert_weights.hf_to_tune"
    tune_to_hf: str = "torchtune.models.convert_weights.tune_to_hf"
    tokenizer_kwargs: tuple[tuple[str, Any], ...] = ()
    own_template: Optional[str] = None
    linear_rope_path: bool = False
    config_marks: Optional[Callable[[Mapping[str, Any]], bool]] = None
    tiny: Optional[TinyFacts] = None

    def checkpointer_type(self, tie_word_embeddings: bool) -> str:
        """torchtune's checkpointer ``model_type`` for a checkpoint (``LLAMA3_2`` for tied Llama 3).

        Args:
            tie_word_embeddings: the checkpoint's ``tie_word_embeddings``.

        Returns:
            The model type string.
        """
        if tie_word_embeddings and self.tied_checkpointer_model_type:
            return self.tied_checkpointer_model_type
        return self.checkpointer_model_type


def _says_llama3(config: Mapping[str, Any]) -> bool:
    """``config.json`` states Llama 3 exactly: the ``llama3`` RoPE type or the 128256-token vocabulary."""
    try:
        llama3_rope = any(hf_rope_type(entry) == "llama3" for _, entry in hf_rope_entries(config))
    except LongLoRAConfigError:
        llama3_rope = False  # refused with its reason when the folder's RoPE is read
    return llama3_rope or int(config.get("vocab_size", 0)) == 128_256


def _llama3_1_rope(max_position_embeddings: int) -> dict[str, Any]:
    """Meta's ``llama3`` scaling as Llama 3.1+ is released, for a tiny context: factor 4 over a quarter of
    it (3.1 has factor 8 over 8192 in 131072; 4 keeps the tiny original context a multiple of the S2
    group), so the demo extends an already-scaled model."""
    return {
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": max_position_embeddings // 4,
        "rope_type": "llama3",
    }


def _without_bias_keys(config: dict[str, Any]) -> None:
    # Neither Mistral's nor Qwen2's release has these (no bias switch; Qwen2's q/k/v always have one).
    for key in ("attention_bias", "mlp_bias"):
        config.pop(key)


def _mistral_release_keys(config: dict[str, Any]) -> None:
    _without_bias_keys(config)
    config["sliding_window"] = None  # v0.2+: full attention over the whole context


def _qwen2_release_keys(config: dict[str, Any]) -> None:
    _without_bias_keys(config)
    config.update(
        sliding_window=config["max_position_embeddings"],
        max_window_layers=config["num_hidden_layers"],
        use_sliding_window=False,
    )


#: The family a config or command means when it names none (the LongLoRA paper's models).
DEFAULT_FAMILY = "llama2"

#: The supported families, by name.
FAMILIES: dict[str, ModelFamily] = {
    "llama2": ModelFamily(
        name="llama2",
        hf_model_type="llama",
        builder="longlora_tune.models.longlora_llama2",
        builder_module="llama2",
        sized_builders=("longlora_llama2_7b", "longlora_llama2_13b", "longlora_llama2_70b"),
        base_builder="torchtune.models.llama2.llama2",
        checkpointer_model_type="LLAMA2",
        tied_checkpointer_model_type=None,
        tokenizer="torchtune.models.llama2.llama2_tokenizer",
        tokenizer_files=(("path", "tokenizer.model"),),
        download_repo="meta-llama/Llama-2-7b-hf",
        label="Llama 2",
        tokenizer_kwargs=(("prompt_template", None),),
        own_template="llama2_chat",
        linear_rope_path=True,
        tiny=TinyFacts("sentencepiece", num_kv_heads=4, rope_theta=10_000.0, demo=True),
    ),
    "llama3": ModelFamily(
        name="llama3",
        hf_model_type="llama",
        builder="longlora_tune.models.longlora_llama3",
        builder_module="llama3",
        sized_builders=(
            "longlora_llama3_8b",
            "longlora_llama3_1_8b",
            "longlora_llama3_1_70b",
            "longlora_llama3_2_1b",
            "longlora_llama3_2_3b",
            "longlora_llama3_3_70b",
        ),
        # llama3_2 is the one torchtune Llama 3 builder with tie_word_embeddings; its RoPE is replaced.
        base_builder="torchtune.models.llama3_2.llama3_2",
        checkpointer_model_type="LLAMA3",
        tied_checkpointer_model_type="LLAMA3_2",
        tokenizer="torchtune.models.llama3.llama3_tokenizer",
        tokenizer_files=(("path", "original/tokenizer.model"),),
        special_tokens_file="original/special_tokens.json",
        ties=True,
        config_marks=_says_llama3,
        label="Llama 3.1-style",
        tiny=TinyFacts(
            "tiktoken", num_kv_heads=2, rope_theta=500_000.0, rope_scaling=_llama3_1_rope, demo=True
        ),
    ),
    # Any other Llama-architecture checkpoint (SmolLM2, ...): Llama 3's builders, which take any RoPE base
    # and tie_word_embeddings, and the folder's own Hugging Face tokenizer.
    "hf_llama": ModelFamily(
        name="hf_llama",
        hf_model_type="llama",
        builder="longlora_tune.models.longlora_llama3",
        builder_module="llama3",
        sized_builders=(),
        base_builder="torchtune.models.llama3_2.llama3_2",
        checkpointer_model_type="LLAMA3",
        tied_checkpointer_model_type="LLAMA3_2",
        tokenizer=HF_TOKENIZER,
        tokenizer_files=HF_TOKENIZER_FILES,
        ties=True,
        label="Llama-architecture (tokenizer.json)",
        # SmolLM2-style: RoPE base 1e5, tied embeddings, a ChatML tokenizer.json.
        tiny=TinyFacts("tokenizer_json", num_kv_heads=2, rope_theta=100_000.0, tie_word_embeddings=True),
    ),
    "mistral": ModelFamily(
        name="mistral",
        hf_model_type="mistral",
        builder="longlora_tune.models.longlora_mistral",
        builder_module="mistral",
        sized_builders=("longlora_mistral_7b",),
        base_builder="torchtune.models.mistral.mistral",
        checkpointer_model_type="MISTRAL",
        tied_checkpointer_model_type=None,
        tokenizer="torchtune.models.mistral.mistral_tokenizer",
        tokenizer_files=(("path", "tokenizer.model"),),
        label="Mistral",
        hf_architecture="MistralForCausalLM",
        tiny=TinyFacts(
            "sentencepiece_identity",
            num_kv_heads=2,
            rope_theta=1_000_000.0,
            release_keys=_mistral_release_keys,
            demo=True,
        ),
    ),
    "qwen2": ModelFamily(
        name="qwen2",
        hf_model_type="qwen2",
        builder="longlora_tune.models.longlora_qwen2",
        builder_module="qwen2",
        sized_builders=tuple(
            f"longlora_qwen2_5_{size}" for size in ("0_5b", "1_5b", "3b", "7b", "14b", "32b", "72b")
        ),
        base_builder="torchtune.models.qwen2.qwen2",
        checkpointer_model_type="QWEN2",
        tied_checkpointer_model_type="QWEN2",  # torchtune's QWEN2 conversion reads tie_word_embeddings
        tokenizer="torchtune.models.qwen2_5.qwen2_5_tokenizer",
        tokenizer_files=(("path", "vocab.json"), ("merges_file", "merges.txt")),
        special_tokens_file="special_tokens.json",
        chat_eos=True,
        default_rope_type="yarn",  # Qwen2.5's own long-context method
        qk_permuted=False,
        qkv_bias=True,
        ties=True,
        label="Qwen2.5-style",
        hf_architecture="Qwen2ForCausalLM",
        hf_to_tune="torchtune.models.qwen2.qwen2_hf_to_tune",
        tune_to_hf="torchtune.models.qwen2.qwen2_tune_to_hf",
        tiny=TinyFacts(
            "gpt2_bpe",
            num_kv_heads=2,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
            norm_eps=1e-6,
            release_keys=_qwen2_release_keys,
            demo=True,
        ),
    ),
}

_SUPPORTED = (
    "llama (Llama 2, Llama 3/3.1/3.2/3.3, other Llama-architecture models with a tokenizer.json), "
    "mistral (Mistral 7B v0.2+), qwen2 (Qwen2/Qwen2.5)"
)


def _llama_by_tokenizer_file() -> list[ModelFamily]:
    """The ``model_type: llama`` families in the order their main tokenizer file decides (the first one
    present): a file in a subfolder (Llama 3's ``original/tokenizer.model``) before one at the root, and the
    generic ``tokenizer.json`` last, as a Llama 2 or Llama 3 folder has one too."""
    llamas = [f for f in FAMILIES.values() if f.hf_model_type == "llama"]
    return sorted(llamas, key=lambda f: (f.tokenizer == HF_TOKENIZER, -f.tokenizer_files[0][1].count("/")))


def tokenizer_files_in(folder: str | Path) -> list[str]:
    """The tokenizer files of a checkpoint folder that tell the ``model_type: llama`` families apart.

    Args:
        folder: the checkpoint folder.

    Returns:
        Those of ``original/tokenizer.model``, ``tokenizer.model`` and ``tokenizer.json`` that exist.
    """
    names = dict.fromkeys(f.tokenizer_files[0][1] for f in _llama_by_tokenizer_file())
    return [name for name in names if (Path(folder) / name).is_file()]


def _guess_llama3(config: Mapping[str, Any]) -> bool:
    """The fallback when nothing exact decides: Llama 3's RoPE base or a Llama 3-sized vocabulary."""
    return float(hf_rope_theta(config)) >= 500_000 or int(config.get("vocab_size", 0)) >= 128_000


@functools.cache
def log_assumption(message: str) -> None:
    """Log an assumption about a checkpoint once per process (its folder is read by the checks, the recipe
    and the exports alike).

    Args:
        message: the one line.
    """
    log.warning(message)


def _llama_family(config: Mapping[str, Any], files: Optional[Collection[str]], source: str) -> ModelFamily:
    """Which ``model_type: llama`` family a config (and its folder's tokenizer files) is."""
    exact = [f for f in FAMILIES.values() if f.hf_model_type == "llama" and f.config_marks is not None]
    for family in exact:
        if family.config_marks(config):
            return family
    present = set(files or ())
    for family in _llama_by_tokenizer_file():
        if family.tokenizer_files[0][1] in present:
            return family
    name = "llama3" if _guess_llama3(config) else "llama2"
    why = "rope_theta >= 500000 or vocab_size >= 128000" if name == "llama3" else "rope_theta < 500000"
    where = "no tokenizer file decides" if files is not None else "its folder was not read"
    log_assumption(
        f"{source}: model_type llama names no Llama generation and {where} (original/tokenizer.model: "
        f"Llama 3, tokenizer.model: Llama 2, tokenizer.json: hf_llama); assuming {FAMILIES[name].name} "
        f"({why})"
    )
    return FAMILIES[name]


def detect_family(
    config: Mapping[str, Any], files: Optional[Collection[str]] = None, *, source: str = "config.json"
) -> ModelFamily:
    """The family of a Hugging Face ``config.json`` (see the module docstring for the ``llama`` rule).

    A config without ``model_type`` is read as ``llama`` (early Llama 2 conversions omit it). Checks
    what LongLoRA's models cannot reproduce: sliding-window attention, biases outside Qwen2's q/k/v, a
    ``head_dim`` other than ``hidden_size / num_attention_heads``, and tied embeddings in a family whose
    builder never ties.

    Args:
        config: the parsed ``config.json``.
        files: the folder's tokenizer files (:func:`tokenizer_files_in`); None when the folder is unknown.
        source: what the config is, for the one-line log of an assumption (the ``config.json`` path).

    Returns:
        The family.

    Raises:
        LongLoRAConfigError: for an unsupported ``model_type`` (listing the supported ones) or feature.
    """
    model_type = config.get("model_type", "llama")
    if model_type == "llama":
        family = _llama_family(config, files, source)
    else:
        family = next((f for f in FAMILIES.values() if f.hf_model_type == model_type), None)
        if family is None:
            raise LongLoRAConfigError(
                f"config.json model_type={model_type!r} is not supported; LongLoRA supports {_SUPPORTED}"
            )
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", model_type == "mistral")
    if window and uses_window and int(window) < int(config.get("max_position_embeddings", 0) or 0):
        raise LongLoRAConfigError(
            f"config.json has sliding_window={window}; LongLoRA trains full/S2 attention, which differs "
            "from a sliding window: use a checkpoint without one (e.g. Mistral-7B-v0.3)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise LongLoRAConfigError(
                f"config.json has {key}=true; torchtune's {family.name} has no such biases"
            )
    if config.get("tie_word_embeddings") and not family.ties:
        raise LongLoRAConfigError(
            f"config.json has tie_word_embeddings=true but torchtune's {family.name} builder has a separate "
            "LM head; a tied checkpoint of this family cannot be loaded"
        )
    head_dim = config.get("head_dim")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if head_dim and heads and hidden and int(head_dim) * int(heads) != int(hidden):
        raise LongLoRAConfigError(
            f"config.json head_dim={head_dim} is not hidden_size/num_attention_heads={hidden}/{heads}; "
            f"torchtune's {family.name} builder cannot express it"
        )
    return family


def sized_shape_name(family: ModelFamily, builder: str) -> str:
    """The :data:`~longlora_tune.models.shapes.MODEL_SHAPES` name of a family's sized builder.

    ``longlora_<name>`` builds ``<name>`` (``longlora_qwen2_5_7b`` builds ``qwen2_5_7b``); Llama 2's shapes
    are named by size alone (``longlora_llama2_7b`` builds ``7b``).

    Args:
        family: The family.
        builder: One of its :attr:`ModelFamily.sized_builders`.

    Returns:
        The shape name.
    """
    from longlora_tune.models.shapes import MODEL_SHAPES

    name = builder.removeprefix("longlora_")
    return name if name in MODEL_SHAPES else name.removeprefix(f"{family.name}_")


def family_of_shape(name: str) -> Optional[ModelFamily]:
    """The family whose sized builder builds the published shape ``name`` (:func:`sized_shape_name`).

    Args:
        name: A :data:`~longlora_tune.models.shapes.MODEL_SHAPES` name.

    Returns:
        The family, or None when no sized builder builds it.
    """
    for family in FAMILIES.values():
        if any(sized_shape_name(family, b) == name for b in family.sized_builders):
            return family
    return None


def family_of_builder(component: str) -> Optional[ModelFamily]:
    """The family whose LongLoRA builders a ``model._component_`` names (component or sized builder).

    ``hf_llama`` builds with Llama 3's builders: their components map to ``llama3``, the same architecture.

    Args:
        component: e.g. ``longlora_tune.models.longlora_qwen2_5_7b``.

    Returns:
        The family, or None for a builder outside :mod:`longlora_tune.models`.
    """
    if not str(component).startswith("longlora_tune.models."):
        return None
    name = str(component).rsplit(".", 1)[-1]
    for family in FAMILIES.values():
        short = family.builder.rsplit(".", 1)[-1]
        if name == short or name.startswith(short + "_"):
            return family
    return None


def trusted_builder(component: Any, where: str) -> Any:
    """The LongLoRA builder a file from a checkpoint or adapter folder names, if it is one of ours.

    A folder from someone else is data: its ``_component_`` may only name a builder that
    :mod:`longlora_tune.models` exports, never an arbitrary callable (``torch.hub.load`` with a local
    ``hubconf.py`` would run code shipped in the folder).

    Args:
        component: the recorded dotted path, e.g. ``longlora_tune.models.longlora_llama2``.
        where: the file and key, for the message.

    Returns:
        The builder function.

    Raises:
        LongLoRAConfigError: if the path is not one of the library's model builders.
    """
    from longlora_tune import models

    prefix = "longlora_tune.models."
    name = component[len(prefix) :] if isinstance(component, str) and component.startswith(prefix) else None
    if name is None or name not in models.__all__ or name == "apply_longlora":
        raise LongLoRAConfigError(
            f"{where}={component!r} is not a longlora_tune model builder; refusing to load a folder that "
            f"names other code (expected {prefix}<builder>, e.g. {FAMILIES['llama2'].builder})"
        )
    return getattr(models, name)
