"""Datasets and collation for LongLoRA training: pretraining blocks, LongAlpaca SFT, S²-friendly padding."""

from longlora_tune.data.chat_format import ChatFormat
from longlora_tune.data.collate import padded_collate_s2
from longlora_tune.data.longalpaca import (
    LLAMA2_DEFAULT_SYSTEM_PROMPT,
    LongAlpacaDataset,
    chat_user_text,
    longalpaca_dataset,
    longalpaca_prompt,
)
from longlora_tune.data.pretrain import PackedBlocksDataset, dataset_fingerprint, packed_blocks_dataset
from longlora_tune.data.sources import check_dataset_source

__all__ = [
    "LLAMA2_DEFAULT_SYSTEM_PROMPT",
    "ChatFormat",
    "LongAlpacaDataset",
    "PackedBlocksDataset",
    "chat_user_text",
    "check_dataset_source",
    "dataset_fingerprint",
    "longalpaca_dataset",
    "longalpaca_prompt",
    "packed_blocks_dataset",
    "padded_collate_s2",
]
