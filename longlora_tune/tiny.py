"""Tiny random Llama 2 checkpoints, tokenizers and datasets, made on the spot.

The tests and the CPU quick start need a model, a tokenizer and data without downloading anything.
Everything here is generated deterministically from a seed in a second or two, in the same formats the
real artefacts use (a SentencePiece ``tokenizer.model``, a Hugging Face Llama ``config.json`` +
``model.safetensors``, JSON lines text, a LongAlpaca-style JSON file), so the code under test is the
code that reads real checkpoints and datasets.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Optional

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
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
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


def make_hf_checkpoint(
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_position_embeddings: int = 64,
    rope_scaling: Optional[dict[str, Any]] = None,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Write a random Llama-2-shaped checkpoint in Hugging Face format.

    The folder holds ``config.json``, ``model.safetensors`` (Hugging Face parameter names) and, by default,
    a matching ``tokenizer.model``: the layout ``tune download meta-llama/Llama-2-7b-hf`` produces.

    Args:
        out_dir: folder to write into (created if missing).
        vocab_size: vocabulary size (must match the tokenizer when ``with_tokenizer``).
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        embed_dim: hidden size.
        intermediate_dim: MLP hidden size.
        max_position_embeddings: the original context length written to config.json.
        rope_scaling: optional existing RoPE scaling entry for config.json.
        seed: weight seed.
        with_tokenizer: also train and write ``tokenizer.model``.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: if the head counts do not divide the sizes.
    """
    import torch
    from safetensors.torch import save_file

    if embed_dim % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = embed_dim // num_heads
    gen = torch.Generator().manual_seed(seed)

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
    sd["model.norm.weight"] = norm()
    sd["lm_head.weight"] = rand(vocab_size, embed_dim)
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )

    config = hf_llama_config(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_position_embeddings=max_position_embeddings,
        rope_scaling=rope_scaling,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if with_tokenizer:
        make_tokenizer(out, vocab_size=vocab_size, seed=seed)
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
