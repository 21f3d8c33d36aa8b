"""Long-context evaluation: sliding-window perplexity, passkey retrieval, decoding and result files.

* :mod:`~longlora_tune.eval.perplexity`: LongLoRA ``eval.py`` windows and scores, token streams.
* :mod:`~longlora_tune.eval.passkey`: LongLoRA ``passkey_retrivial.py`` prompts, token-length targeting,
  scoring by the key's digits in the decoded answer (the answer tokenized after the prompt).
* :mod:`~longlora_tune.eval.decoding`: greedy / nucleus decoding with torchtune's KV cache and a
  streaming callback.
* :mod:`~longlora_tune.eval.model_loading`: the full-attention evaluation model from a merged HF
  checkpoint or base + unmerged adapter, with the RoPE factor of the training length.
* :mod:`~longlora_tune.eval.reporting`: JSON, CSV, table and PNG outputs.
* :mod:`~longlora_tune.eval.sweep`: the lengths of a run, kept as they finish when SIGINT/SIGTERM stops it.

The recipes ``recipes/longlora_eval_perplexity.py`` and ``longlora_eval_passkey.py`` and
the command ``python -m longlora_tune.eval.generate`` are built from these pieces.
"""

from longlora_tune.eval.decoding import generate, prepare_kv_cache, sample_next_token
from longlora_tune.eval.model_loading import eval_rope_factor, load_eval_model
from longlora_tune.eval.passkey import (
    PasskeyPrompt,
    PasskeyResult,
    answer_matches_key,
    build_prompts,
    evaluate_passkey,
    expected_answer,
    make_passkey_prompt,
    prompt_for_token_length,
    score_passkey,
)
from longlora_tune.eval.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    load_token_stream,
    score_window,
    select_windows,
    window_starts,
)
from longlora_tune.eval.reporting import format_table, plot_series, write_csv, write_json, write_results

__all__ = [
    "PasskeyPrompt",
    "PasskeyResult",
    "PerplexityResult",
    "answer_matches_key",
    "build_prompts",
    "eval_rope_factor",
    "evaluate_passkey",
    "evaluate_perplexity",
    "expected_answer",
    "format_table",
    "generate",
    "load_eval_model",
    "load_token_stream",
    "make_passkey_prompt",
    "plot_series",
    "prepare_kv_cache",
    "prompt_for_token_length",
    "sample_next_token",
    "score_passkey",
    "score_window",
    "select_windows",
    "window_starts",
    "write_csv",
    "write_json",
    "write_results",
]
