"""``python -m longlora_tune.quickstart.demo --family F`` for every family: tiny model, training, exports
that agree.

One demo run per family (module-scoped fixture, 2 optimizer steps): ``demo.main`` itself, with its
training subprocess replaced by the same recipe script run in this process (``recipe_runner``), which
saves an interpreter and torch start-up per family. Then ``hf/`` in transformers, base + ``peft/`` in
PEFT and base + ``adapter/`` through our eval loader must give the same logits at 4x the base model's
context, and ``hf/config.json`` must state the RoPE method and factor the model was trained with.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runner import RECIPE, run_recipe_argv
from torchtune import config as tt_config

from longlora_tune import resources
from longlora_tune.eval.model_loading import load_eval_model
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models.families import DEFAULT_FAMILY, FAMILIES
from longlora_tune.quickstart import demo, tiny

transformers = pytest.importorskip("transformers")

ORIGINAL = 64  # the tiny base models' context (config.json max_position_embeddings)
SEQ = 256  # the demo's training length: 4x the original context

# family -> (model_type, transformers class, the rope_scaling hf/config.json must carry)
EXPECTED = {
    "llama2": ("llama", "LlamaForCausalLM", {"rope_type": "linear", "factor": 4.0}),
    # Llama 3.1-style base (llama3 factor 4 over 16 tokens, 64 in all), extended to 256: llama3 factor 16.
    "llama3": (
        "llama",
        "LlamaForCausalLM",
        {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 16},
    ),
    "mistral": ("mistral", "MistralForCausalLM", {"rope_type": "linear", "factor": 4.0}),
    "qwen2": (
        "qwen2",
        "Qwen2ForCausalLM",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    ),
}
#: The families the demo trains, from the record; EXPECTED must say what each one's export carries.
DEMO_FAMILIES = [name for name, family in FAMILIES.items() if family.tiny is not None and family.tiny.demo]
#: Those with their own tiny_demo_<family> / tiny_longalpaca_<family> configs.
OTHER_DEMO_FAMILIES = [name for name in DEMO_FAMILIES if name != DEFAULT_FAMILY]
FAST = ["max_steps=2", "save_every_n_steps=0", "lr_scheduler.num_warmup_steps=1"]


def _in_process(cmd: list[str], env: dict | None = None) -> int:
    """Stand-in for ``subprocess.call``: the demo's ``python <recipe> --config ...`` command, in process."""
    assert cmd[1] == str(RECIPE), cmd  # the recipe script itself, not torchrun or tune
    run_recipe_argv(cmd[2:])
    return 0


def _run_demo(argv: list[str]) -> str:
    """``demo.main(argv)`` with its training run in this process; returns what it printed."""
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(demo, "registered_recipe_names", lambda: [])  # the python <script> form of the command
        mp.setattr(demo.subprocess, "call", _in_process)
        assert demo.main(argv) == 0
    return stdout.getvalue()


def test_every_demo_family_has_expectations():
    assert sorted(EXPECTED) == sorted(DEMO_FAMILIES)


@pytest.fixture(scope="module", params=DEMO_FAMILIES)
def demo_run(request, tmp_path_factory) -> dict:
    family = request.param
    workdir = tmp_path_factory.mktemp(f"demo_{family}")
    argv = ["--family", family, "--workdir", str(workdir), *FAST]
    stdout = _run_demo(argv if family != DEFAULT_FAMILY else argv[2:])  # the default needs no --family
    return {"family": family, "workdir": workdir, "out": workdir / "out", "stdout": stdout}


def test_demo_prints_its_config_the_exported_rope_and_the_transformers_class(demo_run):
    family, text = demo_run["family"], demo_run["stdout"]
    _, hf_class, rope = EXPECTED[family]
    config = "tiny_demo" if family == "llama2" else f"tiny_demo_{family}"
    assert f"--config {resources.config_path(config)}" in text
    assert f"rope_scaling {rope['rope_type']} {rope['factor']}" in text
    assert f"from transformers import {hf_class}; print({hf_class}.from_pretrained(" in text


def _run_step(cmd: list[str]) -> str:
    """One of the demo's next-step commands, in this process; returns what it printed."""
    import importlib
    import runpy
    import sys

    generate = importlib.import_module("longlora_tune.eval.generate")  # the package exports a function
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        if cmd[1:3] == ["-m", "longlora_tune.eval.generate"]:
            assert generate.main(cmd[3:]) == 0
        else:  # python <eval recipe script> --config <file> ...
            mp.setattr(sys, "argv", cmd[1:])
            with pytest.raises(SystemExit) as e:
                runpy.run_path(cmd[1], run_name="__main__")
            assert e.value.code in (0, None), cmd
    return stdout.getvalue()


def test_demo_next_steps_evaluate_and_generate_for_every_family(demo_run):
    family, workdir = demo_run["family"], demo_run["workdir"]
    steps = demo.next_steps(workdir, use_tune=False, family=family)
    assert [what.split(":")[0] for what, _ in steps] == [
        "perplexity on the demo corpus",
        "passkey retrieval",
        "a question about a text file, any family",
    ]
    for what, cmd in steps:
        assert f"  # {what}\n  {shlex.join(cmd)}\n" in demo_run["stdout"]
    outputs = [_run_step(cmd) for _, cmd in steps]
    assert json.loads((workdir / "eval" / "perplexity.json").read_text())["results"]
    passkey = json.loads((workdir / "eval" / "passkey.json").read_text())
    assert passkey["note"].startswith("a tiny random model is expected to fail retrieval (0%)")
    assert f"note: {passkey['note']}" in outputs[1]
    assert outputs[2].strip()  # an answer (of a random model)


def test_hf_config_carries_the_family_and_the_trained_rope(demo_run):
    model_type, hf_class, rope = EXPECTED[demo_run["family"]]
    hf_config = json.loads((demo_run["out"] / "hf" / "config.json").read_text())
    assert (hf_config["model_type"], hf_config["architectures"]) == (model_type, [hf_class])
    entry = hf_config["rope_scaling"]
    assert {k: entry[k] for k in rope} == rope
    base_config = json.loads((demo_run["workdir"] / "base" / "config.json").read_text())
    assert hf_config["rope_theta"] == base_config["rope_theta"]
    assert hf_config["tie_word_embeddings"] == base_config["tie_word_embeddings"]
    # transformers reads the same RoPE back (what generation and vLLM-style loaders see).
    loaded = transformers.AutoConfig.from_pretrained(demo_run["out"] / "hf")
    assert loaded.rope_parameters["rope_type"] == rope["rope_type"]
    assert loaded.rope_parameters["factor"] == rope["factor"]


def test_hf_and_peft_exports_equal_the_trained_model_past_the_original_context(demo_run):
    peft = pytest.importorskip("peft")
    family, out, base_dir = demo_run["family"], demo_run["out"], demo_run["workdir"] / "base"
    vocab = HFBaseModel.read(base_dir).builder_kwargs["vocab_size"]
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))
    # The trained model: base + adapter/ through our evaluation loader (full attention, trained RoPE).
    trained, info = load_eval_model(base_dir, adapter_dir=out / "adapter", max_seq_len=SEQ)
    want = EXPECTED[family][2]
    assert info["rope_scaling_factor"] == want["factor"]
    # Llama 2 keeps its historical linear-only loader, which reports the factor alone.
    assert (info["rope_scaling"] or {"rope_type": "linear"})["rope_type"] == want["rope_type"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == EXPECTED[family][1]
    rope_files = json.loads((out / "peft" / "rope_scaling.json").read_text())
    # As peft/README.md says: the base model with the trained RoPE (and context if given), then the adapter.
    rope = {k: rope_files[k] for k in ("rope_parameters", "max_position_embeddings") if k in rope_files}
    assert rope["rope_parameters"]["rope_type"] == want["rope_type"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **rope).eval()
    with torch.no_grad():
        expected = trained(tokens)
        # Training moved the weights: the base model with the same RoPE is not the trained model.
        assert (hf_base(tokens).logits - expected).abs().max().item() > 1e-3
        assert (hf(tokens).logits - expected).abs().max().item() < 1e-4
        peft_model = peft.PeftModel.from_pretrained(hf_base, str(out / "peft")).eval()
        assert (peft_model(tokens).logits - expected).abs().max().item() < 1e-4


def test_tiny_base_is_the_family_with_its_tokenizer(demo_run):
    family, base_dir = demo_run["family"], demo_run["workdir"] / "base"
    base = HFBaseModel.read(base_dir)
    assert base.family.name == family
    config = base.config
    assert config["vocab_size"] == tiny.tiny_vocab_size(family)
    assert config["num_key_value_heads"] == (4 if family == "llama2" else 2)  # GQA but for Llama 2
    assert config["tie_word_embeddings"] == (family == "qwen2")  # as Qwen2.5 0.5B-3B
    from safetensors import safe_open

    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (family == "qwen2")
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"])
    # The shipped config's tokenizer section reads the files the demo wrote, and its ids are the model's.
    name = "tiny_demo" if family == "llama2" else f"tiny_demo_{family}"
    cfg = OmegaConf.load(resources.config_path(name))
    cfg.checkpoint_dir = str(base_dir)
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    assert cfg.model.vocab_size == config["vocab_size"]
    if family in ("llama2", "mistral"):
        assert tokenizer.vocab_size == config["vocab_size"]
        assert (tokenizer.bos_id, tokenizer.eos_id) == (config["bos_token_id"], config["eos_token_id"])
    elif family == "llama3":
        assert max(tokenizer.special_tokens.values()) == config["vocab_size"] - 1
        assert tokenizer.bos_id == config["bos_token_id"]
        assert tokenizer.special_tokens["<|end_of_text|>"] == config["eos_token_id"]
    else:
        assert max(tokenizer.special_tokens.values()) == config["vocab_size"] - 1
        assert tokenizer.special_tokens["<|endoftext|>"] == config["eos_token_id"] == config["bos_token_id"]
    ids = tokenizer.encode("The cat sees the red ball today.", add_bos=False, add_eos=True)
    assert len(ids) > 3 and max(ids) < config["vocab_size"]


@pytest.mark.parametrize("sft", [False, True], ids=["pretrain", "sft"])
@pytest.mark.parametrize("family", OTHER_DEMO_FAMILIES)
def test_family_configs_default_to_the_demo_workdir(family, sft):
    name = f"tiny_longalpaca_{family}" if sft else f"tiny_demo_{family}"
    cfg = OmegaConf.load(resources.config_path(name))
    command = demo.assets_command(cfg.checkpoint_dir)
    workdir = Path(cfg.checkpoint_dir).parent
    assert workdir.name == (f"longalpaca_demo_{family}" if sft else f"longlora_demo_{family}")
    flags = f"--family {family}" + (" --sft" if sft else "")
    assert command == f"python -m longlora_tune.quickstart.demo {flags} --assets-only --workdir {workdir}"
    data = workdir / ("longalpaca.json" if sft else "corpus.jsonl")
    assert Path(cfg.dataset.data_files) == data
    assert Path(cfg.output_dir) == workdir / "out"
    cmd = demo.build_command(Path("/w"), 1, [], use_tune=True, family=family, sft=sft)
    assert cmd[4:7] == [name, "checkpoint_dir=/w/base", f"dataset.data_files=/w/{data.name}"]
    if sft:
        # The pretraining config's model, tokenizer and RoPE, fine-tuned in the family's chat format.
        pretrain = OmegaConf.load(resources.config_path(f"tiny_demo_{family}"))
        for key in ("model", "tokenizer", "rope_scaling"):
            mine, theirs = (OmegaConf.to_container(c[key], resolve=False) for c in (cfg, pretrain))
            if key == "model":
                assert mine.pop("s2_wrap_around") is False  # SFT's right padding needs the no-wrap S2
            assert mine == theirs, key
        assert cfg.dataset.template == "chat"


# The family's chat template marker in the (ignored) prompt and its end-of-turn token ending the answer.
CHAT = {
    "llama3": ("<|start_header_id|>", "<|eot_id|>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
}


@pytest.mark.parametrize("family", OTHER_DEMO_FAMILIES)
def test_sft_assets_feed_the_family_chat_format(family, tmp_path, capsys):
    assert demo.main(["--family", family, "--sft", "--assets-only", "--workdir", str(tmp_path)]) == 0
    assert f"tiny_longalpaca_{family}" in capsys.readouterr().out
    cfg = OmegaConf.load(resources.config_path(f"tiny_longalpaca_{family}"))
    cfg.checkpoint_dir = str(tmp_path / "base")
    cfg.dataset.data_files = str(tmp_path / "longalpaca.json")
    assert HFBaseModel.read(cfg.checkpoint_dir).family.name == family
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    dataset = tt_config.instantiate(cfg.dataset, tokenizer)
    assert len(dataset) == 32
    sample = dataset[0]
    tokens, labels = sample["tokens"], sample["labels"]
    prompt = [t for t, lab in zip(tokens, labels) if lab == -100]
    answer = [lab for lab in labels if lab != -100]
    assert prompt and answer and len(tokens) <= 256
    if family == "mistral":
        assert "[INST]" in tokenizer.decode(prompt) and answer[-1] == tokenizer.eos_id
    else:
        start, end = (tokenizer.special_tokens[t] for t in CHAT[family])
        assert start in prompt and end in answer
        assert max(tokens) < cfg.model.vocab_size  # the moved special ids fit the tiny model


def test_llama3_sft_demo_trains_and_exports_in_its_chat_format(tmp_path):
    # One family end to end (the others share the path; their datasets are checked above).
    text = _run_demo(["--family", "llama3", "--sft", "--workdir", str(tmp_path), *FAST])
    assert f"--config {resources.config_path('tiny_longalpaca_llama3')}" in text
    assert "rope_scaling llama3 16.0" in text and "from transformers import LlamaForCausalLM" in text
    hf_config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert hf_config["rope_scaling"]["rope_type"] == "llama3" and hf_config["rope_scaling"]["factor"] == 16.0
    meta = json.loads((tmp_path / "out" / "adapter" / "longlora.json").read_text())
    assert meta["model"]["_component_"] == "longlora_tune.models.longlora_llama3"
    assert (tmp_path / "out" / "peft" / "adapter_model.safetensors").is_file()


def test_demo_refuses_a_workdir_of_another_family(tmp_path, capsys):
    tiny.make_hf_checkpoint(tmp_path / "base", family="mistral", with_tokenizer=False)
    with pytest.raises(SystemExit) as e:
        demo.main(["--family", "qwen2", "--assets-only", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "holds a tiny mistral model, not qwen2" in capsys.readouterr().err
    assert not (tmp_path / "corpus.jsonl").exists()


def test_pretraining_documents_end_with_the_base_models_eos(demo_run):
    # Qwen2.5 base models end documents with <|endoftext|> (config.json eos_token_id); torchtune's tokenizer
    # ends text with the chat token <|im_end|>. The packed stream keeps the base model's.
    import numpy as np

    family, out = demo_run["family"], demo_run["out"]
    config = json.loads((demo_run["workdir"] / "base" / "config.json").read_text())
    (sidecar,) = (out / "data_cache").glob("*.json")
    meta = json.loads(sidecar.read_text())
    stream = np.fromfile(sidecar.with_suffix(".bin"), dtype=meta["dtype"])
    ends = int((stream == config["eos_token_id"]).sum())
    assert ends == meta["num_documents"] > 0
    if family == "qwen2":
        assert meta["eos_id"] == config["eos_token_id"]
        name = "tiny_demo_qwen2"
        cfg = OmegaConf.load(resources.config_path(name))
        cfg.checkpoint_dir = str(demo_run["workdir"] / "base")
        im_end = tt_config.instantiate(cfg.tokenizer).eos_id
        assert im_end != config["eos_token_id"] and not (stream == im_end).any()
    else:
        # The tokenizer's EOS is the model's: the sidecar records None (the tokenizer's own), one stream.
        assert meta["eos_id"] is None
