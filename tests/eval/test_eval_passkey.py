"""Passkey prompts (exact reference text, token-length targeting), scoring per tokenizer, KV-cache decode."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

from longlora_tune.eval.decoding import generate, sample_next_token
from longlora_tune.eval.model_loading import load_eval_model
from longlora_tune.eval.passkey import (
    answer_matches_key,
    build_prompts,
    evaluate_passkey,
    expected_answer,
    make_passkey_prompt,
    prompt_for_token_length,
    score_passkey,
)
from longlora_tune.eval.perplexity import evaluate_perplexity
from longlora_tune.quickstart.tiny import (
    make_hf_tokenizer,
    make_llama3_tokenizer,
    make_qwen2_5_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reference_prompt(n_garbage: int, seed: int) -> tuple[str, str]:
    """The reference's prompt, written out from docs/reference.md (numpy legacy seeding, p then k)."""
    np.random.seed(seed)
    p = np.random.randint(0, n_garbage)
    filler = " ".join(
        ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 5000
    )
    k = np.random.randint(1, 50000)
    lines = [
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.",
        filler[:p],
        f"The pass key is {k}. Remember it. {k} is the pass key.",
        filler[: n_garbage - p],
        "What is the pass key? The pass key is",
    ]
    return "\n".join(lines), str(k)


@pytest.mark.parametrize("n_chars,seed", [(1, 0), (500, 3), (3840, 9), (60000, 1)])
def test_prompt_is_the_reference_text(n_chars: int, seed: int) -> None:
    prompt = make_passkey_prompt(n_chars, seed)
    text, answer = _reference_prompt(n_chars, seed)
    assert prompt.text == text and prompt.answer == answer
    assert 0 <= prompt.position < n_chars and 1 <= prompt.key < 50000
    parts = prompt.text.split("\n")
    assert len(parts) == 5
    key_line = f"The pass key is {prompt.key}. Remember it. {prompt.key} is the pass key."
    assert parts[2] == key_line and prompt.text.count(key_line) == 1
    # The key's digits occur only in the key line (the filler and question hold no digits).
    assert [m.start() for m in re.finditer(str(prompt.key), prompt.text)] == [
        prompt.text.index(key_line) + key_line.index(str(prompt.key)),
        prompt.text.index(key_line) + key_line.rindex(str(prompt.key)),
    ]


def test_prompts_hit_token_targets(tiny_tokenizer) -> None:
    for target in (150, 333, 1000, 4096):
        for seed in (0, 1):
            prompt, ids = prompt_for_token_length(tiny_tokenizer, target, seed)
            assert ids == tiny_tokenizer.encode(prompt.text, add_bos=True, add_eos=False)
            assert target - 3 <= len(ids) <= target, (target, seed, len(ids))
            assert prompt.text.count(f"The pass key is {prompt.key}.") == 1
    with pytest.raises(ValueError, match="shortest passkey prompt"):
        prompt_for_token_length(tiny_tokenizer, 20, 0)


class KeyOracle(nn.Module):
    """A stand-in decoder that reads the key from the prompt and puts the answer's tokens next.

    It honours the interface of :func:`generate`: ``forward(tokens, input_pos=None, mask=None)`` returning
    ``[1, s, vocab]`` logits, plus the KV-cache methods (it tracks the tokens it has seen as its "cache").
    ``answer_ids(key)`` gives the tokens it answers with (default: ``str(key)`` encoded alone); once they
    are out it repeats the last one.
    """

    def __init__(
        self, tokenizer, vocab_size: int, answer_ids: Callable[[int], list[int]] | None = None
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.answer_ids = answer_ids or (lambda key: tokenizer.encode(str(key), add_bos=False, add_eos=False))
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device and dtype
        self.seen: list[int] = []
        self.decoder_max_cache_seq_len = None

    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, decoder_max_seq_len: int) -> None:
        self.decoder_max_cache_seq_len = decoder_max_seq_len
        self.seen = []

    def caches_are_setup(self) -> bool:
        return self.decoder_max_cache_seq_len is not None

    def caches_are_enabled(self) -> bool:
        return self.caches_are_setup()

    def reset_caches(self) -> None:
        self.seen = []

    def forward(self, tokens: torch.Tensor, input_pos=None, mask=None) -> torch.Tensor:
        if input_pos is None:  # no cache: the full sequence every time
            self.seen = []
        self.seen += tokens[0].tolist()
        logits = torch.zeros(1, tokens.shape[1], self.vocab_size)
        text = self.tokenizer.decode(self.seen)
        key = re.search(r"The pass key is (\d+)\.", text)
        if key is None or "What is the pass key? The pass key is" not in text:
            return logits  # still inside the prompt (chunked prefill)
        answer = self.answer_ids(int(key.group(1)))
        prompt_text = text[: text.rindex("The pass key is") + len("The pass key is")]
        emitted = len(self.seen) - len(self.tokenizer.encode(prompt_text, add_bos=True, add_eos=False))
        logits[0, -1, answer[min(emitted, len(answer) - 1)]] = 1.0
        return logits


def test_oracle_scores_full_marks_and_random_model_zero(tiny_ckpt: Path, tiny_tokenizer) -> None:
    lengths = [160, 300]
    prompts = build_prompts(tiny_tokenizer, lengths, num_trials=3)
    oracle = KeyOracle(tiny_tokenizer, vocab_size=512)
    for use_cache in (True, False):
        results = evaluate_passkey(
            oracle, tiny_tokenizer, lengths, prompts, use_cache=use_cache, progress=False
        )
        assert [r.accuracy for r in results] == [1.0, 1.0]
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=320, training_length=320)
    results = evaluate_passkey(model, tiny_tokenizer, lengths, prompts, prefill_chunk_size=64, progress=False)
    assert [r.num_passed for r in results] == [0, 0]
    assert [r.num_trials for r in results] == [3, 3]
    assert results[1].mean_prompt_tokens == pytest.approx(np.mean([len(ids) for _, ids in prompts[1]]))


def test_every_trial_is_recorded_with_what_the_model_answered(tiny_ckpt: Path, tiny_tokenizer) -> None:
    lengths = [160, 300]
    prompts = build_prompts(tiny_tokenizer, lengths, num_trials=3)
    oracle = KeyOracle(tiny_tokenizer, vocab_size=512)
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=320, training_length=320)
    for decoder, should_pass in ((oracle, True), (model, False)):
        results = evaluate_passkey(
            decoder, tiny_tokenizer, lengths, prompts, prefill_chunk_size=64, progress=False
        )
        for result, trials in zip(results, prompts, strict=True):
            assert [t.seed for t in result.trials] == [0, 1, 2]
            assert result.num_passed == sum(t.passed for t in result.trials)
            for record, (prompt, ids) in zip(result.trials, trials, strict=True):
                assert (record.key, record.expected) == (prompt.key, str(prompt.key))
                assert record.expected_ids == tiny_tokenizer.encode(
                    str(prompt.key), add_bos=False, add_eos=False
                )
                assert len(record.generated_ids) == len(record.expected_ids)
                assert record.generated == tiny_tokenizer.decode(record.generated_ids)
                assert record.prompt_tokens == len(ids)
                assert (record.position, record.num_chars) == (prompt.position, prompt.num_chars)
                assert record.depth == pytest.approx(prompt.position / prompt.num_chars)
                assert record.passed is should_pass
                assert (record.generated == record.expected) is should_pass
    # The records serialise as plain JSON inside the result row.
    row = results[0].to_dict()
    assert json.loads(json.dumps(row))["trials"][1]["seed"] == 1


# Family tokenizers: (name, whether it is a byte-level BPE). Byte-level ones write a space token before
# the key's digits; SentencePiece writes its word-start piece.
FAMILIES = [("llama2", False), ("llama3", True), ("qwen2_5", True), ("hf_tokenizer_json", True)]
ORACLE_VOCAB = 1024  # above every id of the tiny tokenizers (compact special ids included)


@pytest.fixture(scope="module", params=FAMILIES, ids=[name for name, _ in FAMILIES])
def family_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """``(tokenizer, byte_level)`` for each tokenizer format the project evaluates, built from tiny files."""
    name, byte_level = request.param
    out = tmp_path_factory.mktemp(name)
    if name == "llama2":
        return request.getfixturevalue("tiny_tokenizer"), byte_level
    if name == "llama3":
        path = make_llama3_tokenizer(out)
        tok = llama3_tokenizer(
            str(path), special_tokens_path=str(out / "special_tokens.json"), prompt_template=None
        )
    elif name == "qwen2_5":
        vocab, merges = make_qwen2_5_tokenizer(out)
        special = str(out / "special_tokens.json")
        tok = qwen2_5_tokenizer(str(vocab), str(merges), special_tokens_path=special, prompt_template=None)
    else:
        path = make_hf_tokenizer(out, split_digits=True)
        tok = HuggingFaceBaseTokenizer(
            str(path), tokenizer_config_json_path=str(out / "tokenizer_config.json")
        )
    return tok, byte_level


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False, add_eos=False)


def test_expected_answer_is_tokenized_after_the_prompt(family_tokenizer) -> None:
    tok, byte_level = family_tokenizer
    for seed in range(3):
        prompt, ids = prompt_for_token_length(tok, 200, seed)
        key = str(prompt.key)
        answer = expected_answer(tok, prompt, ids)
        assert ids + answer.ids == tok.encode(f"{prompt.text} {key}", add_bos=True, add_eos=False)
        assert answer.in_context
        # The first answer token is the space (or SentencePiece's bare word-start piece): the budget covers
        # it and needs no extra token.
        assert tok.decode(answer.ids[:1]).strip() == ""
        assert answer.max_new_tokens == len(answer.ids)
        if byte_level:
            assert answer.text == f" {key}"
            assert answer.ids == _encode(tok, " ") + _encode(tok, key)
            assert answer.ids != _encode(tok, key)  # the digits alone, as the reference encodes them
        else:
            assert answer.text == key
            assert answer.ids == _encode(tok, key)  # Llama 2: the reference's answer tokens


def test_passkey_passes_on_the_key_the_model_means(family_tokenizer) -> None:
    tok, byte_level = family_tokenizer
    prompts = build_prompts(tok, [200], num_trials=3)
    # (what the model answers, passes, exact token match). A trailing "." ends the number (the oracle
    # repeats its last token).
    cases = [
        (lambda k: f" {k}.", True, True),  # as the tokenizer writes it after the prompt
        (lambda k: f"{k}.", True, not byte_level),  # no space: the same digits
        (lambda k: f" {k + 1}.", False, False),  # a wrong key
    ]
    for answer_text, passes, token_match in cases:
        oracle = KeyOracle(tok, ORACLE_VOCAB, answer_ids=lambda k, text=answer_text: _encode(tok, text(k)))
        (result,) = evaluate_passkey(oracle, tok, [200], prompts, progress=False)
        assert result.num_passed == (3 if passes else 0)
        for record, (prompt, ids) in zip(result.trials, prompts[0], strict=True):
            answer = expected_answer(tok, prompt, ids)
            assert (record.key, record.expected, record.expected_ids) == (prompt.key, answer.text, answer.ids)
            # The budget's worth of the model's answer, decoded as it wrote it.
            assert record.generated_ids == _encode(tok, answer_text(prompt.key))[: answer.max_new_tokens]
            assert record.generated == tok.decode(record.generated_ids)
            assert (record.passed, record.token_match, record.expected_in_context) == (
                passes,
                token_match,
                True,
            )


@pytest.mark.parametrize(
    "generated,passes",
    [
        (" 43568", True),
        ("43568", True),
        ("\n43568.", True),
        ("▁43568 is", True),
        ("is 43568", True),
        (" 4356", False),  # cut short
        (" 435680", False),  # runs on
        (" 1 43568", False),  # another number first
        (" forty-three", False),
        ("", False),
    ],
)
def test_answer_matches_key_compares_the_first_number(generated: str, passes: bool) -> None:
    assert answer_matches_key(generated, 43568) is passes


class PieceTokenizer:
    """A greedy longest-match tokenizer over ASCII characters and a few multi-character pieces (BOS = 0).

    It makes the tokenizations no tiny family tokenizer has: a piece across the prompt/answer boundary
    (``"s "``) or a space merged into a digit (``" 4"``).
    """

    bos_id = 0

    def __init__(self, pieces: list[str]) -> None:
        self.vocab = ["<s>", *pieces, "\n", *map(chr, range(32, 127))]
        self.pieces = sorted(pieces, key=len, reverse=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids, i = [self.bos_id] if add_bos else [], 0
        while i < len(text):
            piece = next((p for p in self.pieces if text.startswith(p, i)), text[i])
            ids.append(self.vocab.index(piece))
            i += len(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i != self.bos_id)


def test_a_piece_across_the_boundary_falls_back_to_the_tokens_after_the_common_start() -> None:
    tok = PieceTokenizer(["s "])
    prompt = make_passkey_prompt(300, 0)
    key = str(prompt.key)
    ids = tok.encode(prompt.text)
    answer = expected_answer(tok, prompt, ids)
    # "...key is" ends with "s"; with the answer the tokenizer writes "s " instead, so the answer starts
    # one token early and the budget covers the space and every digit.
    assert not answer.in_context
    assert answer.ids == tok.encode(f"s {key}", add_bos=False) and answer.text == f"s {key}"
    assert answer.max_new_tokens == len(key) + 1
    oracle = KeyOracle(tok, ORACLE_VOCAB, answer_ids=lambda k: tok.encode(f" {k}.", add_bos=False))
    trial = score_passkey(oracle, tok, prompt, ids)
    assert trial.generated == f" {key}" and trial.passed
    assert not trial.token_match and not trial.expected_in_context


def test_a_space_merged_into_the_first_digit_gets_one_more_token() -> None:
    tok = PieceTokenizer([f" {d}" for d in "0123456789"])
    prompt = make_passkey_prompt(300, 0)
    key = str(prompt.key)
    ids = tok.encode(prompt.text)
    answer = expected_answer(tok, prompt, ids)
    assert answer.in_context and answer.ids == tok.encode(f" {key}", add_bos=False)
    assert len(answer.ids) == len(key) and answer.max_new_tokens == len(key) + 1
    space, digits = tok.encode(" ", add_bos=False), [tok.encode(d, add_bos=False)[0] for d in key]
    period = tok.encode(".", add_bos=False)
    # A model writing the space as its own token still gets every digit out.
    oracle = KeyOracle(tok, ORACLE_VOCAB, answer_ids=lambda k: space + digits + period)
    trial = score_passkey(oracle, tok, prompt, ids)
    assert (trial.generated, trial.passed, trial.token_match) == (f" {key}", True, False)
    # One writing it as the tokenizer does passes with an exact token match.
    oracle = KeyOracle(tok, ORACLE_VOCAB, answer_ids=lambda k: tok.encode(f" {k}.", add_bos=False))
    trial = score_passkey(oracle, tok, prompt, ids)
    assert (trial.generated, trial.passed, trial.token_match) == (f" {key}.", True, True)


def test_kv_cache_greedy_equals_full_recompute(tiny_ckpt: Path) -> None:
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=128, training_length=128)
    prompt = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        direct_first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    no_cache = generate(model, prompt, max_new_tokens=16, use_cache=False)
    assert no_cache[0] == direct_first
    # Prefill in uneven chunks so chunk boundaries, the cache and the masks are all exercised.
    cached = generate(model, prompt, max_new_tokens=16, use_cache=True, prefill_chunk_size=23)
    assert cached == no_cache and len(cached) == 16
    # The set-up cache is reused for a second, shorter prompt, and the no-cache path still works after it.
    again = generate(model, prompt[:40], max_new_tokens=8, use_cache=True, prefill_chunk_size=16)
    assert again == generate(model, prompt[:40], max_new_tokens=8, use_cache=False)
    # Perplexity after a cached decode is unchanged (a leftover cache would make torchtune non-causal).
    stream = np.array(prompt * 2)
    before = evaluate_perplexity(model, stream, [32], stride=16, progress=False)[0].perplexity
    generate(model, prompt[:10], max_new_tokens=2, use_cache=True)
    assert evaluate_perplexity(model, stream, [32], stride=16, progress=False)[0].perplexity == before


def test_sampling_filters() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    assert sample_next_token(logits) == 0
    gen = torch.Generator().manual_seed(0)
    # top_p=0.5: only the most likely token (p ~ 0.72) survives.
    assert {sample_next_token(logits, temperature=1.0, top_p=0.5, generator=gen) for _ in range(50)} == {0}
    # top_k=2: tokens 2 and 3 never appear; both of the top two do.
    draws = {sample_next_token(logits, temperature=2.0, top_k=2, generator=gen) for _ in range(200)}
    assert draws == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_passkey_recipe_via_tune_run(tmp_path: Path, tiny_ckpt: Path, tiny_tokenizer, nproc: int) -> None:
    out = tmp_path / "out"
    cmd = [
        "tune",
        "run",
        *(["--nproc_per_node", str(nproc)] if nproc > 1 else []),
        "longlora_eval_passkey",
        "--config",
        "eval/tiny_passkey",
        f"checkpoint_dir={tiny_ckpt}",
        "training_length=512",
        "lengths=[160,256]",
        "num_trials=2",
        f"output_dir={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    result = json.loads((out / "passkey.json").read_text())
    assert result["model"]["rope_scaling_factor"] == 8.0  # ceil(512 / 64) from training_length
    assert [r["target_length"] for r in result["results"]] == [160, 256]
    for row in result["results"]:
        assert row["num_trials"] == 2 and row["num_passed"] == 0
        assert row["target_length"] - 3 <= row["mean_prompt_tokens"] <= row["target_length"]
    csv_text = (out / "passkey.csv").read_text().splitlines()
    assert csv_text[0].startswith("target_length,") and len(csv_text) == 3
    assert "trials" not in csv_text[0].split(",")  # the per-trial records are in the JSON file only
    assert (out / "passkey.png").read_bytes()[:8] == PNG_MAGIC

    # Per-trial records: every trial of every length, in seed order, gathered from all ranks, with the
    # answers the model gave (the same greedy answers as decoding here in one process).
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=270, training_length=512)
    prompts = build_prompts(tiny_tokenizer, [160, 256], num_trials=2)
    expected = evaluate_passkey(
        model, tiny_tokenizer, [160, 256], prompts, prefill_chunk_size=64, progress=False
    )
    for row, want in zip(result["results"], expected, strict=True):
        assert [t["seed"] for t in row["trials"]] == [0, 1]
        for trial, want_trial in zip(row["trials"], want.trials, strict=True):
            assert trial["key"] == want_trial.key and trial["expected"] == str(want_trial.key)
            assert trial["generated_ids"] == want_trial.generated_ids
            assert trial["generated"] == tiny_tokenizer.decode(trial["generated_ids"])
            assert trial["prompt_tokens"] == want_trial.prompt_tokens
            assert trial["passed"] is False
        assert row["mean_prompt_tokens"] == pytest.approx(
            np.mean([t["prompt_tokens"] for t in row["trials"]])
        )


def test_a_signalled_passkey_run_writes_the_finished_lengths_marked_incomplete(
    tmp_path: Path, tiny_ckpt: Path, run_eval_recipe_signalled
) -> None:
    out = tmp_path / "out"
    # Two trials per length: the 3rd trial scored is the first of length 256, where SIGINT arrives.
    proc = run_eval_recipe_signalled(
        "longlora_eval_passkey",
        "eval/tiny_passkey",
        f"checkpoint_dir={tiny_ckpt}",
        "training_length=512",
        "lengths=[160,256]",
        "num_trials=2",
        f"output_dir={out}",
        signal_in="longlora_tune.eval.passkey.score_passkey",
        on_call=3,
        signum=2,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback
    assert lines[0].startswith("longlora_tune: stopped by SIGINT; 1 of 2 lengths finished")
    result = json.loads((out / "passkey.json").read_text())
    assert result["incomplete"] == "stopped by SIGINT after 1 of 2 lengths; not evaluated: 256"
    assert [(r["target_length"], r["num_trials"]) for r in result["results"]] == [(160, 2)]
    assert f"incomplete: {result['incomplete']}" in proc.stdout.splitlines()
