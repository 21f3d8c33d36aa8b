"""Sliding-window perplexity of a LongLoRA model at several context lengths (LongLoRA ``eval.py``).

Run with torchtune's CLI, on one process or sharded over GPUs with torchrun flags::

    tune run longlora_eval_perplexity \\
        --config eval/llama2_7b_100k_perplexity \\
        checkpoint_dir=/models/llama2-7b-longlora-100k/hf dataset.path=/data/proof-pile/test_sampled_data.bin
    tune run --nproc_per_node 8 longlora_eval_perplexity --config ...

The model uses full attention and the RoPE factor of the TRAINING length (``training_length`` or
``rope_scaling_factor``, else the checkpoint's ``rope_scaling``); see
:mod:`longlora_tune.eval.model_loading`. The protocol (window starts, scoring, edge cases) is documented
in :mod:`longlora_tune.eval.perplexity`. Writes ``<output_dir>/<output_name>.{json,csv,txt,png}`` and
prints the table (the ``.txt``).

A length the data is too short for is reported as skipped; when every length would be, the run stops with
a config error (exit 2) before loading the model and earlier results stay as they were. SIGINT or SIGTERM
writes the lengths finished so far, marked incomplete, and exits 130 or 143 (:mod:`longlora_tune.eval.sweep`).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from longlora_tune.config import loading
from longlora_tune.errors import LongLoRAConfigError, report_errors, signals_as_interrupts
from longlora_tune.eval.model_loading import (
    close_eval_runtime,
    eval_model_from_config,
    eval_runtime,
    tokenizer_from_config,
)
from longlora_tune.eval.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    load_token_stream,
    skip_reason,
)
from longlora_tune.eval.reporting import ReportLayout, report_sweep
from longlora_tune.eval.sweep import Sweep

_LAYOUT = ReportLayout(
    stem="perplexity",
    x_key="eval_length",
    y_key="perplexity",
    xlabel="evaluation context length (tokens)",
    ylabel="perplexity",
    title="Perplexity",
    columns=("eval_length", "num_windows", "perplexity", "token_perplexity", "loss"),
)


def _eval_lengths(cfg: DictConfig) -> list[int]:
    lengths = cfg.get("eval_lengths")
    if lengths is None or isinstance(lengths, (int, str)) or len(lengths) == 0:
        raise LongLoRAConfigError(
            f"eval_lengths must be a non-empty list such as [2048, 4096], got {lengths!r}"
        )
    out = []
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise LongLoRAConfigError(f"eval_lengths entries must be ints >= 2, got {length!r}")
        out.append(length)
    return out


class PerplexityRecipe:
    """Load model, tokenizer and data from the config, evaluate every length, write the results.

    Args:
        cfg: the recipe config (keys in ``configs/eval/*_perplexity.yaml``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.eval_lengths = _eval_lengths(cfg)
        self.stride = int(cfg.get("stride", 256))
        if self.stride < 1:
            raise LongLoRAConfigError(f"stride must be >= 1, got {self.stride}")
        self.max_windows = cfg.get("max_windows")
        if self.max_windows is not None and int(self.max_windows) < 1:
            raise LongLoRAConfigError(f"max_windows must be >= 1 or null, got {self.max_windows}")
        self.drop_last = bool(cfg.get("drop_last", True))
        if not cfg.get("output_dir"):
            raise LongLoRAConfigError("output_dir is not set; give a folder for the result files")

    def setup(self) -> None:
        """Device, process group, tokenizer, token stream and model.

        Raises:
            LongLoRAConfigError: for a missing or bad setting, or when the data is too short for every
                evaluation length (checked before the model is loaded).
        """
        cfg = self.cfg
        self.device, self.dtype, self.rank, self.world_size = eval_runtime(cfg)
        tokenizer = tokenizer_from_config(cfg)
        data_cfg = cfg.get("dataset")
        if not data_cfg or not data_cfg.get("source"):
            raise LongLoRAConfigError("dataset.source is not set; use bin, text or hf")
        data_kwargs = OmegaConf.to_container(data_cfg, resolve=True)
        self.stream = load_token_stream(tokenizer=tokenizer, **data_kwargs)
        num_tokens = int(self.stream.shape[0])
        reasons = [skip_reason(num_tokens, n, self.stride, self.drop_last) for n in self.eval_lengths]
        if all(reasons):
            raise LongLoRAConfigError(
                f"every evaluation length was skipped, so nothing was evaluated and the results in "
                f"{cfg.output_dir} are unchanged: {'; '.join(reasons)}; lower eval_lengths or use longer data"
            )
        self.model, self.model_info = eval_model_from_config(
            cfg, max_seq_len=max(self.eval_lengths), device=self.device, dtype=self.dtype
        )

    def evaluate(self) -> list[dict[str, Any]]:
        """Score every evaluation length; rank 0 writes the files and prints the table.

        Returns:
            The result rows (one dict per length).

        Raises:
            Interrupted: after writing the finished lengths, when SIGINT or SIGTERM stopped the sweep.
        """
        start = time.perf_counter()
        sweep: Sweep[PerplexityResult] = Sweep(self.eval_lengths)
        with sweep.until_interrupted() as finished:
            evaluate_perplexity(
                self.model,
                self.stream,
                self.eval_lengths,
                stride=self.stride,
                max_windows=None if self.max_windows is None else int(self.max_windows),
                drop_last=self.drop_last,
                device=self.device,
                logits_chunks=int(self.cfg.get("logits_chunks", 8)),
                rank=self.rank,
                world_size=self.world_size,
                progress=bool(self.cfg.get("progress", True)),
                on_result=finished.append,
            )
        return report_sweep(
            self.cfg,
            sweep,
            _LAYOUT,
            recipe="longlora_eval_perplexity",
            model_info=self.model_info,
            rank=self.rank,
            world_size=self.world_size,
            start=start,
            dataset=OmegaConf.to_container(self.cfg.dataset, resolve=True),
            num_stream_tokens=int(self.stream.shape[0]),
            stride=self.stride,
            max_windows=self.max_windows,
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
        recipe = PerplexityRecipe(cfg)
        recipe.setup()
        recipe.evaluate()
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
