"""LongAlpaca SFT through each family's own chat template: hand-checked prompts, label masks and EOS.

The expected strings are written out by hand from each family's documented format, as torchtune 0.6.1
emits it (see longlora_tune/data/chat_format.py for the differences from the Hugging Face templates).
"""

import json

import pytest
from torchtune.data import Message
from torchtune.models.llama2 import llama2_tokenizer
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.mistral import mistral_tokenizer
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

from longlora_tune.data import ChatFormat, LongAlpacaDataset, longalpaca_dataset
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.quickstart.tiny import (
    make_llama3_tokenizer,
    make_longalpaca_json,
    make_mistral_tokenizer,
    make_qwen2_5_tokenizer,
    make_tokenizer,
)

IGNORE = -100
QUESTION = "What is the first sentence of the story?"
SYSTEM = "You are a careful reader."
STORY = {
    "instruction": "Below is a story.\nThe cat sees the red ball today.\nWho sees the ball?",
    "input": "",
    "output": "The cat sees the red ball.",
}
WITH_INPUT = {
    "instruction": "Summarize the text.",
    "input": "A dog follows a small bird.",
    "output": "A dog follows.",
}

# family -> [(record, system prompt, the sample decoded with its special tokens, the trained tokens decoded)]
EXPECTED = {
    "llama3": [
        (
            STORY,
            None,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Below is a story.\nThe cat sees the red ball today.\nWho sees the ball?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
            "The cat sees the red ball.<|eot_id|><|end_of_text|>",
            "The cat sees the red ball.<|eot_id|>",
        ),
        (
            WITH_INPUT,
            SYSTEM,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "You are a careful reader.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n"
            "Summarize the text.\nA dog follows a small bird.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA dog follows.<|eot_id|><|end_of_text|>",
            "A dog follows.<|eot_id|>",
        ),
    ],
    "qwen2_5": [
        (
            STORY,
            None,
            "<|im_start|>user\n"
            "Below is a story.\nThe cat sees the red ball today.\nWho sees the ball?<|im_end|>\n"
            "<|im_start|>assistant\nThe cat sees the red ball.<|im_end|>",
            "The cat sees the red ball.<|im_end|>",
        ),
        (
            WITH_INPUT,
            SYSTEM,
            "<|im_start|>system\nYou are a careful reader.<|im_end|>\n"
            "<|im_start|>user\nSummarize the text.\nA dog follows a small bird.<|im_end|>\n"
            "<|im_start|>assistant\nA dog follows.<|im_end|>",
            "A dog follows.<|im_end|>",
        ),
    ],
    # SentencePiece decoding drops <s> and </s> (checked by id below). The two spaces before [/INST] are
    # torchtune's: it encodes " [/INST] ".rstrip(" ") on its own, and the dummy prefix adds a second space.
    "mistral": [
        (
            STORY,
            None,
            "[INST] Below is a story.\nThe cat sees the red ball today.\nWho sees the ball?  [/INST] "
            "The cat sees the red ball.",
            "The cat sees the red ball.",
        ),
        (
            WITH_INPUT,
            None,
            "[INST] Summarize the text.\nA dog follows a small bird.  [/INST] A dog follows.",
            "A dog follows.",
        ),
    ],
}
# family -> the end of the prompt: the user turn's end and the assistant header.
PROMPT_ENDS = {
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2_5": "<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "  [/INST]",
}
# family -> (first token, the trained end-of-answer token, a masked token after it or None): the real ids.
SPECIAL_IDS = {
    "llama3": (128000, 128009, 128001),  # <|begin_of_text|>, <|eot_id|>, <|end_of_text|>
    "qwen2_5": (151644, 151645, None),  # <|im_start|>, <|im_end|> (the EOS)
    "mistral": (1, 2, None),  # <s>, </s>
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    vocab, merges = make_qwen2_5_tokenizer(root / "qwen2_5")
    return {
        "llama3": llama3_tokenizer(str(make_llama3_tokenizer(root / "llama3"))),
        "qwen2_5": qwen2_5_tokenizer(str(vocab), str(merges)),
        "mistral": mistral_tokenizer(str(make_mistral_tokenizer(root / "mistral"))),
    }


def _decode(family, tok, ids):
    if family == "llama3":
        return tok.decode(ids, truncate_at_eos=False, skip_special_tokens=False)
    return tok.decode(ids)


def _body_ids(tok, text):
    return tok.encode(text, add_bos=False, add_eos=False)


@pytest.mark.parametrize("family", ["llama3", "qwen2_5", "mistral"])
def test_chat_sample_prompt_labels_and_eos_are_hand_checked(tokenizers, family):
    tok = tokenizers[family]
    first_id, end_id, masked_end_id = SPECIAL_IDS[family]
    for record, system, full_text, trained_text in EXPECTED[family]:
        ds = LongAlpacaDataset(
            tok, [record], template="chat", max_seq_len=4096, truncation="left", system_prompt=system
        )
        sample = ds[0]
        tokens, labels = sample["tokens"], sample["labels"]
        assert _decode(family, tok, tokens) == full_text

        # Labels: the prompt (through the assistant header) ignored, then exactly the answer and its end
        # token trained, then (Llama 3 only) the appended <|end_of_text|> ignored.
        trained = [i for i, label in enumerate(labels) if label != IGNORE]
        assert trained == list(range(trained[0], trained[-1] + 1))
        assert [labels[i] for i in trained] == [tokens[i] for i in trained]
        answer_ids = _body_ids(tok, record["output"])
        assert [tokens[i] for i in trained] == answer_ids + [end_id]
        assert _decode(family, tok, [tokens[i] for i in trained]) == trained_text
        # The prompt (all of it ignored) ends with the assistant header.
        prompt_text = _decode(family, tok, tokens[: trained[0]])
        assert full_text.startswith(prompt_text) and prompt_text.endswith(PROMPT_ENDS[family])

        assert tokens[0] == first_id and labels[0] == IGNORE
        if masked_end_id is None:
            assert tokens[-1] == end_id and labels[-1] == end_id
        else:
            assert tokens[-2:] == [end_id, masked_end_id] and labels[-2:] == [end_id, IGNORE]

        # The very tokens torchtune's own tokenize_messages makes of the conversation.
        messages = ([Message("system", system, masked=True)] if system else []) + [
            Message(
                "user",
                record["instruction"] + ("\n" + record["input"] if record["input"] else ""),
                masked=True,
            ),
            Message("assistant", record["output"]),
        ]
        assert tokens == tok.tokenize_messages(messages)[0]


@pytest.mark.parametrize("family", ["llama3", "qwen2_5"])
def test_generation_prompt_ends_with_the_assistant_header(tokenizers, family):
    tok = tokenizers[family]
    prompt = ChatFormat(tok, system_prompt=SYSTEM).prompt_ids("Who sees the ball?")
    header = {
        "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "qwen2_5": "<|im_start|>assistant\n",
    }[family]
    text = _decode(family, tok, prompt)
    assert text.endswith(
        "Who sees the ball?" + {"llama3": "<|eot_id|>", "qwen2_5": "<|im_end|>\n"}[family] + header
    )
    assert SYSTEM in text


@pytest.mark.parametrize("family", ["llama3", "qwen2_5", "mistral"])
def test_chat_left_truncation_keeps_template_question_and_answer(tokenizers, family, tmp_path):
    tok = tokenizers[family]
    path = make_longalpaca_json(tmp_path / "la.json", n=12, seed=0)
    records = json.loads(path.read_text())
    full = LongAlpacaDataset(tok, records, template="chat", max_seq_len=100_000, truncation="left")
    lengths = [len(s["tokens"]) for s in full]
    max_seq_len = sorted(lengths)[len(lengths) // 2]
    over = sum(n > max_seq_len for n in lengths)
    assert 0 < over < len(records)

    ds = longalpaca_dataset(
        tok, source="json", data_files=str(path), template="chat", max_seq_len=max_seq_len
    )
    assert (ds.num_trimmed, ds.num_skipped, len(ds)) == (over, 0, len(records))
    for sample, untrimmed, record in zip(ds, full, records):
        n_prompt = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE)
        # The answer part (tokens and labels) is the untrimmed sample's, whole.
        m_prompt = next(i for i, label in enumerate(untrimmed["labels"]) if label != IGNORE)
        assert sample["tokens"][n_prompt:] == untrimmed["tokens"][m_prompt:]
        assert sample["labels"][n_prompt:] == untrimmed["labels"][m_prompt:]
        assert (
            max_seq_len - 3 <= len(sample["tokens"]) <= max_seq_len or len(untrimmed["tokens"]) <= max_seq_len
        )
        if len(untrimmed["tokens"]) <= max_seq_len:
            assert sample == untrimmed
            continue
        prompt = _decode(family, tok, sample["tokens"][:n_prompt])
        whole = _decode(family, tok, untrimmed["tokens"][:m_prompt])
        # Same framing before and after the instruction; what is left of it is its end (and the question).
        head, tail = whole.split("Below is a story.")[0], whole.split(QUESTION)[1]
        assert prompt.startswith(head) and prompt.endswith(QUESTION + tail)
        kept = prompt[len(head) : len(prompt) - len(tail)]
        assert record["instruction"].endswith(kept.strip()) and len(kept) < len(record["instruction"])


def test_chat_skip_and_answer_too_long(tokenizers, tmp_path):
    tok = tokenizers["llama3"]
    long_answer = "The cat sees the red ball today. " * 30
    records = [
        {"instruction": "Story. " * 50 + QUESTION, "input": "", "output": long_answer},
        {"instruction": "Story. " * 50 + QUESTION, "input": "", "output": "Story."},
    ]
    n_long = len(ChatFormat(tok).answer_ids(long_answer)[0])
    prompt_len = len(ChatFormat(tok).prompt_ids(records[1]["instruction"]))
    ds = LongAlpacaDataset(tok, records, template="chat", max_seq_len=n_long + 5, truncation="left")
    assert (ds.num_trimmed, ds.num_skipped, len(ds)) == (1, 1, 1)
    assert _decode("llama3", tok, ds[0]["tokens"]).endswith(
        QUESTION
        + "<|eot_id|>"
        + ("<|start_header_id|>assistant<|end_header_id|>\n\nStory.<|eot_id|><|end_of_text|>")
    )
    n_short = len(ChatFormat(tok).answer_ids("Story.")[0])
    skip = LongAlpacaDataset(
        tok, records, template="chat", max_seq_len=prompt_len + n_short, truncation="skip"
    )
    assert (skip.num_trimmed, skip.num_skipped, len(skip)) == (0, 1, 1)
    assert len(skip[0]["tokens"]) == prompt_len + n_short
    assert skip[0]["tokens"][-2:] == [128009, 128001]


def test_tokenizer_max_seq_len_does_not_cut_the_answer(tmp_path):
    # torchtune's tokenize_messages cuts at the tokenizer's max_seq_len from the right (dropping the
    # answer); the dataset's own over-long policy applies instead, and the given tokenizer is not changed.
    tok = llama3_tokenizer(str(make_llama3_tokenizer(tmp_path)), max_seq_len=8)
    ds = LongAlpacaDataset(tok, [STORY], template="chat", max_seq_len=4096, truncation="left")
    assert len(ds[0]["tokens"]) > 8 and ds[0]["tokens"][-2:] == [128009, 128001]
    assert tok.max_seq_len == 8


def _one_line_error(match, **kwargs):
    with pytest.raises(LongLoRAConfigError, match=match) as info:
        LongAlpacaDataset(records=[STORY], max_seq_len=4096, truncation="left", **kwargs)
    assert "\n" not in str(info.value)


def test_chat_config_errors_are_one_line(tokenizers, tmp_path):
    llama2 = make_tokenizer(tmp_path)
    # Llama 2's tokenizer without a prompt template has no chat format: keep LongLoRA's prompt.
    _one_line_error(
        r"^dataset.template=chat: Llama2Tokenizer has no chat template .*use dataset.template=llama2_chat",
        tokenizer=llama2_tokenizer(str(llama2), prompt_template=None),
        template="chat",
    )
    _one_line_error(
        r"^dataset.template=chat needs a torchtune model tokenizer with tokenize_messages, not "
        r"SentencePieceBaseTokenizer",
        tokenizer=SentencePieceBaseTokenizer(str(llama2)),
        template="chat",
    )
    _one_line_error(
        r"^dataset.system_prompt: MistralTokenizer's chat template refused a LongAlpaca conversation "
        r"\(System prompts are not supported in MistralChatTemplate\)",
        tokenizer=tokenizers["mistral"],
        template="chat",
        system_prompt=SYSTEM,
    )
    _one_line_error(
        r"^dataset.system_prompt is only used by dataset.template=chat, not llama2_chat",
        tokenizer=tokenizers["llama3"],
        template="llama2_chat",
        system_prompt=SYSTEM,
    )
    _one_line_error(
        r"^dataset.system_prompt=3 must be a string",
        tokenizer=tokenizers["llama3"],
        template="chat",
        system_prompt=3,
    )
    # Qwen2.5 writes ChatML itself: torchtune refuses ChatMLTemplate on top of it.
    vocab, merges = make_qwen2_5_tokenizer(tmp_path / "q")
    _one_line_error(
        r"^dataset.template=chat: Qwen2_5Tokenizer's chat template refused a LongAlpaca conversation",
        tokenizer=qwen2_5_tokenizer(str(vocab), str(merges), prompt_template="torchtune.data.ChatMLTemplate"),
        template="chat",
    )


def test_llama2_with_a_prompt_template_uses_torchtunes_llama2_chat_format(tmp_path):
    # Not LongLoRA's prompt (that is template=llama2_chat): torchtune's Llama2ChatTemplate, spaces included.
    tok = llama2_tokenizer(
        str(make_tokenizer(tmp_path)), prompt_template="torchtune.models.llama2.Llama2ChatTemplate"
    )
    ds = LongAlpacaDataset(tok, [WITH_INPUT], template="chat", max_seq_len=4096, truncation="left")
    tokens, labels = ds[0]["tokens"], ds[0]["labels"]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert tok.decode(tokens[:n_prompt]) == "[INST] Summarize the text. A dog follows a small bird. [/INST]"
    assert labels[n_prompt:] == tokens[n_prompt:] == _body_ids(tok, "A dog follows.") + [tok.eos_id]
