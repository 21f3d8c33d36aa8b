"""QLoRA (``model.quantize_base: true``) in the longlora_distributed recipe, on ``tiny_qlora.yaml`` (CPU).

Four short runs happen once per module: one process with every export, two processes (gloo, the NF4
weights sharded by FSDP2), and one process stopped after 3 steps then resumed. The merged ``hf/`` export is
checked in transformers against the trained model's own (dequantized) forward.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runner import CONFIGS, model_from_adapter
from test_longlora_distributed import _env, _losses, _overrides, _recipe_cmd

from longlora_tune.hf.base import HFBaseModel
from longlora_tune.quickstart import tiny

REPO = Path(__file__).resolve().parents[2]
CONFIG = CONFIGS / "tiny_qlora.yaml"
STEPS = 6
#: Measured: the fp32 ``hf/`` export (dequantized NF4 base + merged LoRA) differs from the trained model's
#: forward by 5.4e-6 in max |logit| (logits up to ~4), float rounding of the merge.
HF_TOLERANCE = 1e-4


def _train(assets: dict[str, Path], out: Path, nproc: int, **extra: object) -> dict[int, float]:
    cmd = _recipe_cmd(CONFIG, _overrides(assets, out, **extra), nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    return _losses(out)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    base = tiny.make_hf_checkpoint(root / "base", embed_dim=256, intermediate_dim=512)
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=24)
    return {"root": root, "base": base, "corpus": corpus, "cache": root / "cache"}


@pytest.fixture(scope="module")
def runs(assets) -> dict[str, object]:
    root = assets["root"]
    one = _train(assets, root / "one", nproc=1)
    two = _train(assets, root / "two", nproc=2, export_formats="[]")
    stopped = _train(assets, root / "resumed", nproc=1, max_steps=3, export_formats="[]")
    resumed = _train(assets, root / "resumed", nproc=1, resume_from_checkpoint="true", export_formats="[]")
    return {"one": one, "two": two, "stopped": stopped, "resumed": resumed, "out": root / "one"}


def _trained_model(out: Path, base_dir: Path) -> torch.nn.Module:
    """The trained QLoRA model from ``adapter/``: NF4 base quantized from the base, trained tensors."""
    assert json.loads((out / "adapter" / "longlora.json").read_text())["model"]["quantize_base"] is True
    return model_from_adapter(out / "adapter", base_dir)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_qlora_loss_falls(runs):
    losses = runs["one"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5, losses


@pytest.mark.slow
def test_qlora_resume_equals_uninterrupted_run(runs):
    assert sorted(runs["stopped"]) == [1, 2, 3]
    for step in range(1, STEPS + 1):
        # The NF4 base is re-quantized from the base checkpoint: bit-identical, so the losses are too.
        assert runs["resumed"][step] == runs["one"][step], step


@pytest.mark.slow
def test_qlora_compiled_equals_eager(runs, assets):
    # compile: auto compiles QLoRA runs too: the NF4 base traces (inductor itself was checked by hand:
    # the same losses to 2e-7 relative). aot_eager: what inductor compiles, without C++ builds.
    out = assets["root"] / "compiled"
    cmd = _recipe_cmd(CONFIG, _overrides(assets, out, max_steps=3, export_formats="[]", compile="true"), 1)
    env = {**_env(), "TORCH_COMPILE_BACKEND": "aot_eager"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    compiled = _losses(out)
    assert sorted(compiled) == [1, 2, 3]
    for step, loss in compiled.items():
        assert loss == pytest.approx(runs["stopped"][step], rel=1e-4), step


@pytest.mark.slow
def test_qlora_two_processes_match_one(runs):
    # Measured: relative differences below 5e-8 (float summation order of the gathered shards).
    assert sorted(runs["two"]) == sorted(runs["one"])
    for step in runs["one"]:
        assert runs["two"][step] == pytest.approx(runs["one"][step], rel=1e-6), step


@pytest.mark.slow
def test_qlora_hf_export_matches_dequantized_forward(runs, assets):
    from torchao.dtypes.nf4tensor import NF4Tensor
    from transformers import LlamaForCausalLM

    out = runs["out"]
    ours = _trained_model(out, assets["base"])
    assert isinstance(ours.layers[0].attn.q_proj.weight, NF4Tensor)
    assert isinstance(ours.layers[0].mlp.w1.weight, NF4Tensor)
    hf = LlamaForCausalLM.from_pretrained(out / "hf").eval()
    assert hf.dtype == torch.float32
    tokens = _tokens()
    with torch.no_grad():
        expected = ours(tokens)
        got = hf(tokens).logits
    assert (got - expected).abs().max().item() < HF_TOLERANCE
    # The export holds the dequantized base, not the original weights.
    from safetensors.torch import load_file

    merged_gate = load_file(out / "hf" / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    original_gate = HFBaseModel.read(assets["base"]).load_state_dict()["layers.0.mlp.w1.weight"]
    assert torch.equal(merged_gate, ours.layers[0].mlp.w1.weight.to(torch.float32))
    assert not torch.equal(merged_gate, original_gate)


@pytest.mark.slow
def test_qlora_peft_card_states_the_quantized_base(runs):
    card = (runs["out"] / "peft" / "README.md").read_text()
    assert "NF4" in card and "quantization error" in card


def test_qlora_refuses_a_world_size_that_cuts_nf4_groups(tmp_path):
    from longlora_tune.errors import LongLoRAConfigError
    from longlora_tune.models import longlora_llama2
    from longlora_tune.training import qlora

    with torch.device("meta"):
        model = longlora_llama2(512, 2, 4, 4, 256, 256, intermediate_dim=512, quantize_base=True)
    assert qlora.has_nf4_params(model)
    qlora.check_nf4_shardable(model, 2)  # 65536-weight projections: 2 groups of 16384 per rank
    with pytest.raises(LongLoRAConfigError, match=r"cannot shard layers\.0\.attn\.q_proj\.weight .* 8 ranks"):
        qlora.check_nf4_shardable(model, 8)
    assert len(qlora.fsdp_ignored_params(model, 1)) == 2 * 7  # q, k, v, o, w1, w2, w3 per layer
    assert qlora.fsdp_ignored_params(model, 2) is None


def test_quantize_base_passes_config_checks(tmp_path):
    from longlora_tune.config import validation as config_checks

    base = tiny.make_hf_checkpoint(tmp_path / "base", embed_dim=256, intermediate_dim=512)
    cfg = OmegaConf.load(CONFIG)
    corpus = tiny.make_text_corpus(tmp_path / "corpus.jsonl", n_docs=4)
    cfg.merge_with_dotlist(
        [f"checkpoint_dir={base}", f"output_dir={tmp_path / 'out'}", f"dataset.data_files={corpus}"]
    )
    assert cfg.model.quantize_base is True
    checked = config_checks.validate_config(cfg, world_size=2)
    assert checked.gradient_accumulation_steps == 2  # global batch 4 = 2 ranks x 1 x 2
