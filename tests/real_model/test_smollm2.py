"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct (issue #22).

A Llama-architecture model that is neither Llama 2 nor Llama 3: 9 query / 3 KV heads, RoPE base 1e5 (only
inside ``rope_parameters``), tied embeddings, a byte-level BPE ``tokenizer.json`` and a
``chat_template.jinja``. Everything runs on its real weights in fp32 on CPU: our evaluation model against
transformers, two steps of the generic ``hf_checkpoint`` config through ``tune run``, its exports in
transformers and PEFT, and ``generate``. The text is Python's own ``LICENSE.txt`` (``english_text``).

Training runs S² on its 9 query heads (4 unshifted, 5 shifted: :mod:`longlora_tune.modules.s2_heads`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from longlora_tune.eval.model_loading import checkpoint_tokenizer, load_eval_model
from longlora_tune.hf.base import HFBaseModel, HFTokenizer

TRAIN_LEN = 512  # twice the 256-token context of smollm2_short: RoPE linear factor 2


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> HFTokenizer:
    tok, family = checkpoint_tokenizer(smollm2)
    assert family == "hf_llama" and isinstance(tok, HFTokenizer)
    return tok


def test_family_tokenizer_and_chat_template_come_from_the_folder(
    smollm2, tokenizer, english_text, transformers
):
    base = HFBaseModel.read(smollm2)
    assert base.family.name == "hf_llama" and base.tie_word_embeddings
    assert base.builder_kwargs["rope_base"] == 100_000.0 and base.original_max_seq_len == 8192
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2))
    assert tokenizer.encode(english_text, add_bos=False, add_eos=False) == ref(english_text)["input_ids"]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_tokens) == (1, 2, [2])
    from torchtune.data import Message

    question = [{"role": "user", "content": "What is the capital of France?"}]
    ours, _ = tokenizer.tokenize_messages(
        [Message(role="user", content=question[0]["content"]), Message(role="assistant", content="")],
        add_end_tokens=False,
    )
    assert ours == list(ref.apply_chat_template(question, add_generation_prompt=True)["input_ids"])


def test_eval_model_logits_match_transformers(smollm2, tokenizer, english_text, transformers):
    ids = torch.tensor([tokenizer.encode(english_text)[:384]])
    ours, info = load_eval_model(smollm2, max_seq_len=ids.shape[1])
    assert info["rope_scaling_factor"] == 1.0
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = ours(ids), reference(ids).logits
    diff = (got - want).abs().max().item()
    print(f"\nSmolLM2 eval logits vs transformers (fp32, {ids.shape[1]} tokens): max |diff| {diff:.2e}")
    assert diff <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() == 1.0
    assert ours.output.tied_module is ours.tok_embeddings  # tied, as config.json says


# ------------------------------------------------------------------------------------ training run


@pytest.fixture(scope="module")
def run(smollm2_short: Path, english_text: str, tmp_path_factory) -> Path:
    """Two optimizer steps of the generic config through `tune run`, naming nothing about the model."""
    work = tmp_path_factory.mktemp("smollm2_run")
    corpus = work / "corpus.jsonl"
    with corpus.open("w") as f:
        for paragraph in (p.strip() for p in english_text.split("\n\n")):
            if paragraph:
                f.write(json.dumps({"text": paragraph}) + "\n")
    out = work / "out"
    overrides = [
        f"checkpoint_dir={smollm2_short}",
        f"dataset.data_files={corpus}",
        f"max_seq_len={TRAIN_LEN}",
        f"output_dir={out}",
        f"dataset.cache_dir={work / 'cache'}",
        # One CPU core: fp32, one sequence per step, no recomputation, one tokenizing process.
        "device=cpu",
        "dtype=fp32",
        "global_batch_size=1",
        "max_steps=2",
        "enable_activation_checkpointing=false",
        "dataset.num_proc=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    tune = [sys.executable, "-c", "from torchtune._cli.tune import main; main()"]
    done = subprocess.run(
        [*tune, "run", "longlora_distributed", "--config", "hf_checkpoint", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _losses(out: Path) -> list[float]:
    lines = "".join(p.read_text() for p in sorted((out / "logs").glob("log_*.txt")))
    return [float(x) for x in re.findall(r"Step \d+ \| loss:([0-9.eE+-]+|nan|inf)", lines)]


def test_two_steps_of_hf_checkpoint_on_real_text(run):
    losses = _losses(run)
    print(f"\nSmolLM2 hf_checkpoint losses at {TRAIN_LEN} tokens: {losses}")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # A pretrained model on English: far below the uniform log(49152) = 10.8 of random weights.
    assert all(1.0 < x < 6.0 for x in losses)
    meta = json.loads((run / "adapter" / "longlora.json").read_text())
    assert meta["model"]["_component_"] == "longlora_tune.models.longlora_llama3"
    assert meta["model"]["tie_word_embeddings"] is True and meta["rope_scaling_factor"] == 2.0


def test_hf_export_loads_in_transformers_tied_with_its_chat_template(run, smollm2_short, transformers):
    hf = run / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (hf / name).read_bytes() == (smollm2_short / name).read_bytes(), name
    config = json.loads((hf / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_merged_hf_export_equals_base_plus_peft_adapter(
    run, smollm2_short, tokenizer, english_text, transformers
):
    peft = pytest.importorskip("peft")
    ids = torch.tensor([tokenizer.encode(english_text)[:TRAIN_LEN]])
    rope = json.loads((run / "peft" / "rope_scaling.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_short), dtype=torch.float32, rope_parameters=rope["rope_parameters"]
    )
    adapted = peft.PeftModel.from_pretrained(base, str(run / "peft")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32).eval()
    ours, _ = load_eval_model(run / "hf", max_seq_len=TRAIN_LEN)
    with torch.no_grad():
        want = adapted(ids).logits
        diff = (merged(ids).logits - want).abs().max().item()
        ours_diff = (ours(ids) - want).abs().max().item()
    print(f"\nSmolLM2 merged hf/ vs base + peft/: max |diff| {diff:.2e}; our loader of hf/: {ours_diff:.2e}")
    assert diff <= 1e-3 and ours_diff <= 1e-3


def test_generate_answers_a_short_question(smollm2, tokenizer, tmp_path, transformers):
    """The CLI's default for a chat checkpoint: its chat template; the answer is transformers' greedy one."""
    from longlora_tune.eval.generate import main

    material, question = "Geography quiz.", "What is the capital of France?"
    (tmp_path / "material.txt").write_text(material)
    out = io.StringIO()
    argv = ["--checkpoint", str(smollm2), "--file", str(tmp_path / "material.txt"), "--question", question]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "12"], out=out) == 0
    answer = out.getvalue().strip()
    print(f"\nSmolLM2 generate: {answer!r}")
    assert "Paris" in answer
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2))
    chat = [{"role": "user", "content": f"{material}\n{question}"}]
    ids = ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    greedy = reference.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert answer == ref_tok.decode(greedy, skip_special_tokens=True).strip()


def test_eval_recipes_run_on_the_export_with_the_folders_tokenizer(run, english_text, tmp_path, monkeypatch):
    """The generic eval configs name no tokenizer: the checkpoint folder's (tokenizer.json) is used."""
    import runpy

    from longlora_tune import resources

    text = tmp_path / "held_out.txt"
    text.write_text(english_text)
    common = [
        f"checkpoint_dir={run / 'hf'}",
        "device=cpu",
        "dtype=fp32",
        f"output_dir={tmp_path}",
        "progress=false",
    ]
    for recipe, config, extra in [
        ("longlora_eval_perplexity", "eval/hf_checkpoint_perplexity",
         [f"dataset.path={text}", f"eval_lengths=[{TRAIN_LEN}]", "max_windows=2"]),
        ("longlora_eval_passkey", "eval/hf_checkpoint_passkey", ["lengths=[300]", "num_trials=1"]),
    ]:  # fmt: skip
        script = resources.recipe_path(recipe)
        argv = [str(script), "--config", str(resources.config_path(config)), *common, *extra]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
        assert not done.value.code, recipe
    ppl = json.loads((tmp_path / "perplexity.json").read_text())
    row = ppl["results"][0]
    print(f"\nSmolLM2 hf/ perplexity of LICENSE.txt at {TRAIN_LEN} tokens: {row['perplexity']:.2f}")
    assert row["num_windows"] == 2 and 1.0 < row["perplexity"] < 100.0
    passkey = json.loads((tmp_path / "passkey.json").read_text())
    assert passkey["results"][0]["num_trials"] == 1


def test_passkey_on_the_base_at_its_own_context_retrieves_the_key(smollm2, tmp_path, monkeypatch):
    """Scored on what the model means (the answer after the prompt: a space token, then the digits)."""
    import runpy

    from longlora_tune import resources

    script = resources.recipe_path("longlora_eval_passkey")
    argv = [str(script), "--config", str(resources.config_path("eval/hf_checkpoint_passkey")),
            f"checkpoint_dir={smollm2}", "device=cpu", "dtype=fp32", f"output_dir={tmp_path}",
            "progress=false", "lengths=[400]", "num_trials=3"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert not done.value.code
    row = json.loads((tmp_path / "passkey.json").read_text())["results"][0]
    passed = f"{row['num_passed']}/{row['num_trials']}"
    print(f"\nSmolLM2 passkey at ~{row['mean_prompt_tokens']} tokens: {passed}")
    assert row["num_passed"] == 3
