"""The tiny per-family tokenizer writers load in torchtune's own tokenizer builders and round-trip text."""

import base64
import json

import pytest
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.mistral import mistral_tokenizer
from torchtune.models.qwen2._tokenizer import bytes_to_unicode
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

from longlora_tune.quickstart.tiny import (
    make_hf_tokenizer,
    make_llama3_tokenizer,
    make_mistral_tokenizer,
    make_qwen2_5_tokenizer,
)

# Newlines, a blank line, repeated spaces, digits and non-ASCII: what a long-document SFT sample holds.
TEXT = "Below is a story.\nThe cat sees the red ball today.\n\nWho  sees it? 12345 héllo — ünïcode"
# Words of the training corpus: merges were learnt and are used.
KNOWN = "The cat sees the red ball today."


def test_llama3_tokenizer_round_trips_and_has_llama3_special_ids(tmp_path):
    path = make_llama3_tokenizer(tmp_path, vocab_size=400)
    lines = path.read_text().splitlines()
    # Meta's tiktoken format: "base64(bytes) rank", ranks 0..n-1, the 256 single bytes first.
    assert len(lines) == 400
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines)}
    assert sorted(ranks.values()) == list(range(400))
    assert all(ranks[bytes([b])] == b for b in range(256))

    tok = llama3_tokenizer(str(path))
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert (ids[0], ids[-1]) == (128000, 128001)  # <|begin_of_text|>, <|end_of_text|>
    assert all(i < 400 for i in ids[1:-1])
    assert len(tok.encode(KNOWN, add_bos=False, add_eos=False)) < len(KNOWN) // 3
    assert tok.decode(ids) == TEXT
    assert (tok.eot_id, tok.start_header_id, tok.end_header_id) == (128009, 128006, 128007)
    assert tok.base_vocab_size == 400 and tok.vocab_size == 128257

    # The compact special ids for a tiny model: the same tokens, moved down to follow the BPE.
    small = llama3_tokenizer(str(path), special_tokens_path=str(tmp_path / "special_tokens.json"))
    assert (small.bos_id, small.eos_id, small.eot_id, small.pad_id) == (400, 401, 409, 404)
    assert small.vocab_size == 400 + 257
    ids = small.encode(TEXT, add_bos=True, add_eos=True)
    assert (ids[0], ids[-1]) == (400, 401) and small.decode(ids) == TEXT


def test_llama3_tokenizer_is_deterministic_per_seed(tmp_path):
    a = make_llama3_tokenizer(tmp_path / "a").read_bytes()
    assert make_llama3_tokenizer(tmp_path / "b").read_bytes() == a
    assert make_llama3_tokenizer(tmp_path / "c", seed=1).read_bytes() != a


def test_qwen2_5_tokenizer_round_trips_and_has_qwen_special_ids(tmp_path):
    vocab_path, merges_path = make_qwen2_5_tokenizer(tmp_path, vocab_size=450)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    to_unicode = bytes_to_unicode()
    # GPT-2 byte-level format: ids 0-255 are the byte characters, then one token per merge.
    assert sorted(vocab.values()) == list(range(450))
    assert all(vocab[to_unicode[b]] == b for b in range(256))
    merges = merges_path.read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version:")
    assert all("".join(m.split()) in vocab for m in merges[1:])

    tok = qwen2_5_tokenizer(str(vocab_path), str(merges_path))
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert ids[-1] == 151645  # <|im_end|> is Qwen2.5's EOS in torchtune (no BOS)
    assert all(i < 450 for i in ids[:-1])
    assert len(tok.encode(KNOWN, add_bos=False, add_eos=False)) < len(KNOWN) // 3
    assert tok.decode(ids[:-1]) == TEXT
    assert (tok.im_start_id, tok.pad_id) == (151644, 151643)

    small = qwen2_5_tokenizer(
        str(vocab_path), str(merges_path), special_tokens_path=str(tmp_path / "special_tokens.json")
    )
    assert (small.pad_id, small.im_start_id, small.eos_id) == (450, 451, 452)
    assert max(small.special_tokens.values()) == 450 + 21
    ids = small.encode(TEXT, add_bos=False, add_eos=True)
    assert ids[-1] == 452 and small.decode(ids, skip_special_tokens=True) == TEXT


def test_mistral_tokenizer_round_trips_with_whitespace_kept(tmp_path):
    tok = mistral_tokenizer(str(make_mistral_tokenizer(tmp_path)))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 512)
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert (ids[0], ids[-1]) == (1, 2)
    # Identity normalization (Mistral's released tokenizer's): newlines and double spaces survive.
    assert tok.decode(ids) == TEXT
    assert len(tok.encode(KNOWN, add_bos=False, add_eos=False)) < len(KNOWN) // 3


def test_hf_tokenizer_json_round_trips_with_a_space_token_before_digits(tmp_path):
    path = make_hf_tokenizer(tmp_path, vocab_size=447, split_digits=True)
    config = tmp_path / "tokenizer_config.json"
    tok = HuggingFaceBaseTokenizer(str(path), tokenizer_config_json_path=str(config))
    # The 447 BPE tokens, then <|endoftext|>, <|im_start|> (BOS) and <|im_end|> (EOS).
    assert (tok.bos_id, tok.eos_id, tok.tokenizer.get_vocab_size()) == (448, 449, 450)
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert (ids[0], ids[-1]) == (448, 449) and tok.decode(ids) == TEXT
    assert len(tok.encode(KNOWN, add_bos=False, add_eos=False)) < len(KNOWN) // 3
    # SmolLM2's layout: the space before a number is its own token, then one token per digit.
    pieces = [tok.tokenizer.id_to_token(i) for i in tok.encode("is 305", add_bos=False, add_eos=False)]
    assert pieces == ["is", "Ġ", "3", "0", "5"]
    again = make_hf_tokenizer(tmp_path / "again", vocab_size=447, split_digits=True)
    assert again.read_bytes() == path.read_bytes()
    split = [tok.tokenizer.id_to_token(i) for i in tok.encode("is 12345", add_bos=False, add_eos=False)]
    assert split == ["is", "Ġ", "1", "2", "3", "4", "5"]
    # Without the option a number keeps its space, as GPT-2's pre-tokenizer has it (the corpus's " 12345").
    plain = make_hf_tokenizer(tmp_path / "plain", vocab_size=447)
    plain_config = str(plain.parent / "tokenizer_config.json")
    plain_tok = HuggingFaceBaseTokenizer(str(plain), tokenizer_config_json_path=plain_config)
    ids = plain_tok.encode("is 12345", add_bos=False, add_eos=False)
    assert [plain_tok.tokenizer.id_to_token(i) for i in ids] == ["is", "Ġ12345"]
    assert plain_tok.decode(plain_tok.encode(TEXT)) == TEXT


@pytest.mark.parametrize("writer", [make_llama3_tokenizer, make_qwen2_5_tokenizer])
def test_byte_bpe_vocab_size_bounds(writer, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=256 is too small"):
        writer(tmp_path, vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size=5000 is too large for the tiny corpus"):
        writer(tmp_path, vocab_size=5000)
