"""LongAlpaca: exact prompt templates, prompt masking, and the over-long sample policy."""

import json

import pytest
from torchtune.models.llama2 import llama2_tokenizer
from transformers.models.llama.tokenization_llama import DEFAULT_SYSTEM_PROMPT

from longlora_tune.data import (
    LLAMA2_DEFAULT_SYSTEM_PROMPT,
    LongAlpacaDataset,
    longalpaca_dataset,
    longalpaca_prompt,
)
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.quickstart.tiny import make_longalpaca_json, make_tokenizer

IGNORE = -100
QUESTION = "What is the first sentence of the story?"

RECORDS = [
    {
        "instruction": "Below is a story.\nThe cat sees the red ball today.\nWho sees the ball?",
        "input": "",
        "output": "The cat sees the red ball.",
    },
    {
        "instruction": "Summarize the text.",
        "input": "A dog follows a small bird.",
        "output": "A dog follows.",
    },
    {"instruction": "Name the animal in: a small bird sings.", "output": "A small bird."},  # no "input"
]

# Written out by hand from LongLoRA's supervised-fine-tune.py templates, not with the code under test.
LLAMA2_PROMPTS = [
    "[INST]Below is a story.\nThe cat sees the red ball today.\nWho sees the ball?[/INST]",
    "[INST] <<SYS>>\n"
    + DEFAULT_SYSTEM_PROMPT
    + "\n<</SYS>> \n\n Summarize the text. \nA dog follows a small bird. [/INST]",
    "[INST]Name the animal in: a small bird sings.[/INST]",
]
ALPACA_PROMPTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nBelow is a story.\nThe cat sees the red ball today.\nWho sees the ball?"
    "\n\n### Response:",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize the text."
    "\n\n### Input:\nA dog follows a small bird.\n\n### Response:",
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName the animal in: a small bird sings.\n\n### Response:",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return llama2_tokenizer(str(path), prompt_template=None)


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS))
    return path


def _split(sample):
    n_prompt = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE)
    assert all(label == IGNORE for label in sample["labels"][:n_prompt])
    assert sample["labels"][n_prompt:] == sample["tokens"][n_prompt:]
    return sample["tokens"][:n_prompt], sample["tokens"][n_prompt:]


def _norm(text):
    return " ".join(text.split())


def test_system_prompt_is_llama2_chat_default():
    assert LLAMA2_DEFAULT_SYSTEM_PROMPT == DEFAULT_SYSTEM_PROMPT


@pytest.mark.parametrize("template,expected", [("llama2_chat", LLAMA2_PROMPTS), ("alpaca", ALPACA_PROMPTS)])
def test_prompt_strings(template, expected):
    got = [longalpaca_prompt(r["instruction"], r.get("input", ""), template=template) for r in RECORDS]
    assert got == expected
    with pytest.raises(ValueError, match="template='chatml' is not one of"):
        longalpaca_prompt("x", template="chatml")


@pytest.mark.parametrize("template,prompts", [("llama2_chat", LLAMA2_PROMPTS), ("alpaca", ALPACA_PROMPTS)])
def test_prompt_is_masked_and_answer_plus_eos_is_learned(tokenizer, records_file, template, prompts):
    ds = longalpaca_dataset(
        tokenizer, source="json", data_files=str(records_file), template=template, max_seq_len=4096
    )
    assert len(ds) == 3 and ds.num_trimmed == 0 and ds.num_skipped == 0
    for sample, record, prompt in zip(ds, RECORDS, prompts):
        prompt_ids, answer_ids = _split(sample)
        assert prompt_ids == tokenizer.encode(prompt, add_bos=True, add_eos=False)
        assert prompt_ids[0] == tokenizer.bos_id and sample["labels"][0] == IGNORE
        assert answer_ids == tokenizer.encode(record["output"], add_bos=False, add_eos=True)
        assert answer_ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in answer_ids[:-1]
        assert tokenizer.decode(answer_ids[:-1]) == record["output"]


def _full_lengths(tokenizer, records):
    return [
        len(tokenizer.encode(longalpaca_prompt(r["instruction"], r["input"]), add_bos=True, add_eos=False))
        + len(tokenizer.encode(r["output"], add_bos=False, add_eos=True))
        for r in records
    ]


def test_left_truncation_trims_only_the_document_start(tokenizer, tmp_path):
    path = make_longalpaca_json(tmp_path / "la.json", n=16, seed=0)
    records = json.loads(path.read_text())
    lengths = _full_lengths(tokenizer, records)
    max_seq_len = sorted(lengths)[len(lengths) // 2]
    over = sum(n > max_seq_len for n in lengths)
    assert 0 < over < len(records)

    ds = longalpaca_dataset(tokenizer, source="json", data_files=str(path), max_seq_len=max_seq_len)
    assert (ds.num_trimmed, ds.num_skipped, len(ds)) == (over, 0, len(records))
    for sample, record, full in zip(ds, records, lengths):
        prompt_ids, answer_ids = _split(sample)
        # The answer is never cut.
        assert answer_ids == tokenizer.encode(record["output"], add_bos=False, add_eos=True)
        assert len(sample["tokens"]) <= max_seq_len
        if full <= max_seq_len:
            assert len(sample["tokens"]) == full
            continue
        # Trimmed: as long as fits (up to a token or two of SentencePiece merges at the cut) ...
        assert len(sample["tokens"]) >= max_seq_len - 3
        text = _norm(tokenizer.decode(prompt_ids))
        # ... the template framing and the question are intact, and what is left of the instruction is
        # its end (the tiny tokenizer folds newlines into spaces, so compare whitespace-normalised text).
        assert text.startswith("[INST]") and text.endswith(QUESTION + "[/INST]")
        kept = text[len("[INST]") : -len("[/INST]")]
        assert _norm(record["instruction"]).endswith(kept) and len(kept) < len(_norm(record["instruction"]))


def test_skip_drops_over_long_samples(tokenizer, tmp_path):
    path = make_longalpaca_json(tmp_path / "la.json", n=16, seed=1)
    records = json.loads(path.read_text())
    lengths = _full_lengths(tokenizer, records)
    max_seq_len = sorted(lengths)[len(lengths) // 3]
    kept = [(r, n) for r, n in zip(records, lengths) if n <= max_seq_len]

    ds = longalpaca_dataset(
        tokenizer, source="json", data_files=str(path), max_seq_len=max_seq_len, truncation="skip"
    )
    assert (ds.num_trimmed, ds.num_skipped, len(ds)) == (0, len(records) - len(kept), len(kept))
    for sample, (record, n) in zip(ds, kept):
        prompt_ids, answer_ids = _split(sample)
        assert len(sample["tokens"]) == n
        assert prompt_ids == tokenizer.encode(
            longalpaca_prompt(record["instruction"]), add_bos=True, add_eos=False
        )
        assert answer_ids == tokenizer.encode(record["output"], add_bos=False, add_eos=True)


def test_left_skips_when_the_answer_alone_does_not_fit(tokenizer, tmp_path):
    long_answer = "The cat sees the red ball today. " * 30
    records = [
        {"instruction": "Story. " * 50 + QUESTION, "input": "", "output": long_answer},
        {"instruction": "Story. " * 50 + QUESTION, "input": "", "output": "Story."},
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    max_seq_len = len(tokenizer.encode(long_answer, add_bos=False, add_eos=True)) + 5
    ds = longalpaca_dataset(tokenizer, source="json", data_files=str(path), max_seq_len=max_seq_len)
    assert (ds.num_trimmed, ds.num_skipped, len(ds)) == (1, 1, 1)
    _, answer_ids = _split(ds[0])
    assert answer_ids == tokenizer.encode("Story.", add_bos=False, add_eos=True)

    with pytest.raises(ValueError, match="no LongAlpaca sample fits max_seq_len=8 "):
        longalpaca_dataset(tokenizer, source="json", data_files=str(path), max_seq_len=8)


def test_bad_arguments(tokenizer, records_file, tmp_path):
    kwargs = dict(source="json", data_files=str(records_file), max_seq_len=64)
    with pytest.raises(ValueError, match="truncation='right' is not one of"):
        longalpaca_dataset(tokenizer, truncation="right", **kwargs)
    with pytest.raises(ValueError, match="template='llama3' is not one of"):
        longalpaca_dataset(tokenizer, template="llama3", **kwargs)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "answer": "a"}]))
    with pytest.raises(
        LongLoRAConfigError, match=r"bad.json:1 \(list item 0\): record has no 'output' field"
    ):
        longalpaca_dataset(tokenizer, source="json", data_files=str(bad), max_seq_len=64)
    # Records given directly (no file to point at) are named by index, with the type of the bad value.
    records = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": 3.5}]
    with pytest.raises(
        LongLoRAConfigError, match=r"^record 1: field 'output' is a number \(3.5\), not a string"
    ):
        LongAlpacaDataset(tokenizer, records, template="llama2_chat", max_seq_len=64, truncation="left")


def test_fingerprint_follows_what_training_sees(tokenizer, tmp_path):
    """The resume check's SFT fingerprint: equal for the same samples (moved file), different for an edited
    answer, another template or a truncation that changes the samples."""

    def fingerprint(records, name="a.json", **kwargs):
        path = tmp_path / name
        path.write_text(json.dumps(records))
        kwargs.setdefault("max_seq_len", 512)
        return longalpaca_dataset(tokenizer, source="json", data_files=str(path), **kwargs).fingerprint

    base = fingerprint(RECORDS)
    assert len(base) == 64
    assert fingerprint(RECORDS, name="moved.json") == base
    edited = [dict(RECORDS[0], output="The dog sees the red ball."), *RECORDS[1:]]
    assert fingerprint(edited) != base
    assert fingerprint(RECORDS, template="alpaca") != base
    shortest = min(
        len(s["tokens"])
        for s in longalpaca_dataset(
            tokenizer, source="json", data_files=str(tmp_path / "a.json"), max_seq_len=512
        )
    )
    assert fingerprint(RECORDS, max_seq_len=shortest, truncation="left") != base
    packed = longalpaca_dataset(
        tokenizer, source="json", data_files=str(tmp_path / "a.json"), max_seq_len=512, packed=True
    )
    assert packed.ds.fingerprint == base
