"""Tiny random checkpoints (Llama 2, Llama 3, Mistral, Qwen2.5), tokenizers and datasets, made on the spot.

The tests and the CPU quick start need a model, a tokenizer and data without downloading anything.
Everything here is generated deterministically from a seed in a second or two, in the same formats the
real artefacts use (a SentencePiece ``tokenizer.model``, a Hugging Face Llama ``config.json`` +
``model.safetensors``, JSON lines text, a LongAlpaca-style JSON file), so the code under test is the
code that reads real checkpoints and datasets.

Chat-format tokenizers of other families, in their released formats: :func:`make_llama3_tokenizer`
(tiktoken BPE), :func:`make_qwen2_5_tokenizer` (``vocab.json`` + ``merges.txt``),
:func:`make_mistral_tokenizer` (SentencePiece) and :func:`make_hf_tokenizer` (a Hugging Face
``tokenizer.json`` with its ``tokenizer_config.json`` and ChatML ``chat_template.jinja``, as SmolLM2 ships;
``split_digits=True`` splits digits one by one as SmolLM2's pre-tokenizer does, for the passkey tests of a
space token before a number).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from longlora_tune.models.families import DEFAULT_FAMILY, FAMILIES, TinyFacts

# A small closed vocabulary with some structure (subject-verb-object sentences), so a tiny model's loss
# visibly falls within a few dozen steps.
_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the river", "a small bird", "the teacher"]
_VERBS = ["sees", "follows", "remembers", "finds", "carries", "likes", "watches"]
_OBJECTS = ["the red ball", "a green apple", "the long road", "a quiet house", "the blue sky", "an old book"]
_ENDINGS = ["today", "at night", "in the morning", "again", "near the sea", "with care"]


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
    ).capitalize()


def make_documents(
    n_docs: int, *, seed: int = 0, min_sentences: int = 5, max_sentences: int = 40
) -> list[str]:
    """Make ``n_docs`` synthetic English-like documents.

    Args:
        n_docs: number of documents.
        seed: random seed.
        min_sentences: fewest sentences per document.
        max_sentences: most sentences per document.

    Returns:
        The documents.
    """
    rng = random.Random(seed)
    return [
        " ".join(_sentence(rng) for _ in range(rng.randint(min_sentences, max_sentences)))
        for _ in range(n_docs)
    ]


def make_tokenizer(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a tiny SentencePiece BPE tokenizer with Llama 2's special ids (unk 0, bos 1, eos 2).

    Byte fallback is on, so any text (digits, brackets of chat templates, unicode) encodes.

    Args:
        out_dir: folder to write ``tokenizer.model`` into (created if missing).
        vocab_size: vocabulary size; at least 300 because byte fallback needs 256 pieces.
        seed: seed of the training corpus.

    Returns:
        Path of the written ``tokenizer.model``.

    Raises:
        ValueError: if ``vocab_size`` is too small for byte fallback.
    """
    return _train_sentencepiece(out_dir, vocab_size=vocab_size, seed=seed)


def _train_sentencepiece(
    out_dir: str | Path, *, vocab_size: int, seed: int, extra: Optional[dict[str, Any]] = None
) -> Path:
    """Train and write a SentencePiece BPE ``tokenizer.model`` (unk 0, bos 1, eos 2, byte fallback)."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs at least 300")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = make_documents(200, seed=seed)
    corpus += ["[INST] <<SYS>> <</SYS>> [/INST] The pass key is 12345. What is the pass key?"] * 5
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
        **(extra or {}),
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def make_mistral_tokenizer(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a tiny Mistral-style SentencePiece ``tokenizer.model`` for ``mistral_tokenizer``.

    The special ids are Mistral 7B's (unk 0, bos 1, eos 2), with byte fallback, and unlike
    :func:`make_tokenizer` the normalizer is the one Mistral's (and Llama 2's) released model uses:
    ``identity`` with whitespace kept, so newlines and repeated spaces survive a round trip (as byte
    pieces) instead of being folded into one space. ``[INST]``/``[/INST]`` are plain text, as torchtune's
    ``MistralChatTemplate`` writes them.

    Args:
        out_dir: folder to write ``tokenizer.model`` into (created if missing).
        vocab_size: vocabulary size; at least 300 because byte fallback needs 256 pieces.
        seed: seed of the training corpus.

    Returns:
        Path of the written ``tokenizer.model`` (pass it to
        ``torchtune.models.mistral.mistral_tokenizer(path)``).

    Raises:
        ValueError: if ``vocab_size`` is too small for byte fallback.
    """
    return _train_sentencepiece(
        out_dir,
        vocab_size=vocab_size,
        seed=seed,
        extra={"normalization_rule_name": "identity", "remove_extra_whitespaces": False},
    )


def _bpe_corpus(seed: int) -> list[str]:
    """Training text for the byte-level BPE writers.

    Besides the synthetic documents and chat-template words it holds every two-letter word once, so there
    are always enough (rare, hence late) merges to fill a vocabulary of a requested size up to about 1000.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus = make_documents(200, seed=seed)
    corpus += ["system user assistant The pass key is 12345. What is the pass key?"] * 5
    corpus.append(" ".join(a + b for a in letters for b in letters))
    return corpus


def _train_byte_bpe(
    corpus: list[str], pattern: str, vocab_size: int
) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE: the vocabulary in rank order (the 256 single bytes first) and the merges.

    Words (the pre-tokenizer ``pattern``'s matches) are never merged across; each step merges the most
    frequent adjacent pair (ties broken by the pair's bytes, so the result is deterministic). A merge whose
    result is already a token (reached before from other halves) is kept but adds no token.
    """
    import regex

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE has 256 byte tokens")
    counts: dict[tuple[bytes, ...], int] = {}
    for text in corpus:
        for word in regex.findall(pattern, text):
            key = tuple(bytes([b]) for b in word.encode("utf-8"))
            counts[key] = counts.get(key, 0) + 1
    vocab = [bytes([b]) for b in range(256)]
    known = set(vocab)
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab) < vocab_size:
        pairs: dict[tuple[bytes, bytes], int] = {}
        for word, n in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            raise ValueError(
                f"vocab_size={vocab_size} is too large for the tiny corpus ({len(vocab)} at most)"
            )
        first, second = max(pairs, key=lambda p: (pairs[p], p))
        merged_counts: dict[tuple[bytes, ...], int] = {}
        for word, n in counts.items():
            merged: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            merged_counts[tuple(merged)] = merged_counts.get(tuple(merged), 0) + n
        counts = merged_counts
        merges.append((first, second))
        if first + second not in known:
            known.add(first + second)
            vocab.append(first + second)
    return vocab, merges


def _write_special_tokens_json(path: Path, special_tokens: dict[str, int], offset: int) -> None:
    """Write ``{"added_tokens": [{"id", "content"}, ...]}`` (the part of a Hugging Face ``tokenizer.json``
    torchtune's ``special_tokens_path`` reads), with every id moved by ``offset``."""
    added = [
        {"id": i + offset, "content": token, "special": True}
        for token, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
    ]
    path.write_text(json.dumps({"added_tokens": added}, indent=1))


def make_llama3_tokenizer(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a tiny Llama 3 tiktoken BPE (``tokenizer.model``) for ``llama3_tokenizer``.

    The file has Meta's format (one ``base64(token bytes) rank`` line per token), with ranks 0-255 the
    single bytes and then ``vocab_size - 256`` merges learnt with Llama 3's pre-tokenizer pattern, so any
    text encodes. Llama 3's special tokens are not in the file: ``llama3_tokenizer(path)`` adds torchtune's
    canonical ones at their real ids (``<|begin_of_text|>`` = 128000, ``<|eot_id|>`` = 128009, ...; its
    ``vocab_size`` is then 128257). For a tiny model, the folder also gets ``special_tokens.json`` with the
    same tokens moved down to follow the BPE (id ``vocab_size + real id - 128000``):
    ``llama3_tokenizer(path, special_tokens_path=<folder>/special_tokens.json)`` then has
    ``vocab_size + 257`` ids.

    Args:
        out_dir: folder to write ``tokenizer.model`` and ``special_tokens.json`` into (created if missing).
        vocab_size: number of BPE tokens (bytes and merges), 257 to about 1000.
        seed: seed of the training corpus.

    Returns:
        Path of the written ``tokenizer.model``.

    Raises:
        ValueError: if ``vocab_size`` is out of range.
    """
    import base64

    from torchtune.models.llama3._tokenizer import CL100K_PATTERN, LLAMA3_SPECIAL_TOKENS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, _ = _train_byte_bpe(_bpe_corpus(seed), CL100K_PATTERN, vocab_size)
    path = out / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(vocab)))
    first_special = min(LLAMA3_SPECIAL_TOKENS.values())
    _write_special_tokens_json(out / "special_tokens.json", LLAMA3_SPECIAL_TOKENS, vocab_size - first_special)
    return path


def make_qwen2_5_tokenizer(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """Train a tiny Qwen2.5 byte-level BPE (``vocab.json`` + ``merges.txt``) for ``qwen2_5_tokenizer``.

    The files have the Hugging Face GPT-2 format Qwen2.5 ships: byte-to-unicode mapped tokens, ids 0-255
    the single bytes, then ``vocab_size - 256`` merges learnt with Qwen2's pre-tokenizer pattern (digits
    split one by one). Qwen2.5's special tokens are not in ``vocab.json``:
    ``qwen2_5_tokenizer(vocab, merges)`` adds torchtune's canonical ones at their real ids
    (``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645, ...). For a tiny model,
    the folder also gets ``special_tokens.json`` with the same tokens moved down to follow the BPE (id
    ``vocab_size + real id - 151643``), for ``qwen2_5_tokenizer(..., special_tokens_path=...)``.

    Args:
        out_dir: folder to write ``vocab.json``, ``merges.txt`` and ``special_tokens.json`` into (created
            if missing).
        vocab_size: number of BPE tokens (bytes and merges), 257 to about 1000.
        seed: seed of the training corpus.

    Returns:
        Paths of the written ``vocab.json`` and ``merges.txt``.

    Raises:
        ValueError: if ``vocab_size`` is out of range.
    """
    from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX, bytes_to_unicode
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_byte_bpe(_bpe_corpus(seed), PRETOKENIZE_REGEX, vocab_size)
    to_unicode = bytes_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(to_unicode[b] for b in tok)

    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps({text(tok): i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text(
        "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges), encoding="utf-8"
    )
    first_special = min(QWEN2_5_SPECIAL_TOKENS.values())
    _write_special_tokens_json(
        out / "special_tokens.json", QWEN2_5_SPECIAL_TOKENS, vocab_size - first_special
    )
    return vocab_path, merges_path


#: GPT-2's pre-tokenizer pattern, what a Hugging Face ``ByteLevel(use_regex=True)`` pre-tokenizer splits on.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: The same after SmolLM2's ``Digits(individual_digits=True)`` split: every digit alone, no space before it.
_GPT2_DIGITS_PATTERN = _GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}")
#: The special tokens of :func:`make_hf_tokenizer`, after the BPE (SmolLM2's names).
HF_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: ChatML with SmolLM2's default system turn, as its ``chat_template.jinja`` reads.
_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_hf_tokenizer(
    out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0, split_digits: bool = False
) -> Path:
    """Train a tiny byte-level BPE and write it as a Hugging Face folder's tokenizer files (SmolLM2's).

    ``tokenizer.json`` (GPT-2 byte-level BPE, ids 0-255 the single bytes, then ``vocab_size - 256``
    merges, then :data:`HF_SPECIAL_TOKENS`), ``tokenizer_config.json`` (BOS ``<|im_start|>``, EOS and pad
    ``<|im_end|>``, as SmolLM2-Instruct) and ``chat_template.jinja`` (ChatML): what a checkpoint of the
    ``hf_llama`` family has and :class:`longlora_tune.hf.base.HFTokenizer` reads (torchtune's
    ``HuggingFaceBaseTokenizer`` too, given ``tokenizer_config.json``).

    Args:
        out_dir: folder to write into (created if missing).
        vocab_size: number of BPE tokens (bytes and merges), 257 to about 1000; the tokenizer has 3 more.
        seed: seed of the training corpus.
        split_digits: split digits one by one before the byte-level pre-tokenizer, as SmolLM2's
            ``tokenizer.json`` does, so a space before a number is a token of its own (``Ġ``): for the
            passkey tests of that space.

    Returns:
        Path of the written ``tokenizer.json``.

    Raises:
        ValueError: if ``vocab_size`` is out of range.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from torchtune.models.qwen2._tokenizer import bytes_to_unicode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = _GPT2_DIGITS_PATTERN if split_digits else _GPT2_PATTERN
    vocab, merges = _train_byte_bpe(_bpe_corpus(seed), pattern, vocab_size)
    to_unicode = bytes_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(to_unicode[b] for b in tok)

    bpe = models.BPE(
        vocab={text(t): i for i, t in enumerate(vocab)}, merges=[(text(a), text(b)) for a, b in merges]
    )
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HF_SPECIAL_TOKENS])
    path = out / "tokenizer.json"
    tokenizer.save(str(path))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "chat_template.jinja").write_text(_CHATML)
    return path


def hf_llama_config(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_position_embeddings: int,
    rope_theta: float = 10_000.0,
    norm_eps: float = 1e-5,
    rope_scaling: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Return a Hugging Face ``LlamaForCausalLM`` ``config.json`` dict.

    Args:
        vocab_size: vocabulary size.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA when fewer than ``num_heads``).
        embed_dim: hidden size.
        intermediate_dim: MLP hidden size.
        max_position_embeddings: the model's original context length.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        rope_scaling: optional ``{"type": "linear", "factor": f}``.

    Returns:
        The config dict.
    """
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": embed_dim,
        "intermediate_size": intermediate_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": embed_dim // num_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": norm_eps,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if rope_scaling is not None:
        config["rope_scaling"] = dict(rope_scaling)
    return config


def _llama3_special_tokens() -> dict[str, int]:
    from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS

    return dict(LLAMA3_SPECIAL_TOKENS)


def _qwen2_5_special_tokens() -> dict[str, int]:
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    return dict(QWEN2_5_SPECIAL_TOKENS)


def _hf_special_tokens() -> dict[str, int]:
    return {token: i for i, token in enumerate(HF_SPECIAL_TOKENS)}


@dataclasses.dataclass(frozen=True)
class _TokenizerFormat:
    """A tiny tokenizer file format (:attr:`longlora_tune.models.families.TinyFacts.tokenizer_format`).

    ``write(folder, vocab_size, seed)`` writes the files; a byte-level format's special tokens (at the
    released model's ids, which the tiny tokenizer moves to follow the BPE) and the tokens its base model
    names BOS and EOS; a SentencePiece format has bos 1, eos 2 inside its vocabulary.
    """

    write: Callable[..., Any]
    special_tokens: Optional[Callable[[], dict[str, int]]] = None
    bos: Optional[str] = None
    eos: Optional[str] = None


#: The tiny tokenizer formats by name.
TOKENIZER_FORMATS: dict[str, _TokenizerFormat] = {
    "sentencepiece": _TokenizerFormat(make_tokenizer),
    "sentencepiece_identity": _TokenizerFormat(make_mistral_tokenizer),
    "tiktoken": _TokenizerFormat(
        make_llama3_tokenizer, _llama3_special_tokens, "<|begin_of_text|>", "<|end_of_text|>"
    ),
    # Qwen2.5 base models name <|endoftext|> for both.
    "gpt2_bpe": _TokenizerFormat(
        make_qwen2_5_tokenizer, _qwen2_5_special_tokens, "<|endoftext|>", "<|endoftext|>"
    ),
    "tokenizer_json": _TokenizerFormat(make_hf_tokenizer, _hf_special_tokens, "<|im_start|>", "<|im_end|>"),
}

#: BPE (or SentencePiece) tokens of the tiny tokenizers; the byte-level families add their special ids.
_TINY_BPE = 512

#: The families :func:`make_hf_checkpoint` writes (those whose record has tiny facts).
TINY_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.tiny is not None)


def _tiny(family: str) -> tuple[TinyFacts, _TokenizerFormat]:
    """The family's tiny facts and tokenizer format; ValueError for a family without them."""
    record = FAMILIES.get(family)
    if record is None or record.tiny is None:
        tiny = [name for name, f in FAMILIES.items() if f.tiny is not None]
        raise ValueError(f"family={family!r}: use one of {', '.join(tiny)}")
    return record.tiny, TOKENIZER_FORMATS[record.tiny.tokenizer_format]


def _special_id_span(fmt: _TokenizerFormat) -> int:
    """How many ids the format's special tokens take after the BPE (0 for SentencePiece)."""
    if fmt.special_tokens is None:
        return 0
    ids = fmt.special_tokens().values()
    return max(ids) - min(ids) + 1


def tiny_vocab_size(family: str = DEFAULT_FAMILY) -> int:
    """The default ``vocab_size`` of :func:`make_hf_checkpoint` for a family (what its tiny configs use).

    512 SentencePiece tokens (Llama 2, Mistral), or 512 byte-level BPE tokens followed by the format's
    special tokens moved down to follow them (257 ids for Llama 3's tiktoken, 22 for Qwen2.5's, 3 for a
    ``tokenizer.json``).

    Args:
        family: a :data:`TINY_FAMILIES` name.

    Returns:
        The model's vocabulary size.

    Raises:
        ValueError: for another family.
    """
    return _TINY_BPE + _special_id_span(_tiny(family)[1])


def default_rope_scaling(family: str, max_position_embeddings: int) -> Optional[dict[str, Any]]:
    """The RoPE scaling entry a tiny checkpoint of ``family`` has by default.

    The family record's (:attr:`~longlora_tune.models.families.TinyFacts.rope_scaling`): Llama 3 is
    written as Llama 3.1+ is released, Meta's ``llama3`` scaling with factor 4 over a quarter of
    ``max_position_embeddings``, so the demo extends an already-scaled model. The others are unscaled.

    Args:
        family: a :data:`TINY_FAMILIES` name.
        max_position_embeddings: the checkpoint's context length.

    Returns:
        The ``config.json`` ``rope_scaling`` entry, or None.

    Raises:
        ValueError: for another family.
    """
    facts = _tiny(family)[0]
    return None if facts.rope_scaling is None else facts.rope_scaling(max_position_embeddings)


def hf_family_config(
    family: str,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_position_embeddings: int,
    rope_theta: float,
    norm_eps: float,
    rope_scaling: Optional[dict[str, Any]],
    tie_word_embeddings: bool,
    bos_token_id: int,
    eos_token_id: int,
) -> dict[str, Any]:
    """Return a Hugging Face ``config.json`` dict of a family, with the keys its released configs have.

    :func:`hf_llama_config`'s keys with the family's ``model_type`` and architecture, edited by its
    record's :attr:`~longlora_tune.models.families.TinyFacts.release_keys` (Mistral (v0.3 style) has
    ``sliding_window: null``; Qwen2.5 has ``use_sliding_window: false`` with ``sliding_window`` and
    ``max_window_layers`` as released; neither has ``attention_bias``/``mlp_bias``).

    Args:
        family: a :data:`TINY_FAMILIES` name.
        vocab_size: vocabulary size.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        embed_dim: hidden size.
        intermediate_dim: MLP hidden size.
        max_position_embeddings: the model's context length.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        rope_scaling: the ``rope_scaling`` entry, or None.
        tie_word_embeddings: the LM head is the token embedding.
        bos_token_id: beginning-of-sequence id.
        eos_token_id: end-of-sequence id.

    Returns:
        The config dict.

    Raises:
        ValueError: for another family.
    """
    facts = _tiny(family)[0]
    record = FAMILIES[family]
    config = hf_llama_config(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        norm_eps=norm_eps,
        rope_scaling=rope_scaling,
    )
    config.update(
        architectures=[record.hf_architecture],
        model_type=record.hf_model_type,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    if facts.release_keys is not None:
        facts.release_keys(config)
    return config


def _token_ids(fmt: _TokenizerFormat, vocab_size: int) -> dict[str, int]:
    """``bos_token_id``/``eos_token_id`` of the released base model's tokens, in the tiny tokenizer's ids."""
    if fmt.special_tokens is None:
        return {"bos_token_id": 1, "eos_token_id": 2}
    special = fmt.special_tokens()
    offset = vocab_size - _special_id_span(fmt) - min(special.values())
    return {"bos_token_id": special[fmt.bos] + offset, "eos_token_id": special[fmt.eos] + offset}


def make_family_tokenizer(
    family: str, out_dir: str | Path, *, vocab_size: Optional[int] = None, seed: int = 0
) -> Path:
    """Write a family's tiny tokenizer into a checkpoint folder, where its tokenizer component reads it.

    The record's tokenizer format (:attr:`~longlora_tune.models.families.TinyFacts.tokenizer_format`), in
    the folder of the family's main tokenizer file (Meta's tiktoken file in ``original/`` of a Hugging Face
    Llama 3 folder).

    Args:
        family: a :data:`TINY_FAMILIES` name.
        out_dir: the checkpoint folder (created if missing).
        vocab_size: the model's vocabulary size, special tokens included (None: :func:`tiny_vocab_size`).
        seed: seed of the training corpus.

    Returns:
        Path of the family's main tokenizer file.

    Raises:
        ValueError: for another family or a vocabulary too small for the format.
    """
    fmt = _tiny(family)[1]
    vocab_size = tiny_vocab_size(family) if vocab_size is None else vocab_size
    main = Path(out_dir) / FAMILIES[family].tokenizer_files[0][1]
    fmt.write(main.parent, vocab_size=vocab_size - _special_id_span(fmt), seed=seed)
    return main


def make_hf_checkpoint(
    out_dir: str | Path,
    *,
    family: str = DEFAULT_FAMILY,
    vocab_size: Optional[int] = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: Optional[int] = None,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_position_embeddings: int = 64,
    rope_scaling: Optional[dict[str, Any]] = None,
    rope_theta: Optional[float] = None,
    tie_word_embeddings: Optional[bool] = None,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Write a random checkpoint of a model family in Hugging Face format.

    The folder holds ``config.json`` (the family's released keys: ``model_type``, ``architectures``,
    ``rope_theta``, ``rope_scaling``, ...), ``model.safetensors`` (Hugging Face parameter names; Qwen2's
    q/k/v biases; no ``lm_head.weight`` when tied) and, by default, the family's tokenizer files where
    ``tune download`` puts them: ``tokenizer.model`` (Llama 2, Mistral: SentencePiece),
    ``original/tokenizer.model`` + ``original/special_tokens.json`` (Llama 3: tiktoken), ``vocab.json`` +
    ``merges.txt`` + ``special_tokens.json`` (Qwen2.5). ``bos_token_id``/``eos_token_id`` are the tiny
    tokenizer's ids of the tokens the released base model names. Llama 2's folder is the same, byte for
    byte, whatever the family defaults are.

    Args:
        out_dir: folder to write into (created if missing).
        family: a :data:`TINY_FAMILIES` name: ``llama2`` (default), ``llama3`` (3.1 style, see
            :func:`default_rope_scaling`), ``hf_llama`` (SmolLM2 style: ``tokenizer.json``, tied),
            ``mistral`` or ``qwen2`` (Qwen2.5); the family record's tiny facts give the defaults below.
        vocab_size: vocabulary size (None: :func:`tiny_vocab_size`); for the byte-level formats it includes
            the special tokens, so the BPE has ``vocab_size`` minus 257 (Llama 3), 22 (Qwen2.5) or 3
            (``tokenizer.json``) tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (None: the family's, 4 for Llama 2, 2 (GQA) for the others).
        embed_dim: hidden size.
        intermediate_dim: MLP hidden size.
        max_position_embeddings: the context length written to config.json.
        rope_scaling: the ``rope_scaling`` entry for config.json; None gives the family's default
            (:func:`default_rope_scaling`), ``{}`` none at all.
        rope_theta: RoPE base (None: the family's: 10000 for Llama 2, 500000 for Llama 3, 1e5 for
            ``hf_llama``, 1e6 for Mistral and Qwen2.5).
        tie_word_embeddings: LM head = token embedding (None: the family's: true for Qwen2.5, as its
            0.5B-3B models, and ``hf_llama``, as SmolLM2).
        seed: weight seed.
        with_tokenizer: also train and write the tokenizer files.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: for an unknown family, head counts that do not divide the sizes, or a vocabulary too
            small for the tokenizer.
    """
    import torch
    from safetensors.torch import save_file

    facts, fmt = _tiny(family)
    vocab_size = tiny_vocab_size(family) if vocab_size is None else vocab_size
    num_kv_heads = facts.num_kv_heads if num_kv_heads is None else num_kv_heads
    rope_theta = facts.rope_theta if rope_theta is None else rope_theta
    tied = facts.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    if rope_scaling is None:
        rope_scaling = default_rope_scaling(family, max_position_embeddings)
    if embed_dim % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    if vocab_size - _special_id_span(fmt) < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small for a tiny {family} tokenizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = embed_dim // num_heads
    gen = torch.Generator().manual_seed(seed)
    biases = FAMILIES[family].qkv_bias

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    def norm() -> torch.Tensor:
        # Not exactly one, so a test that mixes up norms cannot pass by accident.
        return 1.0 + 0.1 * torch.randn(embed_dim, generator=gen)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab_size, embed_dim)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rand(num_heads * head_dim, embed_dim)
        sd[p + "self_attn.k_proj.weight"] = rand(num_kv_heads * head_dim, embed_dim)
        sd[p + "self_attn.v_proj.weight"] = rand(num_kv_heads * head_dim, embed_dim)
        sd[p + "self_attn.o_proj.weight"] = rand(embed_dim, num_heads * head_dim)
        sd[p + "mlp.gate_proj.weight"] = rand(intermediate_dim, embed_dim)
        sd[p + "mlp.up_proj.weight"] = rand(intermediate_dim, embed_dim)
        sd[p + "mlp.down_proj.weight"] = rand(embed_dim, intermediate_dim)
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
        if biases:
            # Drawn after the layer's other tensors, so the families without biases draw the same numbers.
            for name, rows in (("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads)):
                sd[p + f"self_attn.{name}_proj.bias"] = 2 * rand(rows * head_dim)
    sd["model.norm.weight"] = norm()
    if not tied:
        sd["lm_head.weight"] = rand(vocab_size, embed_dim)
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )

    config = hf_family_config(
        family,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        norm_eps=facts.norm_eps,
        rope_scaling=rope_scaling or None,
        tie_word_embeddings=tied,
        **_token_ids(fmt, vocab_size),
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if with_tokenizer:
        make_family_tokenizer(family, out, vocab_size=vocab_size, seed=seed)
    return out


def make_text_corpus(path: str | Path, *, n_docs: int = 64, seed: int = 0) -> Path:
    """Write a JSON-lines corpus of ``{"text": ...}`` records (the RedPajama layout).

    Args:
        path: output file (``.jsonl``).
        n_docs: number of documents.
        seed: random seed.

    Returns:
        The written path.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for doc in make_documents(n_docs, seed=seed):
            f.write(json.dumps({"text": doc}) + "\n")
    return out


def make_longalpaca_json(
    path: str | Path, *, n: int = 16, seed: int = 0, min_sentences: int = 5, max_sentences: int = 60
) -> Path:
    """Write a LongAlpaca-format JSON list: ``instruction`` (document + question), ``output``, ``input``.

    The answer is recoverable from the document (it repeats the document's first sentence), so a model can
    learn the task and tests can check that answers survive truncation.

    Args:
        path: output file (``.json``).
        n: number of records.
        seed: random seed.
        min_sentences: fewest sentences in a record's document.
        max_sentences: most sentences in a record's document.

    Returns:
        The written path.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = make_documents(n, seed=seed, min_sentences=min_sentences, max_sentences=max_sentences)
    records = []
    for doc in docs:
        first = doc.split(". ")[0].rstrip(".") + "."
        records.append(
            {
                "instruction": f"Below is a story.\n{doc}\nWhat is the first sentence of the story?",
                "input": "",
                "output": f"The first sentence is: {first}",
            }
        )
    out.write_text(json.dumps(records, indent=1))
    return out
