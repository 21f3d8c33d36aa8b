"""Continued-pretraining blocks: exact content against a direct computation, cache behaviour, errors."""

import json
import pickle

import datasets
import pytest
from torchtune.models.llama2 import llama2_tokenizer

from longlora_tune.data import _load, packed_blocks_dataset
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.quickstart.tiny import make_documents, make_text_corpus, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return llama2_tokenizer(str(path), prompt_template=None)


def _reference_stream(tokenizer, docs):
    stream = []
    for doc in docs:
        stream += tokenizer.encode(doc, add_bos=False, add_eos=True)
    return stream


def _read_docs(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _forbid_encode(monkeypatch, tokenizer):
    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer was called although the tokens are cached")

    monkeypatch.setattr(tokenizer, "encode", boom)


def test_blocks_equal_direct_computation_with_bos(tokenizer, tmp_path):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=20, seed=1)
    ds = packed_blocks_dataset(
        tokenizer, source="json", data_files=str(corpus), block_size=64, cache_dir=tmp_path / "cache"
    )
    stream = _reference_stream(tokenizer, _read_docs(corpus))
    assert len(ds) == len(stream) // 63 > 3
    for i in range(len(ds)):
        expected = [tokenizer.bos_id] + stream[i * 63 : (i + 1) * 63]
        assert ds[i] == {"tokens": expected, "labels": expected}
    # Documents are separated by EOS inside blocks; only position 0 holds BOS.
    assert sum(t == tokenizer.eos_id for i in range(len(ds)) for t in ds[i]["tokens"]) > 0
    assert all(tokenizer.bos_id not in ds[i]["tokens"][1:] for i in range(len(ds)))
    # Picklable for dataloader workers (the memory map is reopened there).
    assert pickle.loads(pickle.dumps(ds))[2] == ds[2]
    assert ds[-1] == ds[len(ds) - 1]
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("fmt", ["json", "text", "parquet"])
def test_blocks_without_bos_from_each_local_format(tokenizer, tmp_path, fmt):
    docs = make_documents(12, seed=2)
    if fmt == "json":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
        column = "body"
    elif fmt == "text":  # one document per line
        path = tmp_path / "d.txt"
        path.write_text("\n".join(docs) + "\n")
        column = "text"
    else:
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
        column = "text"
    ds = packed_blocks_dataset(
        tokenizer,
        source=fmt,
        data_files=[str(path)],
        column=column,
        block_size=50,
        add_bos=False,
        cache_dir=tmp_path / "cache",
    )
    stream = _reference_stream(tokenizer, docs)
    assert len(ds) == len(stream) // 50
    assert [ds[i]["tokens"] for i in range(len(ds))] == [
        stream[i * 50 : (i + 1) * 50] for i in range(len(stream) // 50)
    ]
    assert all(ds[i]["labels"] == ds[i]["tokens"] for i in range(len(ds)))


def test_cache_hit_skips_tokenizer_and_serves_other_block_sizes(tokenizer, tmp_path, monkeypatch):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=10, seed=3)
    kwargs = dict(source="json", data_files=str(corpus), cache_dir=tmp_path / "cache")
    first = packed_blocks_dataset(tokenizer, block_size=32, **kwargs)
    expected = [first[i] for i in range(len(first))]
    cached = list((tmp_path / "cache").glob("*.bin"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").exists()
    assert not list((tmp_path / "cache").glob("*.tmp"))

    _forbid_encode(monkeypatch, tokenizer)
    again = packed_blocks_dataset(tokenizer, block_size=32, **kwargs)
    assert [again[i] for i in range(len(again))] == expected
    # The stream is cached, not the blocks: another block size re-uses it.
    longer = packed_blocks_dataset(tokenizer, block_size=48, **kwargs)
    assert len(longer) == first.num_stream_tokens // 47
    assert longer[0]["tokens"][:32] == expected[0]["tokens"]
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1


def test_changed_data_file_is_retokenized(tokenizer, tmp_path, monkeypatch):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=10, seed=4)
    kwargs = dict(source="json", data_files=str(corpus), block_size=32, cache_dir=tmp_path / "cache")
    n_before = packed_blocks_dataset(tokenizer, **kwargs).num_stream_tokens
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "The cat sees the red ball today. " * 20}) + "\n")
    n_after = packed_blocks_dataset(tokenizer, **kwargs).num_stream_tokens
    assert n_after > n_before
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 2


def test_max_documents_and_num_proc(tokenizer, tmp_path):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=600, seed=5)  # > one 256-document chunk
    serial = packed_blocks_dataset(
        tokenizer, source="json", data_files=str(corpus), block_size=128, cache_dir=tmp_path / "a"
    )
    parallel = packed_blocks_dataset(
        tokenizer, source="json", data_files=str(corpus), block_size=128, cache_dir=tmp_path / "b", num_proc=2
    )
    assert len(serial) == len(parallel)
    assert all(serial[i] == parallel[i] for i in range(0, len(serial), 7))

    few = packed_blocks_dataset(
        tokenizer,
        source="json",
        data_files=str(corpus),
        block_size=16,
        cache_dir=tmp_path / "a",
        max_documents=3,
    )
    assert few.num_stream_tokens == len(_reference_stream(tokenizer, _read_docs(corpus)[:3]))


def test_no_full_block_error_names_the_numbers(tokenizer, tmp_path):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=2, seed=6)
    n = len(_reference_stream(tokenizer, _read_docs(corpus)))
    with pytest.raises(
        ValueError, match=f"^dataset yields 0 blocks of 8192 tokens from {n} tokens: add data"
    ):
        packed_blocks_dataset(
            tokenizer, source="json", data_files=str(corpus), block_size=8192, cache_dir=tmp_path / "cache"
        )


def test_bad_arguments(tokenizer, tmp_path):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=2, seed=7)
    with pytest.raises(
        LongLoRAConfigError, match=r"column='body' is not in the dataset, whose columns are \['text'\]"
    ):
        packed_blocks_dataset(
            tokenizer, source="json", data_files=str(corpus), column="body", block_size=8, cache_dir=tmp_path
        )
    with pytest.raises(LongLoRAConfigError, match="^dataset.source=json needs dataset.data_files"):
        packed_blocks_dataset(tokenizer, source="json", block_size=8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="block_size=1 "):
        packed_blocks_dataset(tokenizer, source="json", data_files=str(corpus), block_size=1)
    with pytest.raises(LongLoRAConfigError, match="nope.jsonl does not exist"):
        packed_blocks_dataset(tokenizer, source="json", data_files=str(tmp_path / "nope.jsonl"), block_size=8)


def test_redpajama_preset_reads_files_with_mixed_meta(tokenizer, tmp_path, monkeypatch):
    # The hub repository cannot be reached offline: point its preset at local files with the same
    # layout (*_sample.jsonl whose "meta" objects differ per subset) and check they load as one split.
    (tmp_path / "arxiv_sample.jsonl").write_text(
        json.dumps({"text": "A paper about cats.", "meta": {"arxiv_id": "1", "url": "u"}}) + "\n"
    )
    (tmp_path / "github_sample.jsonl").write_text(
        json.dumps({"text": "def f(): pass", "meta": {"stars": 3, "language": "py"}}) + "\n"
    )
    preset = _load.HUB_PRESETS[_load.REDPAJAMA_SAMPLE]
    assert preset.data_files == "hf://datasets/togethercomputer/RedPajama-Data-1T-Sample/*.jsonl"
    local = _load.HubPreset(preset.builder, str(tmp_path / "*.jsonl"), preset.features)
    monkeypatch.setitem(_load.HUB_PRESETS, _load.REDPAJAMA_SAMPLE, local)
    records = _load.load_records(_load.REDPAJAMA_SAMPLE)
    assert sorted(records["text"]) == ["A paper about cats.", "def f(): pass"]
    ds = packed_blocks_dataset(tokenizer, block_size=4, cache_dir=tmp_path / "cache")  # the default source
    assert len(ds) > 0


def test_add_bos_with_a_tokenizer_without_bos_is_one_line(tmp_path):
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    from longlora_tune.quickstart.tiny import make_qwen2_5_tokenizer

    vocab, merges = make_qwen2_5_tokenizer(tmp_path / "tok")
    tok = qwen2_5_tokenizer(path=str(vocab), merges_file=str(merges))
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=8)
    kwargs = dict(block_size=16, source="json", data_files=str(corpus), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LongLoRAConfigError, match="no BOS token; set dataset.add_bos=false") as err:
        packed_blocks_dataset(tok, **kwargs)
    assert "\n" not in str(err.value)
    blocks = packed_blocks_dataset(tok, add_bos=False, **kwargs)
    assert len(blocks) > 0 and None not in blocks[0]["tokens"]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_eos_id_ends_every_document_and_is_its_own_cache_entry(tokenizer, tmp_path, num_proc):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=12, seed=8)
    docs = _read_docs(corpus)
    kwargs = dict(source="json", data_files=str(corpus), block_size=32, cache_dir=tmp_path / "cache")
    plain = packed_blocks_dataset(tokenizer, **kwargs, add_bos=False, num_proc=num_proc)
    other = packed_blocks_dataset(tokenizer, **kwargs, add_bos=False, num_proc=num_proc, eos_id=7)
    expected = [t for d in docs for t in tokenizer.encode(d, add_bos=False, add_eos=False) + [7]]
    tokens = [t for i in range(len(other)) for t in other[i]["tokens"]]
    assert tokens == expected[: len(tokens)] and len(expected) - len(tokens) < 32
    assert [plain[i] for i in range(len(plain))] != [other[i] for i in range(len(other))]
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 2  # not served from the tokenizer-EOS stream
    same = packed_blocks_dataset(tokenizer, **kwargs, add_bos=False, eos_id=tokenizer.eos_id)
    assert same.stream_path == plain.stream_path  # the tokenizer's own EOS is the default's stream
    for bad in (-1, tokenizer.vocab_size, "2", True):
        with pytest.raises(LongLoRAConfigError, match=r"^dataset.eos_id=.* must be a token id in \[0, "):
            packed_blocks_dataset(tokenizer, **kwargs, eos_id=bad)


def test_document_end_is_the_base_models_eos_when_the_tokenizer_names_another():
    from longlora_tune.hf.base import HFBaseModel

    def end(eos, tokenizer_eos, **config):
        config = {"model_type": "qwen2", "eos_token_id": eos, **config}
        return HFBaseModel("base", config, ()).document_end_id(tokenizer_eos)

    assert end(151643, 151645) == 151643  # Qwen2.5 base: <|endoftext|>, torchtune: <|im_end|>
    assert end(2, 2) is None and end(None, 2) is None
    assert end([151645, 151643], 151645) is None  # the tokenizer's EOS among those listed
    assert end([151643, 151644], 151645) == 151643
    # Elsewhere eos_token_id is the stop token: Llama 3 Instruct's <|eot_id|> must not end documents.
    assert end(128009, 128001, model_type="llama", rope_theta=500_000.0) is None


def test_dataset_overrides_give_the_document_end_only_where_the_builder_takes_it():
    from types import SimpleNamespace

    from longlora_tune.hf.base import HFBaseModel

    base = HFBaseModel("base", {"model_type": "qwen2", "eos_token_id": 151643}, ())
    tokenizer = SimpleNamespace(eos_id=151645)
    packed = {"_component_": "longlora_tune.data.packed_blocks_dataset", "block_size": 8}
    assert base.dataset_overrides(packed, tokenizer) == {"eos_id": 151643}
    assert base.dataset_overrides({**packed, "eos_id": 5}, tokenizer) == {}  # the config's choice stands
    sft = {"_component_": "longlora_tune.data.longalpaca_dataset"}
    assert base.dataset_overrides(sft, tokenizer) == {}
