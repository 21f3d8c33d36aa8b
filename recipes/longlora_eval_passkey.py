"""Passkey retrieval accuracy of a LongLoRA model at growing prompt lengths (``passkey_retrivial.py``).

Run with torchtune's CLI (add torchrun flags such as ``--nproc_per_node 8`` to spread trials over GPUs)::

    tune run longlora_eval_passkey \\
        --config eval/llama2_7b_100k_passkey \\
        checkpoint_dir=/models/llama2-7b-longlora-100k/hf

Prompts are exactly the reference's five-part text (:mod:`longlora_tune.eval.passkey`); lengths are in
tokens by default (``length_unit: chars`` gives the reference's filler character counts). ``lengths``
lists them, or ``interval`` and ``max_length`` give ``interval, 2*interval, ..., max_length``. Each length
runs ``num_trials`` trials with seeds 0..N-1; greedy decoding with a KV cache for the answer's tokens as
written after the prompt (a space token and the digits for a byte-level BPE); a trial passes when the
decoded answer's first number is the key. Writes ``<output_dir>/<output_name>.{json,csv,txt,png}`` and
prints the table (the ``.txt``). SIGINT or SIGTERM writes the lengths finished so far, marked incomplete,
and exits 130 or 143 (:mod:`longlora_tune.eval.sweep`).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from omegaconf import DictConfig

from longlora_tune.config import loading
from longlora_tune.errors import LongLoRAConfigError, report_errors, signals_as_interrupts
from longlora_tune.eval.model_loading import (
    close_eval_runtime,
    eval_model_from_config,
    eval_runtime,
    tokenizer_from_config,
)
from longlora_tune.eval.passkey import PasskeyResult, build_prompts, evaluate_passkey, expected_answer
from longlora_tune.eval.reporting import ReportLayout, report_sweep
from longlora_tune.eval.sweep import Sweep

_LAYOUT = ReportLayout(
    stem="passkey",
    x_key="mean_prompt_tokens",
    y_key="accuracy",
    xlabel="prompt length (tokens)",
    ylabel="passkey accuracy",
    title="Passkey retrieval",
    columns=("target_length", "mean_prompt_tokens", "num_trials", "num_passed", "accuracy"),
    y_limits=(-0.05, 1.05),
)


def _lengths(cfg: DictConfig) -> list[int]:
    lengths = cfg.get("lengths")
    if lengths is None:
        interval, max_length = cfg.get("interval"), cfg.get("max_length")
        if not interval or not max_length or int(interval) < 1 or int(max_length) < int(interval):
            raise LongLoRAConfigError(
                "set lengths: [...] or both interval and max_length (max_length >= interval >= 1); "
                f"got interval={interval!r} max_length={max_length!r}"
            )
        return list(range(int(interval), int(max_length) + 1, int(interval)))
    if isinstance(lengths, (int, str)) or len(lengths) == 0:
        raise LongLoRAConfigError(f"lengths must be a non-empty list such as [1000, 2000], got {lengths!r}")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise LongLoRAConfigError(f"lengths entries must be positive ints, got {length!r}")
    return list(lengths)


class PasskeyRecipe:
    """Build prompts, load the model, run every trial, write the results.

    Args:
        cfg: the recipe config (keys in ``configs/eval/*_passkey.yaml``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.lengths = _lengths(cfg)
        self.num_trials = int(cfg.get("num_trials", 10))
        self.length_unit = cfg.get("length_unit", "tokens")
        if self.length_unit not in ("tokens", "chars"):
            raise LongLoRAConfigError(f"length_unit must be tokens or chars, got {self.length_unit!r}")
        if self.num_trials < 1:
            raise LongLoRAConfigError(f"num_trials must be >= 1, got {self.num_trials}")
        if not cfg.get("output_dir"):
            raise LongLoRAConfigError("output_dir is not set; give a folder for the result files")

    def setup(self) -> None:
        """Device, process group, tokenizer, all prompts, then a model sized for the longest prompt."""
        cfg = self.cfg
        self.device, self.dtype, self.rank, self.world_size = eval_runtime(cfg)
        self.tokenizer = tokenizer_from_config(cfg)
        try:
            self.prompts = build_prompts(self.tokenizer, self.lengths, self.num_trials, self.length_unit)
        except ValueError as e:
            raise LongLoRAConfigError(str(e)) from e
        # The model must hold the longest prompt plus the tokens generated after it.
        max_seq_len = max(
            len(ids) + expected_answer(self.tokenizer, prompt, ids).max_new_tokens
            for trials in self.prompts
            for prompt, ids in trials
        )
        self.model, self.model_info = eval_model_from_config(
            cfg, max_seq_len=max_seq_len, device=self.device, dtype=self.dtype
        )

    def evaluate(self) -> list[dict[str, Any]]:
        """Run all trials; rank 0 writes the files and prints the table.

        Returns:
            The result rows (one dict per length).

        Raises:
            Interrupted: after writing the finished lengths, when SIGINT or SIGTERM stopped the sweep.
        """
        start = time.perf_counter()
        sweep: Sweep[PasskeyResult] = Sweep(self.lengths)
        with sweep.until_interrupted() as finished:
            # One call per length, so a stopped run keeps the lengths done. evaluate_passkey gives trial j
            # of a call to rank j % world_size: shifting the rank by the trials of the lengths before this
            # one keeps the round robin over the whole sweep, so the ranks share the trials as evenly as
            # one call for all lengths would (10 trials on 8 GPUs: 12-13 each, not 20 on ranks 0 and 1).
            for index, (length, trials) in enumerate(zip(self.lengths, self.prompts)):
                finished += evaluate_passkey(
                    self.model,
                    self.tokenizer,
                    [length],
                    [trials],
                    use_cache=bool(self.cfg.get("use_cache", True)),
                    prefill_chunk_size=int(self.cfg.get("prefill_chunk_size", 2048)),
                    device=self.device,
                    rank=(self.rank - index * self.num_trials) % self.world_size,
                    world_size=self.world_size,
                    progress=bool(self.cfg.get("progress", True)),
                )
        return report_sweep(
            self.cfg,
            sweep,
            _LAYOUT,
            recipe="longlora_eval_passkey",
            model_info=self.model_info,
            rank=self.rank,
            world_size=self.world_size,
            start=start,
            length_unit=self.length_unit,
            num_trials=self.num_trials,
            # What to make of the numbers (the tiny configs: a random model cannot retrieve the key).
            note=self.cfg.get("note", None),
        )

    def cleanup(self) -> None:
        """Leave the process group."""
        close_eval_runtime()


@report_errors
@loading.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point for ``tune run``.

    Args:
        cfg: the parsed config with command-line overrides applied.
    """
    with signals_as_interrupts():
        recipe = PasskeyRecipe(cfg)
        recipe.setup()
        recipe.evaluate()
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
