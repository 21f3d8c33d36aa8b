"""Loading raw records (Hugging Face hub or local files) for the dataset builders.

``source`` is either a ``datasets`` packaged builder name (``json``, ``text``, ``parquet``, ``csv``,
``arrow``) used with ``data_files``, a local dataset folder, or a hub repository id. ``datasets`` >= 4 no
longer runs loading scripts, and it refuses a script-based hub repository even when ``data_files`` are
given, so the script-based repositories this project defaults to are listed in :data:`HUB_PRESETS` and
read straight from their data files through ``hf://`` paths with the ``json`` builder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

PACKAGED_BUILDERS = ("json", "text", "parquet", "csv", "arrow")

DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]], None]


@dataclass(frozen=True)
class HubPreset:
    """How to read a script-based hub dataset from its data files.

    Attributes:
        builder: packaged ``datasets`` builder for the files.
        data_files: ``hf://`` path pattern of the files.
        features: column name -> ``datasets.Value`` dtype; fixes a schema that differs between files.
    """

    builder: str
    data_files: str
    features: dict[str, str] = field(default_factory=dict)


REDPAJAMA_SAMPLE = "togethercomputer/RedPajama-Data-1T-Sample"
LONGALPACA_12K = "Yukang/LongAlpaca-12k"

HUB_PRESETS: dict[str, HubPreset] = {
    # The repository holds *_sample.jsonl files (arxiv, book, c4, cc_*, github, stackexchange, wikipedia)
    # next to its loading script. Their "meta" objects have different keys per subset, so arrow cannot
    # concatenate them as structs: reading "meta" as a JSON string gives one schema for all files.
    REDPAJAMA_SAMPLE: HubPreset(
        builder="json",
        data_files=f"hf://datasets/{REDPAJAMA_SAMPLE}/*.jsonl",
        features={"text": "string", "meta": "string"},
    ),
}


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a packaged builder (local files) or an existing local folder."""
    return source in PACKAGED_BUILDERS or os.path.exists(source)


def load_records(
    source: str,
    *,
    data_files: DataFiles = None,
    split: str = "train",
    revision: Optional[str] = None,
    **options: Any,
) -> Any:
    """Load one split of a dataset with ``datasets.load_dataset``.

    Args:
        source: packaged builder name (``json``/``text``/``parquet``/``csv``/``arrow``, needs
            ``data_files``), local dataset folder, or hub repository id.
        data_files: path, list of paths or ``{split: paths}``; local or ``hf://`` paths.
        split: split to load.
        revision: hub revision (branch, tag or commit; e.g. ``refs/convert/parquet``).
        **options: the builder's reading options (e.g. the ``csv`` builder's pandas ``converters``); not
            passed to the :data:`HUB_PRESETS`, whose builder and files are fixed.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        ValueError: if a packaged builder is named without ``data_files``.
    """
    import datasets

    if source in PACKAGED_BUILDERS:
        if data_files is None:
            raise ValueError(f"source={source!r} needs data_files (a path, a list of paths or a glob)")
        return datasets.load_dataset(source, data_files=data_files, split=split, **options)
    preset = HUB_PRESETS.get(source)
    if preset is not None and data_files is None and revision is None:
        features = datasets.Features({k: datasets.Value(v) for k, v in preset.features.items()}) or None
        return datasets.load_dataset(
            preset.builder, data_files=preset.data_files, split=split, features=features
        )
    return datasets.load_dataset(source, data_files=data_files, split=split, revision=revision, **options)
