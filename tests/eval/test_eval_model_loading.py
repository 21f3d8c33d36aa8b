"""The evaluation model: HF checkpoints against transformers, and base + unmerged adapter against merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.eval.model_loading import load_eval_model


def test_hf_checkpoint_matches_transformers_with_its_rope_scaling(tmp_path: Path) -> None:
    import transformers

    from longlora_tune.quickstart.tiny import make_hf_checkpoint

    ckpt = make_hf_checkpoint(
        tmp_path / "hf", num_kv_heads=2, rope_scaling={"type": "linear", "factor": 3.0}, with_tokenizer=False
    )
    model, info = load_eval_model(ckpt, max_seq_len=160)
    assert info["rope_scaling_factor"] == 3.0 and not model.training
    tokens = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


def test_adapter_on_base_equals_trained_model_and_merged_export(tmp_path: Path, tiny_ckpt: Path) -> None:
    from longlora_tune.hf.base import HFBaseModel
    from longlora_tune.hf.export import LongLoRAExportInfo, save_adapter, save_merged_hf_checkpoint
    from longlora_tune.models import longlora_llama2
    from longlora_tune.models.longlora import describe
    from longlora_tune.models.trainable import trainable_state_dict

    kwargs = dict(
        vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64, intermediate_dim=128
    )
    model_cfg = {"_component_": "longlora_tune.models.longlora_llama2", **kwargs, "max_seq_len": 256}
    torch.manual_seed(0)
    trained = longlora_llama2(**kwargs, max_seq_len=256, original_max_seq_len=64)  # factor 4
    base = HFBaseModel.read(tiny_ckpt)
    trained.load_state_dict(base.load_state_dict(), strict=False)
    with torch.no_grad():  # stand-in for training: LoRA B, embeddings and norms move away from the base
        for name, p in trained.named_parameters():
            if "lora_b" in name or "norm" in name or "tok_embeddings" in name:
                p.add_(0.05 * torch.randn_like(p))
    trained.eval()
    adapter = save_adapter(
        trainable_state_dict(trained),
        tmp_path / "adapter",
        LongLoRAExportInfo(
            model_config=model_cfg,
            rope_scaling_factor=4.0,
            group_size=64,
            trainable_extras=["embed", "norm"],
            base_checkpoint_dir=str(tiny_ckpt),
            training_length=256,
        ),
    )
    merged = save_merged_hf_checkpoint(
        {k: v.clone() for k, v in trained.state_dict().items()},
        tmp_path / "merged",
        base=base,
        model_info=describe(trained),
    )
    tokens = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(tokens)
        # checkpoint_dir None: the base recorded in longlora.json; the factor comes from the adapter.
        from_adapter, info = load_eval_model(None, adapter_dir=adapter, max_seq_len=224)
        assert info["rope_scaling_factor"] == 4.0
        torch.testing.assert_close(from_adapter(tokens), expected, atol=1e-5, rtol=1e-5)
        from_merged, info = load_eval_model(merged, max_seq_len=224)
        assert info["rope_scaling_factor"] == 4.0  # from the merged config.json's rope_scaling
        torch.testing.assert_close(from_merged(tokens), expected, atol=1e-4, rtol=1e-4)
        # A disagreeing training length does not override the checkpoint's own factor...
        same, info = load_eval_model(merged, max_seq_len=224, training_length=1024)
        assert info["rope_scaling_factor"] == 4.0
        torch.testing.assert_close(same(tokens), expected, atol=1e-4, rtol=1e-4)
        # ...an explicit factor does, and changes the outputs.
        wrong, info = load_eval_model(merged, max_seq_len=224, rope_scaling_factor=16.0)
        assert info["rope_scaling_factor"] == 16.0
        assert not torch.allclose(wrong(tokens), expected, atol=1e-3)


def test_missing_files_raise_config_errors(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(LongLoRAConfigError, match="config.json"):
        load_eval_model(tmp_path / "nothing", max_seq_len=64)
    with pytest.raises(LongLoRAConfigError, match="longlora.json"):
        load_eval_model(tiny_ckpt, adapter_dir=tmp_path, max_seq_len=64)
    meta = {"model": {"_component_": "longlora_tune.models.longlora_llama2"}}
    (tmp_path / "longlora.json").write_text(json.dumps(meta))
    with pytest.raises(LongLoRAConfigError, match="trainable.safetensors"):
        load_eval_model(tiny_ckpt, adapter_dir=tmp_path, max_seq_len=64)


_OURS = "longlora_tune.models.longlora_llama2"
_HUBCONF = """
import pathlib
pathlib.Path(__file__).with_name("ran").write_text("code from the adapter folder ran")
def model(**kwargs):
    raise SystemExit("hubconf entry point called")
"""


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        # torch.hub.load with source=local imports the folder's hubconf.py: code execution.
        ({"_component_": "torch.hub.load", "source": "local", "model": "model"}, "not a longlora_tune model"),
        ({"_component_": "longlora_tune.models.longlora_llama2_evil"}, "not a longlora_tune model"),
        ({"_component_": "longlora_tune.models.apply_longlora"}, "not a longlora_tune model"),
        ({"_component_": _OURS, "rope_scaling": {"_component_": "os.system"}}, "names a _component_"),
        ({"_component_": _OURS, "rope_scaling": {"type": "${oc.env:HOME}"}}, "interpolation"),
        ({"_component_": _OURS, "hubconf": "x"}, "not an argument"),
    ],
)
def test_adapter_folder_is_data_not_code(tmp_path: Path, tiny_ckpt: Path, model: dict, refused: str) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "hubconf.py").write_text(_HUBCONF)
    meta = {"model": {**model, "repo_or_dir": str(adapter)}} if "source" in model else {"model": model}
    (adapter / "longlora.json").write_text(json.dumps(meta))
    with pytest.raises(LongLoRAConfigError, match=refused):
        load_eval_model(tiny_ckpt, adapter_dir=adapter, max_seq_len=64)
    assert not (adapter / "ran").exists()


def test_eval_tokenizer_is_the_checkpoint_folders_unless_the_config_names_one(
    tmp_path: Path, tiny_ckpt: Path
):
    from omegaconf import OmegaConf
    from torchtune.models.llama2._tokenizer import Llama2Tokenizer

    from longlora_tune.eval.model_loading import tokenizer_from_config
    from longlora_tune.hf.base import HFTokenizer
    from longlora_tune.quickstart import tiny

    text = "The cat sees the red ball today."
    tok = tokenizer_from_config(OmegaConf.create({"checkpoint_dir": str(tiny_ckpt)}))
    assert isinstance(tok, Llama2Tokenizer) and tok.prompt_template is None
    # Only an adapter: its base folder's tokenizer.
    (tmp_path / "adapter").mkdir()
    meta = {"model": {"_component_": _OURS}, "base_checkpoint_dir": str(tiny_ckpt)}
    (tmp_path / "adapter" / "longlora.json").write_text(json.dumps(meta))
    from_adapter = tokenizer_from_config(OmegaConf.create({"adapter_dir": str(tmp_path / "adapter")}))
    assert from_adapter.encode(text) == tok.encode(text)
    # A config may still name one.
    tiny.make_hf_tokenizer(tmp_path / "hf_tok")
    path = str(tmp_path / "hf_tok/tokenizer.json")
    named = {"_component_": "longlora_tune.hf.base.HFTokenizer", "path": path}
    cfg = OmegaConf.create({"checkpoint_dir": str(tiny_ckpt), "tokenizer": named})
    assert isinstance(tokenizer_from_config(cfg), HFTokenizer)
    with pytest.raises(LongLoRAConfigError, match="checkpoint_dir is not set"):
        tokenizer_from_config(OmegaConf.create({}))
