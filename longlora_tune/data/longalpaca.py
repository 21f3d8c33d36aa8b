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
    ``chat``: the tokenizer's own chat template (Llama 3, Qwen2.5, Mistral, ...): the record becomes the
    conversation ``[system (optional), user, assistant]`` with the user turn ``{instruction}`` or
    ``{instruction}\\n{input}`` and the answer as the assistant turn, tokenized by the torchtune model
    tokenizer's ``tokenize_messages`` (see :mod:`longlora_tune.data.chat_format`). The loss covers the
    answer and its end-of-turn/EOS token as that template writes them; the assistant header is prompt.
    Llama 2 keeps ``llama2_chat``, the exact LongLoRA prompt.

Over-long samples
    Cutting the sequence at ``max_seq_len`` from the right (what torchtune does) can remove the whole
    answer, leaving a sample whose labels are all ignored. Instead, ``truncation="left"`` removes tokens from
    the start of the instruction (the document), keeping the template, the question at the instruction's
    end, the ``input`` and the whole answer; a sample is skipped when even that cannot fit (the answer plus
    the template leave no room for any instruction token). ``truncation="skip"`` drops every over-long
    sample. The dataset exposes ``num_trimmed`` and ``num_skipped`` and logs them.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.utils import log_rank_zero

from longlora_tune.data._load import LONGALPACA_12K, DataFiles
from longlora_tune.data.chat_format import ChatFormat
from longlora_tune.data.sources import (
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

TEMPLATES = ("llama2_chat", "alpaca", "chat")
# The templates longalpaca_prompt renders as text (``chat`` prompts are made by the tokenizer).
TEXT_TEMPLATES = ("llama2_chat", "alpaca")
TRUNCATIONS = ("left", "skip")


def longalpaca_prompt(instruction: str, input: str = "", template: str = "llama2_chat") -> str:
    """Render the prompt of a LongAlpaca record (training and inference use the same text).

    Args:
        instruction: the instruction (for LongAlpaca, the document followed by the question).
        input: optional extra input; empty selects the short template.
        template: ``llama2_chat`` (LongLoRA's released models) or ``alpaca``. (``chat`` prompts are token
            ids made by the tokenizer: :class:`~longlora_tune.data.chat_format.ChatFormat`.)

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
    raise ValueError(f"template={template!r} is not one of {TEXT_TEMPLATES}")


def chat_user_text(instruction: str, input: str = "") -> str:
    """The user turn of a LongAlpaca record in the ``chat`` template.

    Args:
        instruction: the instruction (document and question).
        input: optional extra input, put on its own line after the instruction.

    Returns:
        ``instruction``, or ``instruction + "\\n" + input`` when ``input`` is not empty.
    """
    return f"{instruction}\n{input}" if input else instruction


class LongAlpacaDataset(Dataset):
    """Tokenized LongAlpaca samples; ``{"tokens", "labels"}`` with the prompt masked.

    Args:
        tokenizer: torchtune ``llama2_tokenizer(path, prompt_template=None)`` for the text templates; for
            ``chat``, a model tokenizer with a chat template (``llama3_tokenizer``, ``qwen2_5_tokenizer``,
            ``mistral_tokenizer``, ...).
        records: sequence of mappings with ``instruction``, ``output`` and optionally ``input``.
        template: ``llama2_chat``, ``alpaca`` (see :func:`longalpaca_prompt`) or ``chat`` (the tokenizer's
            chat template; see the module docstring).
        max_seq_len: longest sample in tokens.
        truncation: ``left`` or ``skip`` (see the module docstring).
        system_prompt: system turn of the ``chat`` template (None: no system turn); only with ``chat``.

    Attributes:
        num_trimmed: samples whose instruction was shortened to fit.
        num_skipped: samples dropped because they did not fit.
        fingerprint: SHA-256 of every sample's tokens and trained span, i.e. of what training sees: it
            changes with the records, the tokenizer, the template and the truncation, and a resume compares
            it with the checkpoint's (:func:`longlora_tune.training.resume.compare_dataset_fingerprint`).

    Raises:
        LongLoRAConfigError: for invalid arguments or no sample left.
        RecordFieldError: for a record without string ``instruction``/``output`` (or a non-string ``input``).
    """

    def __init__(
        self,
        tokenizer: Any,
        records: Any,
        *,
        template: str,
        max_seq_len: int,
        truncation: str,
        system_prompt: Optional[str] = None,
    ) -> None:
        if template not in TEMPLATES:
            raise LongLoRAConfigError(f"dataset.template={template!r} is not one of {TEMPLATES}")
        if truncation not in TRUNCATIONS:
            raise LongLoRAConfigError(f"dataset.truncation={truncation!r} is not one of {TRUNCATIONS}")
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise LongLoRAConfigError(f"dataset.max_seq_len={max_seq_len!r} must be an integer >= 2")
        if system_prompt is not None and template != "chat":
            raise LongLoRAConfigError(
                f"dataset.system_prompt is only used by dataset.template=chat, not {template}; "
                "remove it (llama2_chat adds Llama 2's default system prompt to records with an input)"
            )
        self._chat: Optional[ChatFormat] = None
        if template == "chat":
            self._chat = ChatFormat(tokenizer, system_prompt=system_prompt)
            # Its copy of the tokenizer, without the tokenizer's own right truncation.
            tokenizer = self._chat.tokenizer
        self._tokenizer = tokenizer
        self.template = template
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.num_trimmed = 0
        self.num_skipped = 0
        # Long samples as Python int lists would take ~36 bytes a token on every rank; int32 arrays take 4.
        self._tokens: list[np.ndarray] = []
        self._prompt_lens: list[int] = []
        # Trailing tokens the chat template appends but masks (Llama 3's <|end_of_text|>); 0 otherwise.
        self._untrained_ends: list[int] = []
        for i, record in enumerate(records):
            problem = field_problem(record, LONGALPACA_FIELDS)
            if problem is not None:
                raise RecordFieldError(f"record {i}: {problem}; {LONGALPACA_FIELDS.hint}", i)
            answer_ids, untrained_end = self._encode_answer(record["output"])
            prompt_ids = self._encode(record["instruction"], record.get("input") or "", len(answer_ids))
            if prompt_ids is None:
                self.num_skipped += 1
                continue
            self._tokens.append(np.asarray(prompt_ids + answer_ids, dtype=np.int32))
            self._prompt_lens.append(len(prompt_ids))
            self._untrained_ends.append(untrained_end)
        del self._tokenizer, self._chat
        self.fingerprint = self._samples_digest()
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
        if self._chat is not None:
            return self._chat.prompt_ids(chat_user_text(instruction, input))
        text = longalpaca_prompt(instruction, input, self.template)
        return self._tokenizer.encode(text, add_bos=True, add_eos=False)

    def _encode_answer(self, output: str) -> tuple[list[int], int]:
        """The ids after the prompt, and how many of them at the end the loss ignores."""
        if self._chat is None:
            return self._tokenizer.encode(output, add_bos=False, add_eos=True), 0
        ids, trained = self._chat.answer_ids(output)
        n_trained = trained.index(False) if False in trained else len(trained)
        if any(trained[n_trained:]):
            # Labels are stored as "prompt ignored, then trained, then ignored": other masks do not fit.
            name = type(self._tokenizer).__name__
            raise LongLoRAConfigError(
                f"dataset.template=chat: {name}'s chat template masks tokens inside the answer; "
                "use dataset.template=llama2_chat or alpaca"
            )
        return ids, len(ids) - n_trained

    def _encode(self, instruction: str, input: str, n_answer: int) -> Optional[list[int]]:
        """Prompt ids, trimmed to fit beside ``n_answer`` answer ids; ``None`` when the sample is skipped."""
        tok = self._tokenizer
        prompt_ids = self._encode_prompt(instruction, input)
        excess = len(prompt_ids) + n_answer - self.max_seq_len
        if excess <= 0:
            return prompt_ids
        if self.truncation == "skip":
            return None
        # Drop leading instruction tokens, re-render and re-encode (SentencePiece merges across the cut can
        # change the count by a token or two), and repeat until the prompt fits beside the answer.
        instruction_ids = tok.encode(instruction, add_bos=False, add_eos=False)
        drop = excess
        while drop < len(instruction_ids):
            prompt_ids = self._encode_prompt(tok.decode(instruction_ids[drop:]), input)
            excess = len(prompt_ids) + n_answer - self.max_seq_len
            if excess <= 0:
                self.num_trimmed += 1
                return prompt_ids
            drop += excess
        return None

    def _samples_digest(self) -> str:
        h = hashlib.sha256()
        for tokens, n_prompt, n_end in zip(self._tokens, self._prompt_lens, self._untrained_ends):
            # Lengths first, so two samples cannot run together into the same byte string.
            h.update(np.asarray([len(tokens), n_prompt, n_end], dtype=np.int64).tobytes())
            h.update(tokens.tobytes())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        tokens = self._tokens[index].tolist()
        n_prompt = self._prompt_lens[index]
        n_end = self._untrained_ends[index]
        labels = (
            [CROSS_ENTROPY_IGNORE_IDX] * n_prompt
            + tokens[n_prompt : len(tokens) - n_end]
            + [CROSS_ENTROPY_IGNORE_IDX] * n_end
        )
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
    system_prompt: Optional[str] = None,
) -> Dataset:
    """LongAlpaca SFT dataset (``Yukang/LongAlpaca-12k`` by default, or local JSON/JSONL files).

    Args:
        tokenizer: torchtune ``llama2_tokenizer(path, prompt_template=None)``; with ``template="chat"``, the
            model's torchtune tokenizer (``llama3_tokenizer``, ``qwen2_5_tokenizer``, ``mistral_tokenizer``).
        max_seq_len: longest sample in tokens (the training context length).
        source: hub id, a packaged builder (``json``, ...) with ``data_files``, or a local dataset folder.
        data_files: local or ``hf://`` path(s).
        split: split to read.
        revision: hub revision.
        template: ``llama2_chat`` (default) or ``alpaca`` (see :func:`longalpaca_prompt`), or ``chat``: the
            tokenizer's own chat template (see :mod:`longlora_tune.data.chat_format`).
        truncation: ``left`` trims the instruction's start to fit, ``skip`` drops over-long samples.
        packed: pack samples into ``max_seq_len`` rows with torchtune's ``PackedDataset`` (use the
            ``padded_collate_packed`` collate; see :mod:`longlora_tune.data.collate`).
        system_prompt: the ``chat`` template's system turn (default: none); only with ``template="chat"``.

    Returns:
        A :class:`LongAlpacaDataset`, or a ``PackedDataset`` over it when ``packed``.

    Raises:
        LongLoRAConfigError: (one line naming the file, line and fix) for invalid arguments (``chat`` with a
            tokenizer that has no chat template, a system prompt the template refuses, ...), missing or
            unreadable files, records without string ``instruction``/``output``, or no sample that fits.
    """
    records = read_records(
        source, data_files=data_files, split=split, revision=revision, fields=LONGALPACA_FIELDS
    )
    try:
        ds = LongAlpacaDataset(
            tokenizer,
            records,
            template=template,
            max_seq_len=max_seq_len,
            truncation=truncation,
            system_prompt=system_prompt,
        )
    except RecordFieldError as e:
        # The loaded records no longer know their file and line: find the record in the files.
        diagnose_local_files(source, data_files, split, LONGALPACA_FIELDS)
        raise LongLoRAConfigError(f"dataset.source={source}: {e}") from e
    if not packed:
        return ds
    from torchtune.datasets import PackedDataset

    return PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=tokenizer.pad_id)
