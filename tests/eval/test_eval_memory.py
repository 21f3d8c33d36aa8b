"""Eval lengths that do not fit one GPU end in one line naming the length and the fix (not a traceback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.eval.model_loading import load_eval_model
from longlora_tune.eval.passkey import build_prompts, evaluate_passkey
from longlora_tune.eval.perplexity import evaluate_perplexity


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.62 GiB")


def test_perplexity_out_of_memory_is_one_line(tiny_ckpt: Path, monkeypatch) -> None:
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=256, training_length=256)
    monkeypatch.setattr(model, "forward", _out_of_memory)
    stream = np.arange(1000) % 500
    with pytest.raises(LongLoRAConfigError) as e:
        evaluate_perplexity(model, stream, [128], stride=256, max_windows=1, progress=False)
    assert str(e.value) == (
        "evaluating 128 tokens ran out of device memory: the eval recipes run each sequence on one GPU with "
        "full attention (no context parallelism); lower eval_lengths or raise logits_chunks, or use a GPU "
        "with more memory"
    )


def test_passkey_out_of_memory_is_one_line(tiny_ckpt: Path, tiny_tokenizer, monkeypatch) -> None:
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=320, training_length=320)
    monkeypatch.setattr(model, "forward", _out_of_memory)
    prompts = build_prompts(tiny_tokenizer, [160], num_trials=1)
    with pytest.raises(
        LongLoRAConfigError, match=r"^evaluating \d+ tokens ran out of device memory: .*lower "
    ):
        evaluate_passkey(model, tiny_tokenizer, [160], prompts, prefill_chunk_size=64, progress=False)
