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

Scoring: greedy decoding (KV cache) for as many tokens as the answer has; a trial passes when the
generated tokens equal the answer's tokens exactly. The answer is ``str(k)`` encoded without BOS/EOS
(SentencePiece adds the word-start piece, which is what follows ``"... The pass key is"``).

Every trial is recorded (:class:`PasskeyTrial`: seed, expected key, generated text and ids, prompt
length, where the key sat, match), so a result file shows what the model answered, not only how often it
was right; under torchrun the records of all ranks are gathered.
"""

from __future__ import annotations

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
    "PasskeyPrompt",
    "PasskeyResult",
    "PasskeyTrial",
    "build_prompts",
    "evaluate_passkey",
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
        """The expected answer text."""
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


def _prompt_tokens(tokenizer: Any, prompt: PasskeyPrompt) -> list[int]:
    return tokenizer.encode(prompt.text, add_bos=True, add_eos=False)


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
        ids = _prompt_tokens(tokenizer, prompt)
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


@torch.inference_mode()
def score_passkey(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    answer: str,
    *,
    use_cache: bool = True,
    prefill_chunk_size: int = 2048,
    device: torch.device | str | None = None,
) -> tuple[bool, list[int], list[int]]:
    """Greedy-decode as many tokens as the answer has and compare token by token.

    Args:
        model: decoder in eval mode (full attention).
        tokenizer: the tokenizer that made ``prompt_ids``.
        prompt_ids: prompt token ids (BOS included).
        answer: expected answer text (the key).
        use_cache: decode with a KV cache.
        prefill_chunk_size: prompt tokens per forward pass when filling the cache.
        device: device of the model inputs.

    Returns:
        ``(passed, generated ids, answer ids)``.
    """
    answer_ids = tokenizer.encode(answer, add_bos=False, add_eos=False)
    out = generate(
        model,
        prompt_ids,
        max_new_tokens=len(answer_ids),
        temperature=0.0,
        use_cache=use_cache,
        prefill_chunk_size=prefill_chunk_size,
        device=device,
    )
    return out == answer_ids, out, answer_ids


@dataclass
class PasskeyTrial:
    """One passkey trial: what was asked and what the model answered.

    Attributes:
        seed: the trial seed (draws the key and its position; the same seed gives the same prompt).
        key: the expected pass key.
        expected: the expected answer text (``str(key)``).
        generated: the decoded greedy answer (as many tokens as the expected answer has).
        expected_ids: token ids of the expected answer.
        generated_ids: token ids the model generated.
        prompt_tokens: prompt length in tokens, BOS included.
        position: filler characters before the key line.
        num_chars: filler characters in the prompt (``n``).
        depth: ``position / num_chars``: where the key sat (0 = right after the task, 1 = at the question).
        passed: whether the generated ids equal the expected ids.
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


@dataclass
class PasskeyResult:
    """Accuracy at one requested length.

    Attributes:
        target_length: requested length (tokens, or characters with ``length_unit="chars"``).
        mean_prompt_tokens: mean prompt length in tokens over the trials (the reference's x-axis).
        min_prompt_tokens: shortest prompt.
        max_prompt_tokens: longest prompt.
        num_trials: trials run.
        num_passed: trials whose answer matched exactly.
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
                trials.append((prompt, _prompt_tokens(tokenizer, prompt)))
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
            ok, generated, expected = score_passkey(
                model,
                tokenizer,
                ids,
                prompt.answer,
                use_cache=use_cache,
                prefill_chunk_size=prefill_chunk_size,
                device=device,
            )
        records[(li, ti)] = PasskeyTrial(
            seed=prompt.seed,
            key=prompt.key,
            expected=prompt.answer,
            generated=tokenizer.decode(generated),
            expected_ids=list(expected),
            generated_ids=list(generated),
            prompt_tokens=len(ids),
            position=prompt.position,
            num_chars=prompt.num_chars,
            depth=prompt.position / prompt.num_chars,
            passed=bool(ok),
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
