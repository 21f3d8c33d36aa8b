"""LongAlpaca supervised fine-tuning data (long-document question answering).

Records have ``instruction`` (document + question), ``output`` and an optional ``input``. A sample is
``tokens = encode(prompt, BOS) + encode(output, EOS)`` with ``labels = -100`` on every prompt token
(BOS included), so the loss covers the answer and its EOS only. Prompt and answer are encoded separately
(as torchtune encodes messages): the answer's tokens are then exactly ``encode(output)`` whatever the
prompt ends with, which is also how the model sees its own answer when it generates after the prompt.

Templates (LongLoRA ``supervised-fine-tune.py`` since 2023-11-19, ``llama2_chat``, the released models')
    empty ``input``:     ``[INST]{instruction}[/INST]``
    non-empty ``input``: ``[INST] <<SYS>>\\n{system}\\n<</SYS>> \\n\\n {instruction} \\n{input} [/INST]``
    with ``{system}`` the Llama 2 chat default system prompt (:data:`LLAMA2_DEFAULT_SYSTEM_PROMPT`).
    ``alpaca`` is the Stanford Alpaca prompt.

Over-long samples
    Cutting the sequence at ``max_seq_len`` from the right (what torchtune does) can remove the whole
    answer, leaving a sample whose labels are all ignored. Instead, ``truncation="left"`` removes tokens from
    the start of the instruction (the document), keeping the template, the question at the instruction's
    end, the ``input`` and the whole answer; a sample is skipped when even that cannot fit (the answer plus
    the template leave no room for any instruction token). ``truncation="skip"`` drops every over-long
    sample. The dataset exposes ``num_trimmed`` and ``num_skipped`` and logs them.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.utils import log_rank_zero

from longlora_tune.data._load import LONGALPACA_12K, DataFiles
from longlora_tune.data.checks import (
    LONGALPACA_FIELDS,
    RecordFieldError,
    diagnose_local_files,
    field_problem,
    read_records,
)
from longlora_tune.errors import LongLoRAConfigError

log = logging.getLogger(__name__)

# Llama 2 chat's default system prompt, quoted verbatim from Meta's Llama 2 release (also in transformers'
# Llama tokenizer and torchtune's Llama2ChatTemplate docs). Two paragraphs separated by one blank line.
LLAMA2_DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false "
    "information."
)

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

TEMPLATES = ("llama2_chat", "alpaca")
TRUNCATIONS = ("left", "skip")


def longalpaca_prompt(instruction: str, input: str = "", template: str = "llama2_chat") -> str:
    """Render the prompt of a LongAlpaca record (training and inference use the same text).

    Args:
        instruction: the instruction (for LongAlpaca, the document followed by the question).
        input: optional extra input; empty selects the short template.
        template: ``llama2_chat`` (LongLoRA's released models) or ``alpaca``.

    Returns:
        The prompt string, without BOS.

    Raises:
        ValueError: for an unknown template.
    """
    if template == "llama2_chat":
        if not input:
            return f"[INST]{instruction}[/INST]"
        return (
            f"[INST] <<SYS>>\n{LLAMA2_DEFAULT_SYSTEM_PROMPT}\n<</SYS>> \n\n {instruction} \n{input} [/INST]"
        )
    if template == "alpaca":
        if not input:
            return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    raise ValueError(f"template={template!r} is not one of {TEMPLATES}")


class LongAlpacaDataset(Dataset):
    """Tokenized LongAlpaca samples; ``{"tokens", "labels"}`` with the prompt masked.

    Args:
        tokenizer: torchtune ``llama2_tokenizer(path, prompt_template=None)``.
        records: sequence of mappings with ``instruction``, ``output`` and optionally ``input``.
        template: see :func:`longalpaca_prompt`.
        max_seq_len: longest sample in tokens.
        truncation: ``left`` or ``skip`` (see the module docstring).

    Attributes:
        num_trimmed: samples whose instruction was shortened to fit.
        num_skipped: samples dropped because they did not fit.

    Raises:
        LongLoRAConfigError: for invalid arguments or no sample left.
        RecordFieldError: for a record without string ``instruction``/``output`` (or a non-string ``input``).
    """

    def __init__(
        self, tokenizer: Any, records: Any, *, template: str, max_seq_len: int, truncation: str
    ) -> None:
        if template not in TEMPLATES:
            raise LongLoRAConfigError(f"dataset.template={template!r} is not one of {TEMPLATES}")
        if truncation not in TRUNCATIONS:
            raise LongLoRAConfigError(f"dataset.truncation={truncation!r} is not one of {TRUNCATIONS}")
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise LongLoRAConfigError(f"dataset.max_seq_len={max_seq_len!r} must be an integer >= 2")
        self._tokenizer = tokenizer
        self.template = template
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.num_trimmed = 0
        self.num_skipped = 0
        # Long samples as Python int lists would take ~36 bytes a token on every rank; int32 arrays take 4.
        self._tokens: list[np.ndarray] = []
        self._prompt_lens: list[int] = []
        for i, record in enumerate(records):
            problem = field_problem(record, LONGALPACA_FIELDS)
            if problem is not None:
                raise RecordFieldError(f"record {i}: {problem}; {LONGALPACA_FIELDS.hint}", i)
            prompt_ids, answer_ids = self._encode(
                record["instruction"], record.get("input") or "", record["output"]
            )
            if prompt_ids is None:
                self.num_skipped += 1
                continue
            self._tokens.append(np.asarray(prompt_ids + answer_ids, dtype=np.int32))
            self._prompt_lens.append(len(prompt_ids))
        del self._tokenizer
        if not self._tokens:
            raise LongLoRAConfigError(
                f"no LongAlpaca sample fits max_seq_len={max_seq_len} ({self.num_skipped} skipped): "
                "raise dataset.max_seq_len"
                + (" or set dataset.truncation=left" if truncation == "skip" else "")
            )
        log_rank_zero(
            log,
            f"LongAlpaca: {len(self._tokens)} samples, {self.num_trimmed} trimmed from the left, "
            f"{self.num_skipped} skipped as longer than {max_seq_len} tokens",
        )

    def _encode_prompt(self, instruction: str, input: str) -> list[int]:
        text = longalpaca_prompt(instruction, input, self.template)
        return self._tokenizer.encode(text, add_bos=True, add_eos=False)

    def _encode(self, instruction: str, input: str, output: str) -> tuple[Optional[list[int]], list[int]]:
        """Prompt and answer ids, the prompt trimmed to fit; prompt ``None`` when the sample is skipped."""
        tok = self._tokenizer
        answer_ids = tok.encode(output, add_bos=False, add_eos=True)
        prompt_ids = self._encode_prompt(instruction, input)
        excess = len(prompt_ids) + len(answer_ids) - self.max_seq_len
        if excess <= 0:
            return prompt_ids, answer_ids
        if self.truncation == "skip":
            return None, answer_ids
        # Drop leading instruction tokens, re-render and re-encode (SentencePiece merges across the cut can
        # change the count by a token or two), and repeat until the prompt fits beside the answer.
        instruction_ids = tok.encode(instruction, add_bos=False, add_eos=False)
        drop = excess
        while drop < len(instruction_ids):
            prompt_ids = self._encode_prompt(tok.decode(instruction_ids[drop:]), input)
            excess = len(prompt_ids) + len(answer_ids) - self.max_seq_len
            if excess <= 0:
                self.num_trimmed += 1
                return prompt_ids, answer_ids
            drop += excess
        return None, answer_ids

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        tokens = self._tokens[index].tolist()
        n_prompt = self._prompt_lens[index]
        labels = [CROSS_ENTROPY_IGNORE_IDX] * n_prompt + tokens[n_prompt:]
        return {"tokens": tokens, "labels": labels}


def longalpaca_dataset(
    tokenizer: Any,
    *,
    max_seq_len: int,
    source: str = LONGALPACA_12K,
    data_files: DataFiles = None,
    split: str = "train",
    revision: Optional[str] = None,
    template: str = "llama2_chat",
    truncation: str = "left",
    packed: bool = False,
) -> Dataset:
    """LongAlpaca SFT dataset (``Yukang/LongAlpaca-12k`` by default, or local JSON/JSONL files).

    Args:
        tokenizer: torchtune ``llama2_tokenizer(path, prompt_template=None)``.
        max_seq_len: longest sample in tokens (the training context length).
        source: hub id, a packaged builder (``json``, ...) with ``data_files``, or a local dataset folder.
        data_files: local or ``hf://`` path(s).
        split: split to read.
        revision: hub revision.
        template: ``llama2_chat`` (default) or ``alpaca``; see :func:`longalpaca_prompt`.
        truncation: ``left`` trims the instruction's start to fit, ``skip`` drops over-long samples.
        packed: pack samples into ``max_seq_len`` rows with torchtune's ``PackedDataset`` (use the
            ``padded_collate_packed`` collate; see :mod:`longlora_tune.data.collate`).

    Returns:
        A :class:`LongAlpacaDataset`, or a ``PackedDataset`` over it when ``packed``.

    Raises:
        LongLoRAConfigError: (one line naming the file, line and fix) for invalid arguments, missing or
            unreadable files, records without string ``instruction``/``output``, or no sample that fits.
    """
    records = read_records(
        source, data_files=data_files, split=split, revision=revision, fields=LONGALPACA_FIELDS
    )
    try:
        ds = LongAlpacaDataset(
            tokenizer, records, template=template, max_seq_len=max_seq_len, truncation=truncation
        )
    except RecordFieldError as e:
        # The loaded records no longer know their file and line: find the record in the files.
        diagnose_local_files(source, data_files, split, LONGALPACA_FIELDS)
        raise LongLoRAConfigError(f"dataset.source={source}: {e}") from e
    if not packed:
        return ds
    from torchtune.datasets import PackedDataset

    return PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=tokenizer.pad_id)
