"""The LongLoRA trainable set (LoRA + embedding + norms) and its Hugging Face PEFT export."""

import json

import pytest
import torch
from torchtune.models import convert_weights
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.peft import DoRALinear, LoRALinear
from torchtune.training import set_activation_checkpointing

from longlora_tune.hf.peft import save_peft_adapter
from longlora_tune.models import longlora_llama2, longlora_llama2_7b
from longlora_tune.models.trainable import (
    TRAINABLE_EXTRAS,
    set_trainable_params,
    trainable_param_names,
    trainable_state_dict,
)

VOCAB, LAYERS, HEADS, KV_HEADS, DIM, HIDDEN, SEQ, ORIG = 96, 2, 4, 2, 32, 64, 128, 32


def _tiny(**overrides):
    kwargs = dict(
        intermediate_dim=HIDDEN, lora_rank=4, lora_alpha=8.0, original_max_seq_len=ORIG, s2_backend="sdpa"
    )
    kwargs.update(overrides)
    return longlora_llama2(VOCAB, LAYERS, HEADS, KV_HEADS, DIM, SEQ, **kwargs)


def _expected(extras, lora_modules=("q_proj", "k_proj", "v_proj", "output_proj")):
    names = set()
    for i in range(LAYERS):
        for proj in lora_modules:
            names |= {f"layers.{i}.attn.{proj}.lora_a.weight", f"layers.{i}.attn.{proj}.lora_b.weight"}
        if "norm" in extras:
            names |= {f"layers.{i}.sa_norm.scale", f"layers.{i}.mlp_norm.scale"}
    if "norm" in extras:
        names.add("norm.scale")
    if "embed" in extras:
        names.add("tok_embeddings.weight")
    return names


@pytest.mark.parametrize("extras", [("embed", "norm"), (), ("embed",), ("norm",)])
def test_trainable_names_are_exactly_lora_embed_norms(extras):
    model = _tiny()
    names = trainable_param_names(model, extras)
    assert names == _expected(extras)
    assert "output.weight" not in names
    sd = trainable_state_dict(model, extras)
    assert set(sd) == names
    for key, param in model.named_parameters():
        if key in names:
            assert torch.equal(sd[key], param)


def test_dora_magnitudes_are_part_of_the_lora_group():
    model = _tiny(use_dora=True)
    names = trainable_param_names(model)
    magnitudes = {
        f"layers.{i}.attn.{p}.magnitude"
        for i in range(LAYERS)
        for p in ("q_proj", "k_proj", "v_proj", "output_proj")
    }
    assert names == _expected(("embed", "norm")) | magnitudes
    assert set(trainable_state_dict(model)) == names
    assert set_trainable_params(model)["lora"] == sum(
        p.numel() for n, p in model.named_parameters() if ".lora_" in n or n.endswith(".magnitude")
    )


def test_default_extras_and_bad_extras():
    assert TRAINABLE_EXTRAS == ("embed", "norm")
    model = _tiny()
    assert trainable_param_names(model) == _expected(("embed", "norm"))
    with pytest.raises(ValueError, match="Unknown trainable extras"):
        trainable_param_names(model, ("embed", "output"))
    with pytest.raises(ValueError, match="string"):
        trainable_param_names(model, "embed")


def test_lora_on_mlp_and_output_counts_as_lora_but_head_weight_stays_frozen():
    model = _tiny(apply_lora_to_mlp=True, apply_lora_to_output=True)
    names = trainable_param_names(model)
    assert {"output.lora_a.weight", "output.lora_b.weight", "layers.0.mlp.w1.lora_a.weight"} <= names
    assert "output.weight" not in names and "layers.0.mlp.w1.weight" not in names


def test_names_survive_activation_checkpointing_wrappers():
    model = _tiny()
    plain = trainable_param_names(model)
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    assert trainable_param_names(model) == plain
    counts = set_trainable_params(model)
    assert counts["total_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(trainable_state_dict(model)) == plain


@pytest.mark.parametrize("extras", [("embed", "norm"), ()])
def test_only_the_trainable_set_gets_gradients(extras):
    torch.manual_seed(0)
    model = _tiny()
    counts = set_trainable_params(model, extras)
    names = _expected(extras)
    params = dict(model.named_parameters())
    assert counts["lora"] == sum(p.numel() for n, p in params.items() if ".lora_" in n)
    assert counts["embed"] == (VOCAB * DIM if "embed" in extras else 0)
    assert counts["norm"] == ((2 * LAYERS + 1) * DIM if "norm" in extras else 0)
    assert counts["total_trainable"] == counts["lora"] + counts["embed"] + counts["norm"]
    assert counts["total"] == sum(p.numel() for p in params.values())
    assert {n for n, p in params.items() if p.requires_grad} == names

    model.train()
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad == names
    # LoRA B starts at zero, so A's gradient is zero at step 0; B, embeddings and norms must get signal.
    for n in names:
        if ".lora_a." not in n:
            assert params[n].grad.abs().sum() > 0, n


def test_llama2_7b_counts_on_meta_device():
    with torch.device("meta"):
        model = longlora_llama2_7b(max_seq_len=8192)
    counts = set_trainable_params(model)
    assert counts["lora"] == 8_388_608  # 32 layers x 4 projections x 8 x (4096 + 4096)
    assert counts["embed"] == 131_072_000  # 32000 x 4096
    assert counts["norm"] == 266_240  # 65 x 4096
    assert counts["total_trainable"] == 139_726_848
    assert counts["total"] == 6_738_415_616 + 8_388_608  # Llama 2 7B + LoRA
    assert counts["lora"] == sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, LoRALinear)
        for p in (m.lora_a.weight, m.lora_b.weight)
    )


# ----------------------------------------------------------------------------------------------------
# PEFT export
# ----------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _hf_base(path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=ORIG,
        rms_norm_eps=1e-5,  # torchtune's Llama 2 default (transformers defaults to 1e-6)
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


def _perturb(model):
    """Stand-in for training: move every trainable tensor away from its initial value."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable_param_names(model):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            if name.endswith(".magnitude"):
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=gen))


def _export_trained(tmp_path, use_dora=False):
    """Base HF model, a "trained" LongLoRA model on it (factor 4) and its PEFT export.

    Returns:
        ``(peft folder, tokens, logits of the trained torchtune model)``.
    """
    _hf_base(tmp_path / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = _tiny(use_dora=use_dora)
    hf_sd = {k: v for k, v in base.state_dict().items()}
    tune_sd = convert_weights.hf_to_tune(hf_sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)
    missing, unexpected = model.load_state_dict(tune_sd, strict=False)
    assert not unexpected and all(".lora_" in k or k.endswith(".magnitude") for k in missing)
    if use_dora:
        for m in model.modules():
            if isinstance(m, DoRALinear):
                m.initialize_dora_magnitude()
    _perturb(model)
    model.eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(tokens)

    out = tmp_path / "peft"
    save_peft_adapter(
        trainable_state_dict(model),
        out,
        model_config={"num_heads": HEADS, "num_kv_heads": KV_HEADS, "embed_dim": DIM},
        base_model_name_or_path=str(tmp_path / "base"),
        lora_rank=4,
        lora_alpha=8.0,
        target_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        rope_scaling_factor=4.0,
    )
    return out, tokens, expected


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_round_trip_matches_torchtune_logits(tmp_path, use_dora):
    out, tokens, expected = _export_trained(tmp_path, use_dora)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["modules_to_save"] == [
        "embed_tokens",
        "input_layernorm",
        "model.norm",
        "post_attention_layernorm",
    ]
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 8.0, use_dora)
    extra = json.loads((out / "rope_scaling.json").read_text())
    assert extra["rope_scaling"] == {"type": "linear", "factor": 4.0}
    assert not list(out.glob("*.tmp"))

    hf = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "base", rope_parameters=extra["rope_parameters"]
    )
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        got = peft_model(tokens).logits
    assert (got - expected).abs().max().item() < 1e-4
    # Sanity: the adapter matters (the base alone is far off), so the comparison is not vacuous.
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(tokens).logits - expected).abs().max().item() > 1e-2


def test_model_card_instructions_reproduce_the_trained_logits(tmp_path):
    import re

    import yaml

    out, tokens, expected = _export_trained(tmp_path)
    card = (out / "README.md").read_text()
    _, front_matter, body = card.split("---\n", 2)
    meta = yaml.safe_load(front_matter)
    assert meta["library_name"] == "peft" and meta["base_model"] == str(tmp_path / "base")
    assert "linear RoPE scaling, factor 4**" in body
    assert "## Why `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` alone is wrong" in body
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert "`modules_to_save`: " + ", ".join(f"`{m}`" for m in saved) in " ".join(body.split())

    # Follow the card: run its code block with this folder as adapter_dir.
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert code.count('"path/to/peft"') == 1
    namespace: dict = {}
    exec(code.replace('"path/to/peft"', repr(str(out))), namespace)
    with torch.no_grad():
        error = (namespace["model"].eval()(tokens).logits - expected).abs().max().item()
    assert error < 1e-5
    # The card's one-line alternative: AutoPeftModelForCausalLM with the same RoPE argument.
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(out, **namespace["rope"]).eval()
    with torch.no_grad():
        assert (auto(tokens).logits - expected).abs().max().item() < 1e-5
    # What the card warns about: AutoPeftModelForCausalLM alone loads the base without the scaling. (The
    # tiny random model's logits are ~0.1, so a RoPE mismatch shows as ~3e-3, hundreds of times the error.)
    plain = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        wrong = (plain(tokens).logits - expected).abs().max().item()
    assert wrong > 1e-3 and wrong > 100 * error
    assert plain.config.rope_parameters["rope_type"] == "default"
    assert namespace["model"].config.rope_parameters["factor"] == 4.0


def test_peft_export_lora_only(tmp_path):
    model = _tiny()
    save_peft_adapter(
        trainable_state_dict(model, extras=()),
        tmp_path,
        model_config={"num_heads": HEADS, "num_kv_heads": KV_HEADS, "embed_dim": DIM},
        base_model_name_or_path="base",
        lora_rank=4,
        lora_alpha=8.0,
        target_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        rope_scaling_factor=4.0,
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    card = (tmp_path / "README.md").read_text()
    assert "LoRA weights only" in card and "modules_to_save`:" not in card
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == LAYERS * 4 * 2 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in keys


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd, kw: sd.update({"output.weight": torch.zeros(VOCAB, DIM)}), "Cannot export output.weight"),
        (lambda sd, kw: kw.update(target_modules=["q_proj", "v_proj"]), "not in target_modules"),
        (lambda sd, kw: kw.update(target_modules=["q_proj", "gate"]), "Unknown target module"),
        (lambda sd, kw: kw.update(model_config={"num_heads": HEADS}), "model_config lacks"),
        (lambda sd, kw: kw.update(lora_rank=16), "lora_rank"),
        (lambda sd, kw: kw.update(rope_scaling_factor=0), "rope_scaling_factor"),
    ],
)
def test_peft_export_errors(tmp_path, change, message):
    sd = trainable_state_dict(_tiny())
    kwargs = dict(
        model_config={"num_heads": HEADS, "num_kv_heads": KV_HEADS, "embed_dim": DIM},
        base_model_name_or_path="base",
        lora_rank=4,
        lora_alpha=8.0,
        target_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        rope_scaling_factor=4.0,
    )
    change(sd, kwargs)
    with pytest.raises(ValueError, match=message):
        save_peft_adapter(sd, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("quantized", [False, True])
def test_model_card_notes_an_nf4_base_only_for_qlora(quantized):
    from longlora_tune.hf.peft import _peft_model_card

    card = _peft_model_card(
        base_model_name_or_path="meta-llama/Llama-2-7b-hf",
        factor=8.0,
        rope_theta=10000.0,
        lora_rank=8,
        lora_alpha=16.0,
        target_modules=["q_proj"],
        use_dora=False,
        saved_modules=[],
        quantized_base=quantized,
    )
    assert ("Trained against a 4-bit (NF4) base" in card) == quantized
    assert ("quantization error" in card) == quantized
