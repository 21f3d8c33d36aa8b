"""An export carries the tokenizer files its family's torchtune tokenizer reads, so it can serve as a base."""

from __future__ import annotations

import pytest

from longlora_tune._compat import import_object
from longlora_tune.hf.export import copy_tokenizer_files
from longlora_tune.models.families import FAMILIES
from longlora_tune.quickstart import tiny


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_copied_tokenizer_files_build_the_family_tokenizer(family, tmp_path):
    spec = FAMILIES[family]
    base, export = tmp_path / "base", tmp_path / "hf"
    base.mkdir()
    export.mkdir()
    tiny.make_family_tokenizer(family, base)
    copied = copy_tokenizer_files(base, export)
    assert {file for _, file in spec.tokenizer_files} <= set(copied)
    # The tiny tokenizers keep their special tokens at their own ids: that file travels with the export.
    assert spec.special_tokens_file is None or spec.special_tokens_file in copied
    build = import_object(spec.tokenizer)
    original = build(**{arg: str(base / file) for arg, file in spec.tokenizer_files})
    exported = build(**{arg: str(export / file) for arg, file in spec.tokenizer_files})
    text = "the cat sees a green apple today"
    assert exported.encode(text) == original.encode(text)


def test_every_tokenizer_and_chat_template_file_of_the_base_travels(tmp_path):
    """What a Hugging Face folder (SmolLM2's, transformers 5) has beside the weights, generation included."""
    base, export = tmp_path / "base", tmp_path / "hf"
    export.mkdir()
    tiny.make_hf_tokenizer(base)
    for name in ("special_tokens_map.json", "generation_config.json", "added_tokens.json"):
        (base / name).write_text("{}")
    copied = copy_tokenizer_files(base, export)
    wanted = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
              "generation_config.json", "added_tokens.json"}  # fmt: skip
    assert set(copied) == wanted
    assert all((export / name).read_bytes() == (base / name).read_bytes() for name in wanted)
