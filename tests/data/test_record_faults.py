"""Bad and empty records deep in large files: one line naming file, line (and list item), before training."""

import json

import pytest
from torchtune.models.llama2 import llama2_tokenizer

from longlora_tune.data import check_dataset_source, longalpaca_dataset, packed_blocks_dataset
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.quickstart.tiny import make_tokenizer

PRETRAIN = "longlora_tune.data.packed_blocks_dataset"
SFT = "longlora_tune.data.longalpaca_dataset"
GOOD = {"text": "The cat sees the red ball.", "instruction": "What is seen?", "output": "A red ball."}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return llama2_tokenizer(str(make_tokenizer(tmp_path_factory.mktemp("tok"))), prompt_template=None)


def _build(component, tokenizer, tmp_path, path):
    if component == PRETRAIN:
        return packed_blocks_dataset(
            tokenizer, source="json", data_files=str(path), block_size=4, cache_dir=tmp_path / "cache"
        )
    return longalpaca_dataset(tokenizer, source="json", data_files=str(path), max_seq_len=64)


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.type is LongLoRAConfigError
    return message


@pytest.mark.parametrize("component", [PRETRAIN, SFT])
def test_a_bad_record_at_item_5000_of_a_large_json_list_names_line_and_item(
    tokenizer, tmp_path, monkeypatch, component
):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    records = [json.dumps(GOOD)] * 6000
    records[5000] = json.dumps({"text": 7, "instruction": 7, "output": 7})
    path = tmp_path / "large.json"
    path.write_text("[\n" + ",\n".join(records) + "\n]\n")  # item i is on line i + 2
    field = "text" if component == PRETRAIN else "instruction"
    expected = f"{path}:5002 (list item 5000): field '{field}' is a number (7), not a string"
    with pytest.raises(LongLoRAConfigError) as excinfo:
        check_dataset_source({"_component_": component, "source": "json", "data_files": str(path)})
    assert _message(excinfo).startswith(expected)
    with pytest.raises(LongLoRAConfigError) as excinfo:
        _build(component, tokenizer, tmp_path, path)
    assert _message(excinfo).startswith(expected)


@pytest.mark.parametrize("empty", ["", "  \n "], ids=["empty", "whitespace"])
def test_an_empty_sft_answer_at_line_5000_is_refused_with_its_line(tokenizer, tmp_path, monkeypatch, empty):
    # Its only target would be the end-of-sequence token: the record teaches "answer nothing".
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    lines = [json.dumps(GOOD)] * 6000
    lines[4999] = json.dumps({**GOOD, "output": empty})
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = (
        f"{path}:5000: field 'output' is empty ({json.dumps(empty)}): nothing to train on; every LongAlpaca "
        "record needs string 'instruction' and non-empty 'output' fields ('input' is optional): write its "
        "answer or remove the record"
    )
    with pytest.raises(LongLoRAConfigError) as excinfo:
        check_dataset_source({"_component_": SFT, "source": "json", "data_files": str(path)})
    assert _message(excinfo) == expected
    with pytest.raises(LongLoRAConfigError) as excinfo:
        _build(SFT, tokenizer, tmp_path, path)
    assert _message(excinfo) == expected


def test_empty_pretraining_documents_are_accepted(tokenizer, tmp_path, monkeypatch):
    # An empty text adds only its end-of-document token; every block keeps real labels (see the recipe test
    # tests/recipes/test_fault_injection.py for the finite losses).
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, {"text": ""}, GOOD, {"text": ""}] * 4))
    ds = _build(PRETRAIN, tokenizer, tmp_path, path)
    assert len(ds) > 0
    assert all(all(label != -100 for label in ds[i]["labels"]) for i in range(len(ds)))
