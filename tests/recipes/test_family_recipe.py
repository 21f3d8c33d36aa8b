"""The training recipe on a non-Llama-2 family: a tiny tied Qwen2 (q/k/v biases) written by transformers.

One short run with ``rope_scaling: {type: yarn}`` checks the recipe end to end: the base folder's family
and RoPE facts reach the builder, S² trains, and every export carries the YaRN setting -- ``hf/`` loads in
transformers, ``adapter/`` through our eval loader, with equal logits past 4x the original context.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runner import CONFIGS, RecipeFailed, model_from_adapter, run_recipe

from longlora_tune.eval.model_loading import load_eval_model
from longlora_tune.quickstart import tiny

transformers = pytest.importorskip("transformers")

ORIGINAL = 64
SEQ = 256


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen")
    base = root / "base"
    config = transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ORIGINAL,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(base)
    tiny.make_tokenizer(base)  # any tokenizer of the right vocabulary size serves the packed corpus
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=12)
    return {"root": root, "base": base, "corpus": corpus}


def _cfg(assets: dict[str, Path], out: Path, **extra):
    cfg = OmegaConf.load(CONFIGS / "tiny_demo.yaml")
    values = {
        "checkpoint_dir": str(assets["base"]),
        "dataset.data_files": str(assets["corpus"]),
        "dataset.cache_dir": str(assets["root"] / "cache"),
        "output_dir": str(out),
        "max_steps": 2,
        "save_every_n_steps": 0,
        "lr_scheduler.num_warmup_steps": 1,
        "model._component_": "longlora_tune.models.longlora_qwen2",
        "model.num_kv_heads": 2,
        "model.tie_word_embeddings": True,
        **extra,
    }
    cfg.merge_with_dotlist([f"{k}={v}" for k, v in values.items()])
    return cfg


def test_qwen2_recipe_trains_with_yarn_and_exports_it(qwen_base, tmp_path, caplog):
    cfg = _cfg(qwen_base, tmp_path / "out")
    cfg.rope_scaling = {"type": "yarn"}
    run_recipe(cfg)
    out = tmp_path / "out"
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    entry = hf_config["rope_scaling"]
    assert (entry["rope_type"], entry["factor"], entry["original_max_position_embeddings"]) == (
        "yarn",
        4.0,
        64,
    )
    assert hf_config["tie_word_embeddings"] is True and hf_config["rope_theta"] == 1_000_000.0
    meta = json.loads((out / "adapter" / "longlora.json").read_text())
    assert meta["model"]["rope_scaling"] == {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert meta["rope_scaling"]["rope_type"] == "yarn"

    tokens = torch.randint(0, 512, (2, 250), generator=torch.Generator().manual_seed(1))
    trained = model_from_adapter(out / "adapter", qwen_base["base"])  # longlora.json alone rebuilds it
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    evaluated, info = load_eval_model(qwen_base["base"], adapter_dir=out / "adapter", max_seq_len=SEQ)
    assert info["rope_scaling"]["rope_type"] == "yarn"
    with torch.no_grad():
        expected = trained(tokens)
        # Training moved the weights: the export is not just the base model.
        base = transformers.AutoModelForCausalLM.from_pretrained(qwen_base["base"], dtype=torch.float32)
        assert (base.eval()(tokens).logits - expected).abs().max() > 1e-3
        torch.testing.assert_close(hf(tokens).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(evaluated(tokens), expected, atol=1e-5, rtol=1e-5)

    # A training_length the recorded setting does not follow is named, never silently dropped.
    caplog.set_level(logging.WARNING, logger="longlora_tune.eval.model_loading")
    caplog.clear()
    load_eval_model(qwen_base["base"], adapter_dir=out / "adapter", max_seq_len=SEQ, training_length=SEQ)
    assert "RoPE" not in caplog.text
    same, _ = load_eval_model(
        qwen_base["base"], adapter_dir=out / "adapter", max_seq_len=SEQ, training_length=4 * SEQ
    )
    assert "trained at 256 tokens with factor 4" in caplog.text and "training_length=1024" in caplog.text
    caplog.clear()
    merged, merged_info = load_eval_model(out / "hf", max_seq_len=SEQ, training_length=4 * SEQ)
    assert "serves 256 tokens, less than training_length=1024" in caplog.text
    assert merged_info["rope_scaling"]["factor"] == 4.0
    with torch.no_grad():
        torch.testing.assert_close(same(tokens), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(tokens), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "rope_scaling, message",
    [
        ({"type": "ntk"}, "rope_scaling.type='ntk'; use one of linear, yarn, llama3"),
        ({"type": "yarn", "scale": 2}, "unknown keys"),
        ({"type": "yarn", "factor": 3}, "gives a 192-token context, below the training length 256"),
        ({"type": "yarn", "factor": 4.1}, "not a whole context length"),
        ({"type": "llama3", "factor": 4, "original_max_position_embeddings": 0}, "positive int"),
    ],
)
def test_bad_rope_scaling_is_refused_up_front(qwen_base, tmp_path, rope_scaling, message):
    cfg = _cfg(qwen_base, tmp_path / "out")
    cfg.rope_scaling = rope_scaling
    with pytest.raises(RecipeFailed, match=message):
        run_recipe(cfg)
    assert not (tmp_path / "out" / "logs").exists()  # refused before any work


def test_rope_scaling_needs_a_family_builder_and_is_set_once(qwen_base, tmp_path):
    cfg = _cfg(qwen_base, tmp_path / "out", **{"model.rope_scaling_factor": 4.0})
    cfg.rope_scaling = {"type": "yarn"}
    with pytest.raises(RecipeFailed, match="rope_scaling is set and so is model.rope_scaling_factor"):
        run_recipe(cfg)


@pytest.mark.slow
def test_two_process_fsdp_run_of_a_tied_model_matches_one_process(qwen_base, tmp_path):
    """FSDP2 shards the tied embedding (root unit) that the head reads: 2 ranks train what 1 rank trains."""
    import os
    import subprocess
    import sys

    from recipe_runner import RECIPE

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        cfg = _cfg(qwen_base, out, export_formats="[adapter]")
        path = tmp_path / f"cfg{nproc}.yaml"
        OmegaConf.save(cfg, path)
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run(
            [*launcher, str(RECIPE), "--config", str(path)],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[nproc] = model_from_adapter(out / "adapter", qwen_base["base"])
    tokens = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(outs[2](tokens), outs[1](tokens), atol=2e-4, rtol=2e-4)
        emb1, emb2 = outs[1].tok_embeddings.weight, outs[2].tok_embeddings.weight
        torch.testing.assert_close(emb2, emb1, atol=1e-5, rtol=1e-5)
        base = transformers.AutoModelForCausalLM.from_pretrained(qwen_base["base"], dtype=torch.float32)
        assert (emb1 - base.model.embed_tokens.weight).abs().max() > 0  # the tied embedding was trained
