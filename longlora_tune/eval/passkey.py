"""Passkey retrieval, the protocol of LongLoRA's ``passkey_retrivial.py`` (docs/reference.md).

A prompt is five parts joined with ``"\\n"``: the task description, the first ``p`` characters of the
repeated filler, the key line, the first ``n - p`` characters of the filler, and the question. Trial
``i`` of a length uses seed ``i``: ``numpy.random.RandomState(i)`` draws ``p = randint(0, n)`` and then
``k = randint(1, 50000)``, the same draws (and order) as the reference's ``np.random.seed(i)``, so a
character count ``n`` gives exactly the reference's prompt.

Lengths are requested in TOKENS: :func:`prompt_for_token_length` searches the filler character count
``n`` whose prompt (BOS included, as the model reads it) has the most tokens not above the target,
measured with the evaluation tokenizer. The reference's character counts are available too
(``length_unit: chars``).

Scoring, by what the model means rather than by token ids (:func:`score_passkey`):

* The expected answer is the key as the tokenizer writes it after the question: the tokens of
  ``prompt + " " + k`` that follow the prompt's own tokens (:func:`expected_answer`). Byte-level BPE
  tokenizers (Llama 3's tiktoken, Qwen2.5's, SmolLM2's ``tokenizer.json``) write a space token and then
  the digits; ``str(k)`` encoded alone lacks the space, so a model answering ``" 43568"`` would be cut off
  and scored wrong. SentencePiece (Llama 2) writes its word-start piece either way, so its answer tokens
  are the reference's ``str(k)`` ones.
* Greedy decoding (KV cache) runs for as many tokens as that answer has, one more when its first token
  already holds a digit (a model may spend a token of its own on the space).
* A trial passes when the first run of digits in the decoded generation is the key
  (:func:`answer_matches_key`): ``" 43568"`` and ``"43568"`` both pass, ``"4356"`` and ``"435680"`` do not.
  The reference's criterion, the generated tokens equal the expected ones exactly, is recorded beside it.

Every trial is recorded (:class:`PasskeyTrial`: seed, key, expected and generated text and ids, prompt
length, where the key sat, pass and exact token match), so a result file shows what the model answered,
not only how often it was right; under torchrun the records of all ranks are gathered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from longlora_tune.eval.decoding import generate
from longlora_tune.eval.memory import eval_length_must_fit

__all__ = [
    "FILLER",
    "KEY_LINE",
    "QUESTION",
    "TASK_DESCRIPTION",
    "PasskeyAnswer",
    "PasskeyPrompt",
    "PasskeyResult",
    "PasskeyTrial",
    "answer_matches_key",
    "build_prompts",
    "evaluate_passkey",
    "expected_answer",
    "make_passkey_prompt",
    "prompt_for_token_length",
    "score_passkey",
]

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50_000
# ASCII digits, the ones a key is written in (\d would also run other scripts' digits into the number).
_DIGITS = re.compile(r"[0-9]+")


def _filler_prefix(num_chars: int) -> str:
    repeats = num_chars // (len(FILLER) + 1) + 1
    return " ".join([FILLER] * repeats)[:num_chars]


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt.

    Attributes:
        text: the prompt text.
        key: the pass key ``k`` in [1, 50000).
        position: filler characters before the key line (``p``).
        num_chars: total filler characters (``n``).
        seed: the trial seed.
    """

    text: str
    key: int
    position: int
    num_chars: int
    seed: int

    @property
    def answer(self) -> str:
        """The key's digits, the answer the question asks for."""
        return str(self.key)


def make_passkey_prompt(num_chars: int, seed: int) -> PasskeyPrompt:
    """Build the reference's passkey prompt with ``num_chars`` filler characters for trial ``seed``.

    Args:
        num_chars: total filler characters ``n`` (split at ``p`` around the key line).
        seed: trial seed (0..N-1).

    Returns:
        The prompt.

    Raises:
        ValueError: if ``num_chars`` < 1 or ``seed`` < 0.
    """
    if num_chars < 1:
        raise ValueError(f"num_chars must be >= 1, got {num_chars}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.RandomState(seed)
    position = int(rng.randint(0, num_chars))
    key = int(rng.randint(1, MAX_KEY))
    parts = [
        TASK_DESCRIPTION,
        _filler_prefix(position),
        KEY_LINE.format(key=key),
        _filler_prefix(num_chars - position),
        QUESTION,
    ]
    return PasskeyPrompt("\n".join(parts), key, position, num_chars, seed)


def _encode_as_read(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the model reads a prompt: BOS first, no EOS."""
    return tokenizer.encode(text, add_bos=True, add_eos=False)


def prompt_for_token_length(tokenizer: Any, target_tokens: int, seed: int) -> tuple[PasskeyPrompt, list[int]]:
    """Find the filler length whose prompt has the most tokens not above ``target_tokens``.

    The token count grows almost linearly with the filler characters: steps along the filler's
    characters-per-token ratio get within a few tokens, and a bisection over the last bracket finishes
    (about five tokenizations per prompt; 0.4 s per 100k-token prompt measured with the tiny test
    tokenizer).

    Args:
        tokenizer: tokenizer with ``encode(text, add_bos, add_eos)``.
        target_tokens: wanted prompt length in tokens, BOS included.
        seed: trial seed.

    Returns:
        ``(prompt, token ids)``; ``len(ids) <= target_tokens``, normally within a few tokens of it.

    Raises:
        ValueError: if even one filler character gives a prompt longer than ``target_tokens``.
    """

    def count(n: int) -> tuple[int, PasskeyPrompt, list[int]]:
        prompt = make_passkey_prompt(n, seed)
        ids = _encode_as_read(tokenizer, prompt.text)
        return len(ids), prompt, ids

    lo_tokens, lo_prompt, lo_ids = count(1)
    if lo_tokens > target_tokens:
        raise ValueError(
            f"target length {target_tokens} tokens is below the shortest passkey prompt ({lo_tokens} tokens)"
        )
    lo = 1
    chars_per_token = len(FILLER) / max(1, len(tokenizer.encode(FILLER, add_bos=False, add_eos=False)))
    guess = max(2, int((target_tokens - lo_tokens) * chars_per_token))
    hi = None
    # Linear steps bracket the answer: lo always fits, hi (once found) does not.
    for _ in range(8):
        t, p, ids = count(guess)
        if t <= target_tokens:
            lo, lo_tokens, lo_prompt, lo_ids = guess, t, p, ids
            if t == target_tokens:
                return p, ids
        else:
            hi = guess if hi is None else min(hi, guess)
        step = int((target_tokens - t) * chars_per_token)
        nxt = guess + (step if step else (1 if t < target_tokens else -1))
        if hi is not None:
            nxt = min(nxt, hi - 1)
        nxt = max(nxt, lo + 1)
        if hi is not None and nxt >= hi:
            break
        guess = nxt
    if hi is None:
        # Grow until the prompt no longer fits.
        hi = lo * 2
        while count(hi)[0] <= target_tokens:
            lo, hi = hi, hi * 2
        lo_tokens, lo_prompt, lo_ids = count(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t, p, ids = count(mid)
        if t <= target_tokens:
            lo, lo_tokens, lo_prompt, lo_ids = mid, t, p, ids
        else:
            hi = mid
    return lo_prompt, lo_ids


@dataclass(frozen=True)
class PasskeyAnswer:
    """The expected answer of one prompt, tokenized where the model writes it: right after the prompt.

    Attributes:
        ids: the answer's token ids: those of ``prompt + " " + key`` after the prompt's tokens (see
            :func:`expected_answer` for a tokenizer that merges across that boundary).
        text: ``ids`` decoded (``" 43568"`` for a byte-level BPE, ``"43568"`` for SentencePiece).
        in_context: whether the prompt's tokens were exactly the start of the tokens of prompt and answer.
        max_new_tokens: tokens to generate: ``len(ids)``, plus one when the first of them already holds a
            digit.
    """

    ids: list[int]
    text: str
    in_context: bool
    max_new_tokens: int


def expected_answer(tokenizer: Any, prompt: PasskeyPrompt, prompt_ids: Sequence[int]) -> PasskeyAnswer:
    """Tokenize the expected answer in context: the tokens ``prompt + " " + key`` adds to the prompt's.

    The space is what a model writes after "The pass key is"; a byte-level BPE gives it a token of its
    own, which the key's digits encoded alone do not have. When the tokenizer merges across the boundary
    (the prompt's tokens are not the start of the longer text's), the answer is every token after the
    longest common start, merged boundary token included, and ``in_context`` is False: the budget still
    covers the space and the digits, and only the recorded exact token match loses its meaning (the
    prompt the model reads ends with the unmerged token).

    One token is added to the generation budget when the answer's first token already holds a digit
    (a space merged into the digits, or no space at all), because a model that writes the space as a
    token of its own would otherwise run out of tokens one digit early.

    Args:
        tokenizer: the tokenizer that made ``prompt_ids``, with ``encode(text, add_bos, add_eos)`` and
            ``decode(ids)``.
        prompt: the prompt (its text and key).
        prompt_ids: the prompt's token ids, BOS included, as the model reads them.

    Returns:
        The answer's ids and text, whether it was tokenized in context, and the generation budget.
    """
    prompt_ids = list(prompt_ids)
    full = _encode_as_read(tokenizer, f"{prompt.text} {prompt.answer}")
    common = 0
    while common < min(len(full), len(prompt_ids)) and full[common] == prompt_ids[common]:
        common += 1
    ids = full[common:]
    margin = 1 if _DIGITS.search(tokenizer.decode(ids[:1])) else 0
    return PasskeyAnswer(
        ids=ids,
        text=tokenizer.decode(ids),
        in_context=common == len(prompt_ids),
        max_new_tokens=len(ids) + margin,
    )


def answer_matches_key(generated: str, key: int) -> bool:
    """Whether a decoded generation answers ``key``: its first run of digits is the key's digits.

    Leading whitespace, a word-start piece or punctuation around the number do not matter; a number cut
    short or running on (``"4356"``, ``"435680"`` for 43568) does.

    Args:
        generated: the decoded generation.
        key: the pass key.

    Returns:
        True when the first run of ASCII digits in ``generated`` equals ``str(key)``.
    """
    digits = _DIGITS.search(generated)
    return digits is not None and digits.group() == str(key)


@dataclass
class PasskeyTrial:
    """One passkey trial: what was asked and what the model answered.

    Attributes:
        seed: the trial seed (draws the key and its position; the same seed gives the same prompt).
        key: the expected pass key.
        expected: the expected answer text as tokenized after the prompt (:attr:`PasskeyAnswer.text`).
        generated: the decoded greedy answer (:attr:`PasskeyAnswer.max_new_tokens` tokens).
        expected_ids: token ids of the expected answer.
        generated_ids: token ids the model generated.
        prompt_tokens: prompt length in tokens, BOS included.
        position: filler characters before the key line.
        num_chars: filler characters in the prompt (``n``).
        depth: ``position / num_chars``: where the key sat (0 = right after the task, 1 = at the question).
        passed: whether the generation's first run of digits is the key (:func:`answer_matches_key`).
        token_match: whether the generated ids start with the expected ids (the reference's criterion).
        expected_in_context: :attr:`PasskeyAnswer.in_context`.
    """

    seed: int
    key: int
    expected: str
    generated: str
    expected_ids: list[int]
    generated_ids: list[int]
    prompt_tokens: int
    position: int
    num_chars: int
    depth: float
    passed: bool
    token_match: bool
    expected_in_context: bool


@torch.inference_mode()
def score_passkey(
    model: nn.Module,
    tokenizer: Any,
    prompt: PasskeyPrompt,
    prompt_ids: Sequence[int],
    *,
    use_cache: bool = True,
    prefill_chunk_size: int = 2048,
    device: torch.device | str | None = None,
) -> PasskeyTrial:
    """Run one trial: greedy-decode the answer's budget of tokens and check the decoded digits.

    Args:
        model: decoder in eval mode (full attention).
        tokenizer: the tokenizer that made ``prompt_ids``.
        prompt: the prompt (its text, key and where the key sits).
        prompt_ids: prompt token ids (BOS included).
        use_cache: decode with a KV cache.
        prefill_chunk_size: prompt tokens per forward pass when filling the cache.
        device: device of the model inputs.

    Returns:
        The trial's record.
    """
    answer = expected_answer(tokenizer, prompt, prompt_ids)
    generated_ids = generate(
        model,
        prompt_ids,
        max_new_tokens=answer.max_new_tokens,
        temperature=0.0,
        use_cache=use_cache,
        prefill_chunk_size=prefill_chunk_size,
        device=device,
    )
    generated = tokenizer.decode(generated_ids)
    return PasskeyTrial(
        seed=prompt.seed,
        key=prompt.key,
        expected=answer.text,
        generated=generated,
        expected_ids=answer.ids,
        generated_ids=generated_ids,
        prompt_tokens=len(prompt_ids),
        position=prompt.position,
        num_chars=prompt.num_chars,
        depth=prompt.position / prompt.num_chars,
        passed=answer_matches_key(generated, prompt.key),
        token_match=generated_ids[: len(answer.ids)] == answer.ids,
        expected_in_context=answer.in_context,
    )


@dataclass
class PasskeyResult:
    """Accuracy at one requested length.

    Attributes:
        target_length: requested length (tokens, or characters with ``length_unit="chars"``).
        mean_prompt_tokens: mean prompt length in tokens over the trials (the reference's x-axis).
        min_prompt_tokens: shortest prompt.
        max_prompt_tokens: longest prompt.
        num_trials: trials run.
        num_passed: trials whose answer held the key (:attr:`PasskeyTrial.passed`).
        accuracy: ``num_passed / num_trials``.
        trials: every trial of this length, in seed order.
    """

    target_length: int
    mean_prompt_tokens: float
    min_prompt_tokens: int
    max_prompt_tokens: int
    num_trials: int
    num_passed: int
    accuracy: float
    trials: list[PasskeyTrial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (``trials`` is a list of dicts; CSV writers leave it out)."""
        return asdict(self)


def build_prompts(
    tokenizer: Any, lengths: Sequence[int], num_trials: int, length_unit: str = "tokens"
) -> list[list[tuple[PasskeyPrompt, list[int]]]]:
    """All prompts of a sweep: ``num_trials`` (seeds 0..N-1) per length.

    Args:
        tokenizer: evaluation tokenizer.
        lengths: requested lengths.
        num_trials: trials per length.
        length_unit: ``"tokens"`` (prompt length in tokens) or ``"chars"`` (filler characters ``n``, the
            reference's unit).

    Returns:
        Per length, the list of ``(prompt, token ids)``.

    Raises:
        ValueError: for an unknown unit or ``num_trials`` < 1.
    """
    if length_unit not in ("tokens", "chars"):
        raise ValueError(f"length_unit must be 'tokens' or 'chars', got {length_unit!r}")
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    sweep = []
    for length in lengths:
        trials = []
        for seed in range(num_trials):
            if length_unit == "tokens":
                trials.append(prompt_for_token_length(tokenizer, int(length), seed))
            else:
                prompt = make_passkey_prompt(int(length), seed)
                trials.append((prompt, _encode_as_read(tokenizer, prompt.text)))
        sweep.append(trials)
    return sweep


def evaluate_passkey(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    prompts: Sequence[Sequence[tuple[PasskeyPrompt, list[int]]]],
    *,
    use_cache: bool = True,
    prefill_chunk_size: int = 2048,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[PasskeyResult]:
    """Run every trial and report accuracy per length.

    Trials are numbered over the whole sweep and trial ``j`` runs on rank ``j % world_size``; the trial
    records of all ranks are gathered when ``world_size`` > 1, so every rank returns the full results.

    Args:
        model: decoder in eval mode (full attention), ``max_seq_len`` >= longest prompt + answer.
        tokenizer: the evaluation tokenizer.
        lengths: the requested lengths (labels of the results).
        prompts: per length, ``(prompt, ids)`` pairs from :func:`build_prompts`.
        use_cache: decode with a KV cache.
        prefill_chunk_size: prompt tokens per forward pass when filling the cache.
        device: device of the model inputs.
        rank: this process's rank.
        world_size: number of processes.
        progress: show a progress bar (rank 0 only).

    Returns:
        One :class:`PasskeyResult` per length, each with its :class:`PasskeyTrial` records.
    """
    jobs = [(li, ti) for li, trials in enumerate(prompts) for ti in range(len(trials))]
    mine = jobs[rank::world_size]
    records: dict[tuple[int, int], PasskeyTrial] = {}
    bar = tqdm(mine, desc="passkey", disable=not progress or rank != 0, unit="trial")
    for li, ti in bar:
        prompt, ids = prompts[li][ti]
        with eval_length_must_fit(len(ids), "lower lengths or prefill_chunk_size"):
            records[(li, ti)] = score_passkey(
                model,
                tokenizer,
                prompt,
                ids,
                use_cache=use_cache,
                prefill_chunk_size=prefill_chunk_size,
                device=device,
            )
        bar.set_postfix(length=len(ids))
    if world_size > 1:
        # Objects, not tensors: the records hold text. gloo and nccl both gather objects.
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, records)
        records = {k: v for part in gathered for k, v in part.items()}
    results = []
    for li, length in enumerate(lengths):
        trials = [records[(li, ti)] for ti in range(len(prompts[li]))]
        counts = [t.prompt_tokens for t in trials]
        num_passed = sum(t.passed for t in trials)
        results.append(
            PasskeyResult(
                target_length=int(length),
                mean_prompt_tokens=float(np.mean(counts)),
                min_prompt_tokens=min(counts),
                max_prompt_tokens=max(counts),
                num_trials=len(counts),
                num_passed=num_passed,
                accuracy=num_passed / len(counts),
                trials=trials,
            )
        )
    return results
