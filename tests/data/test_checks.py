"""Dataset checks: one-line errors naming the file, line and fix, before the model and inside the builders."""

import json

import datasets
import pytest
from omegaconf import OmegaConf
from torchtune.models.llama2 import llama2_tokenizer

from longlora_tune.data import check_dataset_source, longalpaca_dataset, packed_blocks_dataset
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.quickstart.tiny import make_longalpaca_json, make_text_corpus, make_tokenizer

PRETRAIN = "longlora_tune.data.packed_blocks_dataset"
SFT = "longlora_tune.data.longalpaca_dataset"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return llama2_tokenizer(str(path), prompt_template=None)


def _cfg(component=PRETRAIN, **kw):
    return {"_component_": component, **kw}


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.type is LongLoRAConfigError
    return message


def _write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# ------------------------------------------------------------------------- bad files, pre-check and builders


def _bad_files(tmp_path):
    """(name, source, file, component, expected message start) for each kind of unreadable input."""
    ok = json.dumps({"text": "A dog follows the cat."})
    out = tmp_path / "files"
    out.mkdir()
    datasets.Dataset.from_dict({"text": [1, 2]}).to_parquet(str(out / "n.parquet"))
    return [
        ("empty", "json", _write(out / "empty.jsonl", ""), PRETRAIN, "empty.jsonl holds no records; add"),
        ("blank", "json", _write(out / "blank.jsonl", "\n \n"), PRETRAIN, "blank.jsonl holds no records"),
        ("empty list", "json", _write(out / "none.json", "[]"), SFT, "none.json holds no records"),
        (
            "malformed line",
            "json",
            _write(out / "bad.jsonl", f'{ok}\n{ok}\n{{"text": oops}}\n{ok}\n'),
            PRETRAIN,
            "bad.jsonl:3: invalid JSON (Expecting value at column 10); the file must hold JSON objects",
        ),
        (
            "not an object",
            "json",
            _write(out / "list.jsonl", f'{ok}\n["a", "b"]\n'),
            PRETRAIN,
            "list.jsonl:2: a list, not a JSON object",
        ),
        (
            "not utf-8",
            "text",
            _write(out / "latin1.txt", "first line\ncaf\u00e9 au lait\n".encode("latin-1"), "wb"),
            PRETRAIN,
            "latin1.txt:2: not UTF-8 text (byte 0xe9 at offset 14); save the file as UTF-8",
        ),
        (
            "number text",
            "json",
            _write(out / "num.jsonl", f'{ok}\n{{"text": 42}}\n'),
            PRETRAIN,
            "num.jsonl:2: field 'text' is a number (42), not a string; dataset.column='text' must name",
        ),
        (
            "null output",
            "json",
            _write(
                out / "null.json",
                json.dumps(
                    [{"instruction": "q", "output": "a"}] * 2 + [{"instruction": "q", "output": None}],
                    indent=1,
                ),
            ),
            SFT,
            "null.json:10 (list item 2): field 'output' is null, not a string; every LongAlpaca record needs",
        ),
        (
            "number output",
            "json",
            _write(out / "num.json", json.dumps([{"instruction": "q", "output": 42}])),
            SFT,
            "num.json:1 (list item 0): field 'output' is a number (42), not a string",
        ),
        (
            "no output",
            "json",
            _write(out / "answer.jsonl", json.dumps({"instruction": "q", "answer": "a"}) + "\n"),
            SFT,
            "answer.jsonl:1: record has no 'output' field (it has ['answer', 'instruction'])",
        ),
        (
            "no column",
            "json",
            _write(out / "body.jsonl", json.dumps({"body": "a"}) + "\n"),
            PRETRAIN,
            "body.jsonl: no record has a 'text' field (the first has ['body']); dataset.column='text'",
        ),
        (
            "number parquet",
            "parquet",
            out / "n.parquet",
            PRETRAIN,
            "n.parquet row 1: field 'text' is a number (1)",
        ),
        (
            "not parquet",
            "parquet",
            _write(out / "x.parquet", "not parquet"),
            PRETRAIN,
            "x.parquet: not a readable",
        ),
    ]


def test_precheck_reports_each_bad_file_in_one_line(tmp_path):
    for name, source, path, component, expected in _bad_files(tmp_path):
        with pytest.raises(LongLoRAConfigError) as excinfo:
            check_dataset_source(_cfg(component, source=source, data_files=str(path)))
        assert _one_line(excinfo).startswith(f"{path.parent}/{expected}"), name


def test_builders_report_each_bad_file_in_one_line(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    for name, source, path, component, expected in _bad_files(tmp_path):
        with pytest.raises(LongLoRAConfigError) as excinfo:
            if component == PRETRAIN:
                packed_blocks_dataset(
                    tokenizer, source=source, data_files=str(path), block_size=4, cache_dir=tmp_path / "c"
                )
            else:
                longalpaca_dataset(tokenizer, source=source, data_files=str(path), max_seq_len=64)
        message = _one_line(excinfo)
        if name == "no column":  # datasets reads it fine; the builder names the columns it has
            assert message.startswith(
                "dataset.column='text' is not in the dataset, whose columns are ['body']"
            )
        else:
            assert message.startswith(f"{path.parent}/{expected}"), name


def test_builder_finds_a_bad_line_past_the_precheck_sample(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    good = json.dumps({"text": "The cat sees the red ball today."}) + "\n"
    path = _write(tmp_path / "late.jsonl", good * 5000 + '{"text": 7}\n')
    cfg = _cfg(source="json", data_files=str(path))
    check_dataset_source(cfg, sample_bytes=4096)  # only the start is read: passes
    with pytest.raises(LongLoRAConfigError) as excinfo:
        check_dataset_source(cfg, sample_bytes=10**8)
    assert _one_line(excinfo).startswith(f"{path}:5001: field 'text' is a number (7)")
    with pytest.raises(LongLoRAConfigError) as excinfo:
        packed_blocks_dataset(
            tokenizer, source="json", data_files=str(path), block_size=8, cache_dir=tmp_path
        )
    assert _one_line(excinfo).startswith(f"{path}:5001: field 'text' is a number (7)")


def test_no_full_block_is_a_config_error_naming_the_fix(tokenizer, tmp_path):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=2)
    with pytest.raises(LongLoRAConfigError) as excinfo:
        packed_blocks_dataset(
            tokenizer, source="json", data_files=str(corpus), block_size=100_000, cache_dir=tmp_path
        )
    assert _one_line(excinfo).endswith("add data or lower dataset.block_size")


# -------------------------------------------------------------------------------- paths and data_files


def test_missing_paths(tmp_path):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=2)
    cases = [
        (
            dict(source="json", data_files=str(tmp_path / "nope.jsonl")),
            f"dataset.data_files: {tmp_path}/nope.jsonl does not exist",
        ),
        (
            dict(source="json", data_files=[str(corpus), str(tmp_path / "b.jsonl")]),
            f"dataset.data_files: {tmp_path}/b.jsonl does not exist",
        ),
        (
            dict(source="json", data_files=str(tmp_path / "*.parquet")),
            f"dataset.data_files: {tmp_path}/*.parquet matches no file",
        ),
        (
            dict(source="json", data_files=str(tmp_path)),
            f"dataset.data_files: {tmp_path} is a folder; name the files in it, e.g.",
        ),
        (
            dict(source="json", data_files="~/c.jsonl"),
            "dataset.data_files: ~/c.jsonl does not exist; give an existing file (a leading ~ is not",
        ),
        (dict(source="json"), "dataset.source=json needs dataset.data_files"),
        (
            dict(source="json", data_files={"validation": str(corpus)}),
            "dataset.data_files has no 'train' split (it has ['validation']); set dataset.split",
        ),
        (
            dict(source=str(corpus)),
            f"dataset.source={corpus} is a file, but source names the format; set dataset.source=json "
            f"dataset.data_files={corpus}",
        ),
        (dict(source="./no/such/folder"), "dataset.source=./no/such/folder does not exist"),
    ]
    for kw, expected in cases:
        with pytest.raises(LongLoRAConfigError) as excinfo:
            check_dataset_source(_cfg(**kw))
        assert _one_line(excinfo).startswith(expected), kw


def test_good_sources_pass(tmp_path):
    docs = ["The cat sees the red ball.", "A dog follows the bird."]
    make_text_corpus(tmp_path / "a.jsonl", n_docs=3)
    make_text_corpus(tmp_path / "b.jsonl", n_docs=3, seed=1)
    _write(tmp_path / "empty.jsonl", "")  # an empty file among others is no error: the split has records
    _write(tmp_path / "d.txt", "\n".join(docs) + "\n")
    _write(
        tmp_path / "pretty.json",
        json.dumps({"text": docs[0]}, indent=2) + json.dumps({"text": docs[1]}, indent=2),
    )
    _write(tmp_path / "strings.json", json.dumps(docs))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    sft = make_longalpaca_json(tmp_path / "sft.json", n=3)
    # As the recipe passes it: a DictConfig section with a ListConfig of files and a glob.
    root = OmegaConf.create(
        {
            "dataset": _cfg(
                source="json", data_files=[str(tmp_path / "[ab].jsonl"), str(tmp_path / "empty.jsonl")]
            )
        }
    )
    check_dataset_source(root.dataset)
    check_dataset_source(_cfg(source="json", data_files={"train": str(tmp_path / "a.jsonl")}))
    check_dataset_source(_cfg(source="text", data_files=str(tmp_path / "d.txt")))
    check_dataset_source(_cfg(source="json", data_files=str(tmp_path / "pretty.json")))
    check_dataset_source(_cfg(source="json", data_files=str(tmp_path / "strings.json")))
    check_dataset_source(_cfg(source="parquet", data_files=str(tmp_path / "d.parquet")))
    check_dataset_source(_cfg(SFT, source="json", data_files=str(sft)))
    # Every format the checks accept, datasets reads too.
    for source, name in [("json", "pretty.json"), ("json", "strings.json"), ("text", "d.txt")]:
        records = datasets.load_dataset(
            source, data_files=str(tmp_path / name), split="train", cache_dir=str(tmp_path / "hf")
        )
        assert records["text"] == docs, name


def test_hub_sources_are_skipped(monkeypatch):
    import datasets as ds_module

    def no_network(*args, **kwargs):
        raise AssertionError("the check must not load anything")

    monkeypatch.setattr(ds_module, "load_dataset", no_network)
    check_dataset_source(_cfg(SFT))  # default source: Yukang/LongAlpaca-12k
    check_dataset_source(_cfg())  # default source: the RedPajama sample
    check_dataset_source(_cfg(source="someone/some-dataset", data_files="hf://datasets/x/*.jsonl"))
    check_dataset_source({"_component_": "my.own_builder", "path": "/no/such/file"})  # unknown builder


def test_large_sample_reads_only_the_start_and_handles_cut_values(tmp_path):
    # Pretty-printed objects and a list with long items, cut by a small sample: no false error.
    with (tmp_path / "pretty.json").open("w") as f:
        for i in range(500):
            f.write(json.dumps({"text": "word " * 50, "i": i}, indent=2) + "\n")
    check_dataset_source(_cfg(source="json", data_files=str(tmp_path / "pretty.json")), sample_bytes=1000)
    items = [{"instruction": "a " * 3000, "output": "b"}] * 20
    for indent in (None, 1):
        _write(tmp_path / "list.json", json.dumps(items, indent=indent))
        check_dataset_source(
            _cfg(SFT, source="json", data_files=str(tmp_path / "list.json")), sample_bytes=1000
        )
    # A list whose item 1 is bad, with a sample smaller than one item: still found, with its line.
    _write(tmp_path / "list.json", json.dumps([items[0], {"instruction": "q"}], indent=1))
    with pytest.raises(LongLoRAConfigError) as excinfo:
        check_dataset_source(
            _cfg(SFT, source="json", data_files=str(tmp_path / "list.json")), sample_bytes=100
        )
    assert _one_line(excinfo).startswith(
        f"{tmp_path}/list.json:6 (list item 1): record has no 'output' field"
    )


# ----------------------------------------------------------------------------- sources, CSV, large files


def _build(component, tokenizer, tmp_path, **kw):
    if component == PRETRAIN:
        return packed_blocks_dataset(tokenizer, block_size=4, cache_dir=tmp_path / "cache", **kw)
    return longalpaca_dataset(tokenizer, max_seq_len=64, **kw)


@pytest.mark.parametrize(
    "source, hint", [("jsonl", " (did you mean json?)"), ("tsv", ""), ("JSON", " (did you mean json?)")]
)
def test_unknown_source_names_the_accepted_ones(tokenizer, tmp_path, monkeypatch, source, hint):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=2)
    expected = (
        f"dataset.source={source} is not a dataset source{hint}; use json, text, parquet, csv or arrow with "
        "dataset.data_files, a local dataset folder, or a hub id owner/name"
    )
    for component in (PRETRAIN, SFT):
        with pytest.raises(LongLoRAConfigError) as excinfo:
            check_dataset_source(_cfg(component, source=source, data_files=str(corpus)))
        assert _one_line(excinfo) == expected
        with pytest.raises(LongLoRAConfigError) as excinfo:
            _build(component, tokenizer, tmp_path, source=source, data_files=str(corpus))
        assert _one_line(excinfo) == expected


def _csv(path, rows):
    import csv

    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_text_column_is_text_whatever_it_looks_like(tokenizer, tmp_path, monkeypatch):
    # pandas would read these as numbers; documents are text, and empty cells are no documents.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    docs = ["2024", "1999", "", "3.50", "007", "12"]
    path = _csv(tmp_path / "d.csv", [["id", "body"]] + [[i, d] for i, d in enumerate(docs)])
    check_dataset_source(_cfg(source="csv", data_files=str(path), column="body"))
    ds = packed_blocks_dataset(
        tokenizer,
        source="csv",
        data_files=str(path),
        column="body",
        block_size=4,
        add_bos=False,
        cache_dir=tmp_path / "cache",
    )
    stream = [t for d in docs if d for t in tokenizer.encode(d, add_bos=False, add_eos=True)]
    assert [ds[i]["tokens"] for i in range(len(ds))] == [
        stream[i : i + 4] for i in range(0, len(stream) - 3, 4)
    ]


def test_csv_records_are_checked_with_their_lines(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    # An unquoted comma: one field too many, on line 4 (the quoted field on lines 2-3 is one record).
    commas = tmp_path / "commas.csv"
    commas.write_text('id,text\n1,"The cat sees\nthe red ball."\n2,A dog, a cat and a bird.\n')
    with pytest.raises(LongLoRAConfigError) as excinfo:
        check_dataset_source(_cfg(source="csv", data_files=str(commas)))
    expected = f"{commas}:4: 3 fields, but the header has 2; quote fields that hold the delimiter"
    assert _one_line(excinfo).startswith(expected)
    with pytest.raises(LongLoRAConfigError) as excinfo:
        _build(PRETRAIN, tokenizer, tmp_path, source="csv", data_files=str(commas))
    assert _one_line(excinfo).startswith(expected)

    sft = _csv(tmp_path / "sft.csv", [["instruction", "output"], ["q", "a"], ["q", ""]])
    with pytest.raises(LongLoRAConfigError) as excinfo:
        check_dataset_source(_cfg(SFT, source="csv", data_files=str(sft)))
    assert _one_line(excinfo).startswith(f"{sft}:3: field 'output' is null, not a string")


@pytest.mark.parametrize(
    "bad, expected",
    [
        (b'{"text": oops}\n', "invalid JSON (Expecting value at column 10)"),
        (
            json.dumps({"text": "caf\u00e9", "instruction": "q", "output": "a"}, ensure_ascii=False).encode(
                "latin-1"
            )
            + b"\n",
            "not UTF-8 text (byte 0xe9",
        ),
    ],
    ids=["malformed", "latin-1"],
)
@pytest.mark.parametrize("component", [PRETRAIN, SFT])
def test_builders_name_the_line_of_a_bad_record_deep_in_a_large_file(
    tokenizer, tmp_path, monkeypatch, bad, expected, component
):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    good = json.dumps({"text": "The cat sees the red ball.", "instruction": "q", "output": "a"}) + "\n"
    path = _write(tmp_path / "large.jsonl", good.encode() * 4999 + bad + good.encode() * 10, "wb")
    with pytest.raises(LongLoRAConfigError) as excinfo:
        _build(component, tokenizer, tmp_path, source="json", data_files=str(path))
    assert _one_line(excinfo).startswith(f"{path}:5000: {expected}")
