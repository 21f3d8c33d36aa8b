"""A Hugging Face ``tokenizer.json`` folder as a torchtune model tokenizer (HFTokenizer), and how a folder's
tokenizer files pick the family and the tokenizer."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
from torchtune.data import Message

from longlora_tune.data.chat_format import ChatFormat
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.hf.base import HFBaseModel, HFTokenizer, chat_template
from longlora_tune.models.families import FAMILIES, detect_family
from longlora_tune.quickstart import tiny

transformers = pytest.importorskip("transformers")

TEXT = "Below is a story.\nThe cat sees the red ball today.\n\nWho  sees it? 12345 héllo"


@pytest.fixture
def folder(tmp_path):
    tiny.make_hf_tokenizer(tmp_path)
    return tmp_path


def _conversation(answer: str) -> list[Message]:
    return [
        Message(role="user", content="What does the cat see?", masked=True),
        Message(role="assistant", content=answer),
    ]


def test_encode_decode_and_ids_match_transformers(folder):
    tok = HFTokenizer(str(folder / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.vocab_size == len(ref) == 515 and tok.stop_tokens == [tok.eos_id]
    assert set(tok.special_tokens) == set(tiny.HF_SPECIAL_TOKENS)
    plain = ref(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.encode(TEXT, add_bos=False, add_eos=False) == plain
    assert tok.encode(TEXT) == [tok.bos_id, *plain, tok.eos_id]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode([tok.bos_id], skip_special_tokens=False) == "<|im_start|>"


def test_encode_adds_bos_only_when_asked_even_if_the_post_processor_adds_one(folder):
    """torchtune's HuggingFaceBaseTokenizer keeps a post-processor's BOS with add_bos=False (Llama 3's)."""
    from tokenizers import Tokenizer, processors

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 513)]
    )
    raw.save(str(folder / "tokenizer.json"))
    tok = HFTokenizer(str(folder / "tokenizer.json"))
    assert tok.encode("cat", add_bos=False, add_eos=False)[0] != tok.bos_id
    assert tok.encode("cat", add_eos=False).count(tok.bos_id) == 1


def test_tokenize_messages_is_the_chat_template_with_masks(folder):
    tok = HFTokenizer(str(folder / "tokenizer.json"), max_seq_len=1000)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    turns = [{"role": m.role, "content": m.text_content} for m in _conversation("A red ball.")]
    tokens, mask = tok.tokenize_messages(_conversation("A red ball."))
    assert tokens == list(ref.apply_chat_template(turns, tokenize=True)["input_ids"])
    prompt, _ = tok.tokenize_messages(_conversation(""), add_end_tokens=False)
    generation = ref.apply_chat_template(turns[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert prompt == list(generation)
    # The user turn (with the template's default system turn) is masked; the assistant header and answer
    # are trained, as torchtune's own tokenizers do.
    user, _ = tok.tokenize_messages(_conversation("")[:1])
    assert tokens[: len(user)] == user and mask == [True] * len(user) + [False] * (len(tokens) - len(user))
    assert tok.decode(tokens[len(generation) :], skip_special_tokens=False) == "A red ball.<|im_end|>\n"
    short, short_mask = HFTokenizer(str(folder / "tokenizer.json"), max_seq_len=5).tokenize_messages(
        _conversation("A red ball.")
    )
    assert (short, short_mask) == (tokens[:5], mask[:5])
    # What dataset.template=chat and generate build on it.
    chat = ChatFormat(tok)
    assert chat.prompt_ids("What does the cat see?") == prompt
    # Still picklable after use (packed pretraining tokenizes in worker processes).
    assert pickle.loads(pickle.dumps(tok)).tokenize_messages(_conversation("A red ball.")) == (tokens, mask)


def test_chat_template_from_tokenizer_config_and_its_absence(folder):
    source = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    assert chat_template(folder) is None
    with pytest.raises(ValueError, match="no chat template"):
        HFTokenizer(str(folder / "tokenizer.json")).tokenize_messages(_conversation("x"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": [{"name": "default", "template": source}]})
    )
    assert chat_template(folder) == source


def test_missing_bos_eos_files_are_one_line_errors(folder):
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(LongLoRAConfigError, match="needs one of them to name BOS and EOS") as e:
        HFTokenizer(str(folder / "tokenizer.json"))
    assert "\n" not in str(e.value)
    with pytest.raises(LongLoRAConfigError, match="tokenizer file not found"):
        HFTokenizer(str(folder / "nope.json"))


# ------------------------------------------------------------------------ family and tokenizer choice


def _llama_folder(path, tokenizer_files, **config):
    path.mkdir(parents=True, exist_ok=True)
    for name in tokenizer_files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"")
    shape = dict(vocab_size=49152, num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                 intermediate_size=128, model_type="llama", rope_theta=100_000.0)  # fmt: skip
    (path / "config.json").write_text(json.dumps({**shape, **config}))
    (path / "model.safetensors").write_bytes(b"")
    return path


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.parametrize(
    "files, config, family",
    [
        (["tokenizer.json"], {}, "hf_llama"),
        (["tokenizer.json"], {"tie_word_embeddings": True}, "hf_llama"),
        (["tokenizer.model", "tokenizer.json"], {}, "llama2"),  # a Hugging Face Llama 2 folder
        (["original/tokenizer.model", "tokenizer.json"], {}, "llama3"),  # a Hugging Face Llama 3 folder
        # config.json alone is exact for Llama 3: its vocabulary, or Meta's llama3 RoPE scaling.
        (["original/tokenizer.model"], {"vocab_size": 128_256}, "llama3"),
        (["tokenizer.model"], {"rope_scaling": LLAMA31_ROPE, "max_position_embeddings": 131_072}, "llama3"),
    ],
)
def test_tokenizer_files_decide_the_llama_family(tmp_path, files, config, family, caplog):
    with caplog.at_level(logging.WARNING, logger="longlora_tune.models.families"):
        base = HFBaseModel.read(_llama_folder(tmp_path / "ckpt", files, **config))
        assert base.family is FAMILIES[family]
    assert not caplog.records  # nothing was assumed


def test_an_undecided_llama_folder_logs_its_assumption_once(tmp_path, caplog):
    folder = _llama_folder(tmp_path / "bare", [], rope_theta=10_000.0, vocab_size=32_000)
    with caplog.at_level(logging.WARNING, logger="longlora_tune.models.families"):
        for _ in range(3):
            assert HFBaseModel.read(folder).family.name == "llama2"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "assuming llama2" in lines[0] and str(folder) in lines[0]
    assert (
        detect_family(json.loads((folder / "config.json").read_text()), ["tokenizer.json"]).name == "hf_llama"
    )


def test_tied_checkpoint_of_an_untied_family_names_the_cause(tmp_path):
    folder = _llama_folder(tmp_path / "ckpt", ["tokenizer.model"], tie_word_embeddings=True)
    with pytest.raises(LongLoRAConfigError, match="tie_word_embeddings=true but torchtune's llama2"):
        HFBaseModel.read(folder)


def test_family_files_missing_falls_back_to_tokenizer_json(tmp_path, caplog):
    """A Llama 3.x folder downloaded without original/ still has its tokenizer.json."""
    folder = _llama_folder(tmp_path / "ckpt", [], vocab_size=128_256, rope_theta=500_000.0)
    tiny.make_hf_tokenizer(folder)
    base = HFBaseModel.read(folder)
    assert base.family.name == "llama3"
    assert base.tokenizer_config()["_component_"] == "longlora_tune.hf.base.HFTokenizer"
    (folder / "original").mkdir()
    (folder / "original/tokenizer.model").write_bytes(b"")
    assert base.tokenizer_config()["_component_"] == FAMILIES["llama3"].tokenizer
    (folder / "original/tokenizer.model").unlink()
    with caplog.at_level(logging.WARNING, logger="longlora_tune.models.families"):
        section = base.tokenizer_config(max_seq_len=64)
    assert section == {"_component_": "longlora_tune.hf.base.HFTokenizer",
                       "path": str(folder / "tokenizer.json"), "max_seq_len": 64}  # fmt: skip
    assert "no original/tokenizer.model" in caplog.records[0].getMessage()


def test_model_section_is_the_family_builder_with_the_checkpoint_shapes(tmp_path):
    base = HFBaseModel.read(_llama_folder(tmp_path / "ckpt", ["tokenizer.json"], tie_word_embeddings=True))
    section = base.model_section({"max_seq_len": 512, "use_full_attn": True, "num_layers": 2})
    assert section == {
        "_component_": "longlora_tune.models.longlora_llama3",
        "vocab_size": 49152, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "embed_dim": 64,
        "intermediate_dim": 128, "norm_eps": 1e-5, "tie_word_embeddings": True,
        "max_seq_len": 512, "use_full_attn": True,
    }  # fmt: skip
