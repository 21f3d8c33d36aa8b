"""The family record is the only place that knows a family.

A made-up Llama-architecture family with a ``config.json`` ``model_type`` of its own is registered in
:data:`longlora_tune.models.families.FAMILIES` only (its builder is Llama 3's, as a new family's builder
module would be). Detection, the tiny checkpoint, the checkpoint reader, evaluation loading, ``generate``'s
prompt choice and the merged export then all work for it with no other library file edited: the proof that a
new family needs its record, its builder module and its shapes and nothing else. References are
independent: transformers' ``LlamaForCausalLM`` on the same weights, and the tiny checkpoint's own files.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from longlora_tune._compat import import_object
from longlora_tune.eval.generate import default_template
from longlora_tune.eval.model_loading import checkpoint_tokenizer, load_eval_model
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.hf.export import save_merged_hf_checkpoint
from longlora_tune.models import __all__ as exported_builders
from longlora_tune.models.families import (
    FAMILIES,
    HF_TOKENIZER,
    HF_TOKENIZER_FILES,
    ModelFamily,
    TinyFacts,
    detect_family,
    family_of_builder,
    tokenizer_files_in,
)
from longlora_tune.models.longlora import describe
from longlora_tune.quickstart import tiny

transformers = pytest.importorskip("transformers")

FAKE = ModelFamily(
    name="fakellama",
    hf_model_type="fake_llama",
    builder="longlora_tune.models.longlora_llama3",
    builder_module="llama3",
    sized_builders=(),
    base_builder="torchtune.models.llama3_2.llama3_2",
    checkpointer_model_type="LLAMA3",
    tied_checkpointer_model_type="LLAMA3_2",
    tokenizer=HF_TOKENIZER,
    tokenizer_files=HF_TOKENIZER_FILES,
    ties=True,
    label="Fake Llama",
    hf_architecture="FakeLlamaForCausalLM",
    tiny=TinyFacts("tokenizer_json", num_kv_heads=1, rope_theta=20_000.0, tie_word_embeddings=True),
)


@pytest.fixture
def fake_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, FAKE.name, FAKE)
    return FAKE


def test_a_family_registered_in_the_record_only_works_end_to_end(tmp_path, fake_family):
    base_dir = tiny.make_hf_checkpoint(tmp_path / "base", family=fake_family.name, max_position_embeddings=32)

    # The tiny checkpoint and the detection read the record: its model_type, architecture and tiny facts.
    config = json.loads((base_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("fake_llama", ["FakeLlamaForCausalLM"])
    facts = (config["num_key_value_heads"], config["rope_theta"], config["tie_word_embeddings"])
    assert facts == (1, 2e4, True)
    assert detect_family(config, tokenizer_files_in(base_dir)) is fake_family
    base = HFBaseModel.read(base_dir)
    assert base.family is fake_family and base.checkpointer_model_type == "LLAMA3_2"
    assert base.model_section({})["_component_"] == fake_family.builder
    assert family_of_builder(fake_family.builder) is not None  # a builder the library exports

    # Evaluation loading: the record's base builder and weight conversion equal transformers' Llama.
    model, info = load_eval_model(base_dir, max_seq_len=32)
    as_llama = tmp_path / "as_llama"
    shutil.copytree(base_dir, as_llama)
    (as_llama / "config.json").write_text(
        json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    reference = transformers.LlamaForCausalLM.from_pretrained(as_llama, dtype=torch.float32).eval()
    tokens = torch.randint(0, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=2e-5, rtol=1e-4)
    assert info["rope_scaling_factor"] == 1.0

    # The tokenizer and the prompt format come from the record (a tokenizer.json with a chat template).
    tokenizer, name = checkpoint_tokenizer(base_dir)
    assert name == fake_family.name and type(tokenizer).__name__ == "HFTokenizer"
    assert default_template(name, base_dir) == "chat"

    # The merged export: the record's conversion back, the base's config keys (model_type, architecture).
    builder = import_object(fake_family.builder, "model._component_")
    section = base.model_section({"max_seq_len": 32, "lora_rank": 4, "lora_alpha": 8.0})
    section.update(base.training_overrides({**section, "_component_": fake_family.builder}, None))
    trained = builder(**{k: v for k, v in section.items() if k != "_component_"})
    missing, unexpected = trained.load_state_dict(base.load_state_dict(), strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    out = tmp_path / "hf"
    save_merged_hf_checkpoint(trained.state_dict(), out, base=base, model_info=describe(trained))
    exported = json.loads((out / "config.json").read_text())
    assert (exported["model_type"], exported["architectures"]) == ("fake_llama", ["FakeLlamaForCausalLM"])
    written, original = load_file(out / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert written.keys() == original.keys()  # LoRA's B starts at zero: the merge is the base
    for key, value in original.items():
        torch.testing.assert_close(written[key], value)
    assert HFBaseModel.read(out).family is fake_family


def test_every_family_builder_is_exported_from_its_module():
    import importlib

    for family in FAMILIES.values():
        module = importlib.import_module(f"longlora_tune.models.{family.builder_module}")
        for name in (family.builder.rsplit(".", 1)[-1], *family.sized_builders):
            assert name in exported_builders and callable(getattr(module, name)), name
