"""Continued-pretraining blocks: exact content against a direct computation, cache behaviour, errors."""

import hashlib
import json
import logging
import os
import pickle
import shutil
import threading

import datasets
import numpy as np
import pytest
from torchtune.models.llama2 import llama2_tokenizer

from longlora_tune._io import atomic_write_bytes
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


# ------------------------------------------------------------------------------------ cache integrity


def _blocks(ds):
    return [ds[i]["tokens"] for i in range(len(ds))]


def _count_encodes(monkeypatch, tokenizer):
    calls = []
    encode = tokenizer.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", counting)
    return calls


def _cache_warnings(caplog):
    return [r for r in caplog.records if r.name == "longlora_tune.data.pretrain" and r.levelname == "WARNING"]


def test_same_size_same_mtime_edit_is_retokenized(tokenizer, tmp_path):
    # cp -p / rsync -t keep size and mtime: the cache key must be the bytes, not the file's stat.
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=10, seed=4)
    kwargs = dict(source="json", data_files=str(corpus), block_size=16, cache_dir=tmp_path / "cache")
    before = _blocks(packed_blocks_dataset(tokenizer, **kwargs))
    stat = corpus.stat()
    text = corpus.read_text()
    edited = text.replace("cat", "dog")
    assert edited != text and len(edited) == len(text)
    corpus.write_text(edited)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (corpus.stat().st_size, corpus.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = packed_blocks_dataset(tokenizer, **kwargs)
    stream = _reference_stream(tokenizer, _read_docs(corpus))
    assert _blocks(after) == [[tokenizer.bos_id] + stream[i * 15 : (i + 1) * 15] for i in range(len(after))]
    assert _blocks(after) != before


def test_moved_data_file_reuses_the_cache(tokenizer, tmp_path, monkeypatch):
    corpus = make_text_corpus(tmp_path / "a" / "c.jsonl", n_docs=10, seed=4)
    first = packed_blocks_dataset(
        tokenizer, source="json", data_files=str(corpus), block_size=16, cache_dir=tmp_path / "cache"
    )
    moved = tmp_path / "b" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.copyfile(corpus, moved)
    _forbid_encode(monkeypatch, tokenizer)
    again = packed_blocks_dataset(
        tokenizer, source="json", data_files=str(moved), block_size=16, cache_dir=tmp_path / "cache"
    )
    assert again.stream_path == first.stream_path and _blocks(again) == _blocks(first)


def test_sidecar_records_the_entry(tokenizer, tmp_path):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=10, seed=9)
    ds = packed_blocks_dataset(
        tokenizer, source="json", data_files=str(corpus), block_size=16, cache_dir=tmp_path / "cache"
    )
    meta = json.loads(ds.stream_path.with_suffix(".json").read_text())
    data = ds.stream_path.read_bytes()
    stream = _reference_stream(tokenizer, _read_docs(corpus))
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == len(stream) == len(data) // 2
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["tokenizer"]["class"] == type(tokenizer).__name__
    assert meta["tokenizer"]["vocab_size"] == tokenizer.vocab_size == 512
    assert len(meta["tokenizer"]["sha256"]) == 64
    assert meta["data_files"] == [[hashlib.sha256(corpus.read_bytes()).hexdigest()]]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6) // 2 * 2])
    return f"holds {int(len(data) * 0.6) // 2} tokens, but its sidecar records {len(data) // 2}"


def _overwrite(path):
    # A fifth of the file replaced with valid ids: only the checksum can tell.
    tokens = np.fromfile(path, dtype=np.uint16)
    n = len(tokens) // 5
    replacement = tokens[n : 2 * n].copy()
    assert (replacement != tokens[:n]).any()
    tokens[:n] = replacement
    tokens.tofile(path)
    return "does not match the sha256 its sidecar records"


def _odd_size(path):
    with path.open("ab") as f:
        f.write(b"\x01")
    return f"is {path.stat().st_size} bytes, not a whole number of 2-byte uint16 tokens"


def _beyond_vocab(path):
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[7] = 60000
    tokens.tofile(path)
    return "holds token id 60000, beyond the tokenizer's 512-token vocabulary"


def _no_sidecar(path):
    path.with_suffix(".json").unlink()
    return f"has no sidecar {path.with_suffix('.json')}"


def _bad_sidecar(path):
    path.with_suffix(".json").write_text('{"num_tokens": ')
    return f"its sidecar {path.with_suffix('.json')} is not a JSON object"


@pytest.mark.parametrize(
    "damage",
    [_truncate, _overwrite, _odd_size, _beyond_vocab, _no_sidecar, _bad_sidecar],
    ids=lambda f: f.__name__,
)
def test_damaged_cache_entry_is_rebuilt_with_one_warning(tokenizer, tmp_path, monkeypatch, caplog, damage):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=40, seed=10)
    kwargs = dict(source="json", data_files=str(corpus), block_size=16, cache_dir=tmp_path / "cache")
    good = packed_blocks_dataset(tokenizer, **kwargs)
    expected = _blocks(good)
    problem = damage(good.stream_path)

    calls = _count_encodes(monkeypatch, tokenizer)
    with caplog.at_level(logging.INFO, logger="longlora_tune.data.pretrain"):
        rebuilt = packed_blocks_dataset(tokenizer, **kwargs)
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    message = warnings[0].getMessage()
    assert "\n" not in message and str(good.stream_path) in message and problem in message, message
    assert calls and rebuilt.stream_path == good.stream_path and _blocks(rebuilt) == expected

    # The rebuilt entry is whole again: used silently, without the tokenizer.
    caplog.clear()
    _forbid_encode(monkeypatch, tokenizer)
    with caplog.at_level(logging.INFO, logger="longlora_tune.data.pretrain"):
        assert _blocks(packed_blocks_dataset(tokenizer, **kwargs)) == expected
    assert not _cache_warnings(caplog)


def test_other_ranks_never_use_a_damaged_entry(tokenizer, tmp_path, monkeypatch, caplog):
    # Ranks other than local rank 0 wait, silently, until rank 0 has rebuilt the entry.
    from longlora_tune.data import pretrain

    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=40, seed=11)
    kwargs = dict(source="json", data_files=str(corpus), block_size=16, cache_dir=tmp_path / "cache")
    good = packed_blocks_dataset(tokenizer, **kwargs)
    expected, whole = _blocks(good), good.stream_path.read_bytes()
    _truncate(good.stream_path)
    monkeypatch.setattr(pretrain, "_is_builder_rank", lambda: False)
    _forbid_encode(monkeypatch, tokenizer)
    repair = threading.Timer(0.5, lambda: atomic_write_bytes(good.stream_path, whole))
    repair.start()
    try:
        with caplog.at_level(logging.INFO, logger="longlora_tune.data.pretrain"):
            waited = packed_blocks_dataset(tokenizer, **kwargs)
    finally:
        repair.join()
    assert _blocks(waited) == expected and not _cache_warnings(caplog)


def test_ids_beyond_the_vocabulary_at_build_time_are_one_line(tokenizer, tmp_path, monkeypatch):
    corpus = make_text_corpus(tmp_path / "c.jsonl", n_docs=5, seed=12)
    encode = tokenizer.encode

    def too_large(text, **kwargs):
        return encode(text, **kwargs) + ([tokenizer.vocab_size + 3] if "cat" in text else [])

    monkeypatch.setattr(tokenizer, "encode", too_large)
    with pytest.raises(LongLoRAConfigError) as err:
        packed_blocks_dataset(
            tokenizer, source="json", data_files=str(corpus), block_size=16, cache_dir=tmp_path / "cache"
        )
    message = str(err.value)
    assert "\n" not in message and str(corpus) in message, message
    assert f"token id {tokenizer.vocab_size + 3}" in message and "Llama2Tokenizer" in message, message
    assert not list((tmp_path / "cache").glob("*.bin"))


def test_dataset_fingerprint_covers_content_tokenizer_and_packing(tokenizer, tmp_path):
    from torchtune.models.mistral import mistral_tokenizer

    from longlora_tune.data import dataset_fingerprint
    from longlora_tune.quickstart.tiny import make_mistral_tokenizer

    corpus = make_text_corpus(tmp_path / "a" / "c.jsonl", n_docs=10, seed=13)
    base = dict(source="json", data_files=str(corpus), block_size=16)
    ds = packed_blocks_dataset(tokenizer, **base, cache_dir=tmp_path / "cache")
    fp = dataset_fingerprint(tokenizer, **base)
    assert ds.fingerprint == fp == dataset_fingerprint(tokenizer, **base) and len(fp) == 64

    moved = tmp_path / "b" / "moved.jsonl"
    moved.parent.mkdir()
    shutil.copyfile(corpus, moved)
    assert dataset_fingerprint(tokenizer, **dict(base, data_files=[str(moved)])) == fp  # content, not path
    assert dataset_fingerprint(tokenizer, **base, eos_id=tokenizer.eos_id) == fp  # the default, spelled out

    changed = {
        dataset_fingerprint(tokenizer, **dict(base, block_size=32)),
        dataset_fingerprint(tokenizer, **base, add_bos=False),
        dataset_fingerprint(tokenizer, **base, eos_id=5),
        dataset_fingerprint(tokenizer, **base, max_documents=3),
        dataset_fingerprint(tokenizer, **base, column="body"),
        dataset_fingerprint(
            mistral_tokenizer(str(make_mistral_tokenizer(tmp_path / "mistral")), prompt_template=None), **base
        ),
    }
    stat = corpus.stat()
    corpus.write_text(corpus.read_text().replace("cat", "dog"))  # same size, same mtime
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed.add(dataset_fingerprint(tokenizer, **base))
    assert fp not in changed and len(changed) == 7
