"""Llama 3.x, Mistral and Qwen2.5 LongLoRA models against transformers, a dense S² reference and torchtune.

Every base model here is a tiny random checkpoint written by transformers' own ``save_pretrained``; our
side reads it with ``HFBaseModel`` exactly as the recipe does (family, builder arguments, RoPE facts).
References are independent: transformers' models with an explicitly written RoPE config, a dense
boolean-mask S², and torchtune's own published builders.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchtune.modules import MultiHeadAttention, TiedLinear
from torchtune.modules.peft import LoRALinear
from torchtune.training.checkpointing import FullModelHFCheckpointer

from longlora_tune._compat import import_object
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.eval.model_loading import load_eval_model
from longlora_tune.hf import export
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models import longlora_llama3, longlora_mistral, longlora_qwen2
from longlora_tune.models.families import FAMILIES, detect_family, family_of_builder
from longlora_tune.models.longlora import describe
from longlora_tune.models.trainable import set_trainable_params, trainable_state_dict
from longlora_tune.modules.rope_config import RopeScaling, rope_for_training

transformers = pytest.importorskip("transformers")

ORIGINAL = 32  # the tiny checkpoints' pretraining context
SEQ = 256  # 8x the original context: every case is evaluated past 4x
VOCAB = 96
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,  # head_dim 16: several RoPE frequency bands
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL}  # fmt: skip

# name -> (transformers classes, config kwargs, family, the RoPE transformers must be given at SEQ)
CASES = {
    # Llama 3.1 style: already llama3-scaled (x4 of 32 = 128); extended to 256 -> llama3 factor 8.
    "llama3": (
        "Llama",
        dict(max_position_embeddings=128, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500_000.0},
             tie_word_embeddings=False),
        "llama3",
        {**LLAMA3_ROPE, "factor": 8.0, "rope_theta": 500_000.0},
    ),
    # Llama 3.2 style: the same, with tied embeddings.
    "llama3_tied": (
        "Llama",
        dict(max_position_embeddings=128, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500_000.0},
             tie_word_embeddings=True),
        "llama3",
        {**LLAMA3_ROPE, "factor": 8.0, "rope_theta": 500_000.0},
    ),
    # Mistral: unscaled, extended with LongLoRA's linear interpolation (the family default).
    "mistral": (
        "Mistral",
        dict(max_position_embeddings=ORIGINAL, sliding_window=None,
             rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        "mistral",
        {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    ),
    # Qwen2.5: q/k/v biases, unscaled, extended with YaRN (the family default); tied and untied.
    "qwen2_tied": (
        "Qwen2",
        dict(max_position_embeddings=ORIGINAL, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        "qwen2",
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
         "rope_theta": 1_000_000.0},
    ),
    "qwen2_untied": (
        "Qwen2",
        dict(max_position_embeddings=ORIGINAL, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        "qwen2",
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
         "rope_theta": 1_000_000.0},
    ),
}  # fmt: skip


def _write_base(case: str, path, seed: int = 0):
    """A tiny random transformers model of the case's family, saved with save_pretrained."""
    prefix, extra, _, _ = CASES[case]
    config = getattr(transformers, f"{prefix}Config")(**SHAPE, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a dropped one cannot pass
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _reference(case: str, folder):
    """transformers' model of ``folder`` with the extended RoPE written out by hand (independent of us)."""
    rope = CASES[case][3]
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), rope_parameters=dict(rope), max_position_embeddings=SEQ, dtype=torch.float32
    ).eval()


def _ours(folder, seq: int = SEQ, **knobs):
    """Our LongLoRA model of an HF folder, built and loaded exactly as the recipe does."""
    base = HFBaseModel.read(folder)
    builder = import_object(base.family.builder, "model._component_")
    kwargs = {**base.builder_kwargs, **base.builder_rope_kwargs(), "lora_rank": 4, "lora_alpha": 8.0, **knobs}
    model = builder(max_seq_len=seq, **kwargs)
    missing, unexpected = model.load_state_dict(base.load_state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".lora_" in k for k in missing)  # only the (fresh) LoRA weights
    return model, base


def _tokens(seed: int, n: int = SEQ, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _perturb_trainable(model) -> None:
    """Stand-in for training: LoRA B, embeddings and norms move away from the base."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name or "norm" in name or "tok_embeddings" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------------------------------
# Detection and eval logits against transformers past 4x the original context
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_logits_match_transformers_past_4x_context(tmp_path, case):
    folder = _write_base(case, tmp_path / "base")
    model, base = _ours(folder)
    family = CASES[case][2]
    assert base.family.name == family
    info = describe(model)
    want = CASES[case][3]
    assert info.rope.rope_type == want["rope_type"] and info.rope.factor == want["factor"]
    assert info.rope_scaling_factor == want["factor"]
    tied = CASES[case][1].get("tie_word_embeddings", False)
    assert isinstance(model.output, TiedLinear) == tied
    if family == "qwen2":
        assert model.layers[0].attn.q_proj.bias is not None  # LoRALinear over a biased projection

    # torchtune's own checkpointer (model_type from the family table) loads the same tensors.
    state = FullModelHFCheckpointer(
        checkpoint_dir=str(folder),
        checkpoint_files=["model.safetensors"],
        model_type=base.checkpointer_model_type,
        output_dir=str(tmp_path / "tt_out"),
    ).load_checkpoint()["model"]
    ours_sd = base.load_state_dict()
    assert set(state) == set(ours_sd)
    assert all(torch.equal(state[k], ours_sd[k]) for k in state)

    tokens = _tokens(1)
    hf = _reference(case, folder)
    model.eval()
    with torch.no_grad():
        got, want_logits = model(tokens), hf(tokens).logits
    assert (got - want_logits).abs().max().item() < 1e-4
    # The checkpoint's own RoPE (no extension) gives different long-context logits: the check has teeth.
    plain, _ = _ours(folder)
    plain.layers[0].attn.pos_embeddings = base.rope.build_module(16, SEQ, half_rotation=family == "qwen2")
    with torch.no_grad():
        assert (plain.eval()(tokens) - want_logits).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------------
# S² in train mode: against a dense-mask reference, per family
# --------------------------------------------------------------------------------------------------


def _dense_s2_attention(q, k, v, *, group):
    """Full SDPA with the no-wrap S² pattern as a dense boolean mask (q/k/v already [b, h, n, d])."""
    _, h, n, _ = q.shape
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    masks = [
        (ki <= qi) & ((qi + s) // group == (ki + s) // group)
        for s in [0] * (h // 2) + [group // 2] * (h // 2)
    ]
    allowed = torch.stack(masks)[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _with_dense_s2(model, group):
    for attn in model.modules():
        if isinstance(attn, MultiHeadAttention):
            del attn._attention_call  # a child module; a plain function cannot replace it in place
            attn._attention_call = lambda q, k, v, **kw: _dense_s2_attention(q, k, v, group=group)
    return model


@pytest.mark.parametrize("case", ["llama3_tied", "mistral", "qwen2_tied"])
def test_s2_engaged_in_train_mode(tmp_path, case):
    folder = _write_base(case, tmp_path / "base")
    model, _ = _ours(folder, s2_backend="sdpa")
    group = describe(model).group_size
    assert group == SEQ // 4
    _perturb_trainable(model)
    tokens = _tokens(2)
    with torch.no_grad():
        s2_logits = model.train()(tokens)
        full_logits = model.eval()(tokens)
    reference, _ = _ours(folder)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref_logits = _with_dense_s2(reference, group).eval()(tokens)
    torch.testing.assert_close(s2_logits, ref_logits, atol=1e-5, rtol=1e-5)
    half = group // 2
    torch.testing.assert_close(s2_logits[:, :half], full_logits[:, :half], atol=1e-5, rtol=1e-5)
    assert (s2_logits[:, half:] - full_logits[:, half:]).abs().amax(dim=-1).min() > 1e-6


@pytest.mark.parametrize("num_kv_heads", [1, 3])
def test_s2_with_one_or_an_odd_number_of_kv_heads_matches_float64_reference(num_kv_heads):
    """S² splits the 6 *query* heads 3 + 3; with 1 or 3 KV heads each half still sees its own KV copies.

    Reference: the same weights as a plain multi-head model (each KV head's k/v rows copied to its query
    heads by hand, as GQA defines it) with a dense float64 S² mask -- no torchtune GQA expansion involved.
    """
    torch.manual_seed(0)
    heads, head_dim, dim = 6, 8, 48
    kwargs = dict(intermediate_dim=64, lora_rank=4, original_max_seq_len=16, s2_backend="sdpa")
    with torch.device("cpu"):
        gqa = longlora_llama3(VOCAB, 2, heads, num_kv_heads, dim, 64, **kwargs).double()
        mha = longlora_llama3(VOCAB, 2, heads, heads, dim, 64, **kwargs).double()
    _perturb_trainable(gqa)
    per = heads // num_kv_heads
    state = {}
    for k, v in gqa.state_dict().items():
        if any(
            k.endswith(f"attn.{p}_proj.weight") or k.endswith(f"attn.{p}_proj.lora_b.weight") for p in "kv"
        ):
            v = v.view(num_kv_heads, head_dim, -1).repeat_interleave(per, dim=0).reshape(heads * head_dim, -1)
        state[k] = v
    mha.load_state_dict(state)
    group = describe(gqa).group_size
    tokens = _tokens(3, n=64)
    with torch.no_grad():
        got = gqa.train()(tokens)
        want = _with_dense_s2(mha, group).eval()(tokens)
        full = gqa.eval()(tokens)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert (got - full).abs().max() > 1e-4  # S² really differs from full attention here


def test_odd_query_head_count_builds_with_s2_and_with_full_attention():
    # 7 query heads: 3 unshifted, 4 shifted (longlora_tune.modules.s2_heads); numerics are checked against
    # the float64 reference in tests/modules/test_s2_attention.py.
    model = longlora_qwen2(VOCAB, 1, 7, 1, 56, 64, intermediate_dim=64, original_max_seq_len=16)
    assert describe(model).group_size == 16
    model = longlora_qwen2(VOCAB, 1, 7, 1, 56, 64, intermediate_dim=64, original_max_seq_len=16,
                           use_full_attn=True)  # fmt: skip
    assert describe(model).group_size is None


# --------------------------------------------------------------------------------------------------
# Exports: merged HF, PEFT, adapter -> eval loader
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_export_loads_in_transformers_with_its_rope(tmp_path, case):
    folder = _write_base(case, tmp_path / "base")
    model, base = _ours(folder)
    _perturb_trainable(model)
    model.eval()
    out = export.save_merged_hf_checkpoint(
        {k: v.clone() for k, v in model.state_dict().items()},
        tmp_path / "hf",
        base=base,
        model_info=describe(model),
    )
    config = json.loads((out / "config.json").read_text())
    want = CASES[case][3]
    for key in ("rope_scaling", "rope_parameters"):
        assert config[key]["rope_type"] == want["rope_type"] and config[key]["factor"] == want["factor"]
    assert config["model_type"] == base.config["model_type"]
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    tied = CASES[case][1].get("tie_word_embeddings", False)
    assert config["tie_word_embeddings"] == tied and ("lm_head.weight" in written) == (not tied)
    tokens = _tokens(4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(tokens)
        assert (hf(tokens).logits - expected).abs().max().item() < 1e-4
        # Our eval loader reads the method back from config.json (not just a linear factor).
        evaluated, info = load_eval_model(out, max_seq_len=SEQ)
        assert info["rope_scaling"]["rope_type"] == want["rope_type"]
        assert (evaluated(tokens) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["llama3_tied", "qwen2_tied", "qwen2_untied", "mistral"])
def test_peft_and_adapter_exports_reproduce_the_trained_model(tmp_path, case):
    peft = pytest.importorskip("peft")
    folder = _write_base(case, tmp_path / "base")
    model, base = _ours(folder)
    set_trainable_params(model)
    _perturb_trainable(model)
    model.eval()
    info = describe(model)
    trainable = trainable_state_dict(model)
    assert "tok_embeddings.weight" in trainable and "output.weight" not in trainable
    peft_dir = export.save_peft(
        trainable, tmp_path / "peft", base=base, model_info=info, base_model_name_or_path=str(folder)
    )
    adapter_dir = export.save_adapter(
        trainable,
        tmp_path / "adapter",
        export.LongLoRAExportInfo(
            model_config={"_component_": base.family.builder, **base.builder_kwargs, "max_seq_len": SEQ,
                          "lora_rank": 4, "lora_alpha": 8.0},
            rope_scaling_factor=info.rope_scaling_factor,
            group_size=info.group_size,
            trainable_extras=["embed", "norm"],
            base_checkpoint_dir=str(folder),
            rope=info.rope,
        ),
    )  # fmt: skip
    meta = json.loads((adapter_dir / "longlora.json").read_text())
    assert meta["rope_scaling"]["rope_type"] == CASES[case][3]["rope_type"]
    rope_files = json.loads((peft_dir / "rope_scaling.json").read_text())
    tokens = _tokens(5)
    with torch.no_grad():
        expected = model(tokens)
        kwargs = {"rope_parameters": rope_files["rope_parameters"]}
        if "max_position_embeddings" in rope_files:
            kwargs["max_position_embeddings"] = rope_files["max_position_embeddings"]
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, **kwargs
        )
        peft_model = peft.PeftModel.from_pretrained(hf_base, str(peft_dir)).eval()
        assert (peft_model(tokens).logits - expected).abs().max().item() < 1e-4
        from_adapter, _ = load_eval_model(None, adapter_dir=adapter_dir, max_seq_len=SEQ + 32)
        assert (from_adapter(tokens) - expected).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------------
# Published shapes, against torchtune's own builders
# --------------------------------------------------------------------------------------------------

TORCHTUNE_SIZES = {
    "llama3_8b": "torchtune.models.llama3.llama3_8b",
    "llama3_1_8b": "torchtune.models.llama3_1.llama3_1_8b",
    "llama3_1_70b": "torchtune.models.llama3_1.llama3_1_70b",
    "llama3_2_1b": "torchtune.models.llama3_2.llama3_2_1b",
    "llama3_2_3b": "torchtune.models.llama3_2.llama3_2_3b",
    "llama3_3_70b": "torchtune.models.llama3_3.llama3_3_70b",
    "qwen2_5_0_5b": "torchtune.models.qwen2_5.qwen2_5_0_5b",
    "qwen2_5_1_5b": "torchtune.models.qwen2_5.qwen2_5_1_5b_base",
    "qwen2_5_3b": "torchtune.models.qwen2_5.qwen2_5_3b",
    "qwen2_5_7b": "torchtune.models.qwen2_5.qwen2_5_7b_base",
    "qwen2_5_14b": "torchtune.models.qwen2_5.qwen2_5_14b_base",
    "qwen2_5_32b": "torchtune.models.qwen2_5.qwen2_5_32b_base",
    "qwen2_5_72b": "torchtune.models.qwen2_5.qwen2_5_72b_base",
    "mistral_7b": "torchtune.models.mistral.mistral_7b",
}


def _summary(model):
    attn = model.layers[0].attn
    q = attn.q_proj
    return dict(
        layers=len(model.layers),
        heads=attn.num_heads,
        kv_heads=attn.num_kv_heads,
        embed=tuple(model.tok_embeddings.weight.shape),
        hidden=model.layers[0].mlp.w1.weight.shape[0],
        tied=isinstance(model.output, TiedLinear),
        bias=getattr(q, "bias", None) is not None if not isinstance(q, LoRALinear) else q.use_bias,
        eps=model.norm.eps,
    )


@pytest.mark.parametrize("name", sorted(TORCHTUNE_SIZES))
def test_sized_builders_match_torchtune_shapes(name):
    import longlora_tune.models as models

    with torch.device("meta"):
        ours = getattr(models, f"longlora_{name}")(max_seq_len=65536)
        theirs = import_object(TORCHTUNE_SIZES[name], "model")()
    mine, ref = _summary(ours), _summary(theirs)
    if name == "mistral_7b":
        # Ours is Mistral-7B-v0.3 (32768-token vocabulary); torchtune's builder is v0.1's 32000.
        assert mine.pop("embed") == (32_768, 4096) and ref.pop("embed") == (32_000, 4096)
    assert mine == ref
    attn = ours.layers[0].attn
    assert all(
        isinstance(getattr(attn, p), LoRALinear) for p in ("q_proj", "k_proj", "v_proj", "output_proj")
    )
    assert attn.q_proj.rank == 8 and attn.q_proj.alpha == 16
    assert describe(ours).group_size == 65536 // 4
    assert family_of_builder(f"longlora_tune.models.longlora_{name}").name in name.replace("_5", "")
    with pytest.raises(ValueError, match="fixes"):
        getattr(models, f"longlora_{name}")(max_seq_len=8192, num_layers=2)


def test_sized_builders_default_rope():
    from longlora_tune.models import longlora_llama3_1_8b, longlora_llama3_8b, longlora_qwen2_5_7b

    with torch.device("meta"):
        l31 = describe(longlora_llama3_1_8b(max_seq_len=262_144)).rope
        l3 = describe(longlora_llama3_8b(max_seq_len=32_768)).rope
        qwen = describe(longlora_qwen2_5_7b(max_seq_len=131_072)).rope
    # Llama 3.1: its own llama3 scaling, factor 8 -> 16 for twice its 128k, context 256k.
    assert (l31.rope_type, l31.factor, l31.original_max_position_embeddings, l31.context_len) == (
        "llama3", 16.0, 8192, 262_144,
    )  # fmt: skip
    assert (l3.rope_type, l3.factor, l3.rope_theta) == ("linear", 4.0, 500_000.0)
    # Qwen2.5's recipe: YaRN x4 over its 32k pretraining context for 128k.
    assert (qwen.rope_type, qwen.factor, qwen.original_max_position_embeddings) == ("yarn", 4.0, 32_768)


def test_tied_embedding_is_the_head_and_is_trained():
    model = longlora_qwen2(VOCAB, 1, 4, 2, 32, 64, intermediate_dim=64, tie_word_embeddings=True,
                           original_max_seq_len=16)  # fmt: skip
    counts = set_trainable_params(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "tok_embeddings.weight" in names and not any(n.startswith("output") for n in names)
    assert counts["embed"] == VOCAB * 32
    assert model.output.tied_module is model.tok_embeddings
    logits = model(_tokens(6, n=16, batch=1))
    logits.sum().backward()
    # The head's gradient flows into the embedding: the head is trained with it.
    grad_from_head = model.tok_embeddings.weight.grad.abs().sum(dim=1)
    assert (grad_from_head > 0).all()  # every row is used by the head, not only the 16 input tokens


# --------------------------------------------------------------------------------------------------
# Family detection and RoPE requests
# --------------------------------------------------------------------------------------------------


def _cfg(**extra):
    return {"vocab_size": 32_000, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
            "intermediate_size": 128, **extra}  # fmt: skip


def test_llama2_llama3_rule_and_table():
    assert detect_family(_cfg(model_type="llama", rope_theta=10_000.0)).name == "llama2"
    assert detect_family(_cfg()).name == "llama2"  # no model_type: an early Llama 2 conversion
    assert detect_family(_cfg(model_type="llama", rope_theta=500_000.0)).name == "llama3"
    assert detect_family(_cfg(model_type="llama", vocab_size=128_256)).name == "llama3"
    scaled = _cfg(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert detect_family(scaled).name == "llama3"
    assert detect_family(_cfg(model_type="qwen2")) is FAMILIES["qwen2"]
    assert FAMILIES["llama3"].checkpointer_type(True) == "LLAMA3_2"
    assert FAMILIES["llama3"].checkpointer_type(False) == "LLAMA3"
    assert FAMILIES["qwen2"].checkpointer_type(True) == "QWEN2"


@pytest.mark.parametrize(
    "config, message",
    [
        (_cfg(model_type="gemma"), r"model_type='gemma' is not supported; LongLoRA supports llama .*qwen2"),
        (_cfg(model_type="mistral", sliding_window=4096, max_position_embeddings=32768), "window=4096"),
        (_cfg(model_type="llama", attention_bias=True), "attention_bias"),
        (_cfg(model_type="llama", head_dim=32), "head_dim=32"),
    ],
)  # fmt: skip
def test_unsupported_checkpoints_are_one_line_errors(tmp_path, config, message):
    with pytest.raises(LongLoRAConfigError, match=message) as e:
        detect_family(config)
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LongLoRAConfigError, match=message):
        HFBaseModel.read(tmp_path)


def test_tokenizer_config_per_family(tmp_path):
    for model_type, extra, component, files in [
        ("llama", {"rope_theta": 500_000.0}, "llama3_tokenizer", {"path": "original/tokenizer.model"}),
        ("mistral", {}, "mistral_tokenizer", {"path": "tokenizer.model"}),
        ("qwen2", {}, "qwen2_5_tokenizer", {"path": "vocab.json", "merges_file": "merges.txt"}),
    ]:
        base = HFBaseModel(tmp_path, _cfg(model_type=model_type, **extra), ())
        section = base.tokenizer_config(max_seq_len=100)
        assert section["_component_"].endswith(component) and section["max_seq_len"] == 100
        assert {k: v for k, v in section.items() if k in files} == {
            k: str(tmp_path / v) for k, v in files.items()
        }
        import_object(section["_component_"], "tokenizer")  # a real torchtune tokenizer builder


LLAMA31 = RopeScaling.from_hf_config(
    {"rope_theta": 500_000.0, "max_position_embeddings": 131_072,
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}}
)  # fmt: skip
PLAIN = RopeScaling(original_max_position_embeddings=32_768, rope_theta=1e6)


@pytest.mark.parametrize(
    "checkpoint, request_, message",
    [
        (LLAMA31, {"type": "yarn", "factor": 4}, "yarn over the checkpoint's own llama3"),
        (LLAMA31, {"type": "linear"}, "linear over the checkpoint's own llama3"),
        (LLAMA31, {"type": "llama3", "factor": 4}, "below the checkpoint's own llama3 factor 8"),
        (PLAIN, {"type": "dynamic"}, "rope_scaling.type='dynamic'"),
        (PLAIN, {"type": "yarn", "scale": 2}, r"unknown keys \['scale'\]"),
        (PLAIN, {"type": "linear", "original_max_position_embeddings": 4096}, "for yarn and llama3"),
        (PLAIN, {"type": "yarn", "factor": 0.5}, "factor"),
        (PLAIN, "yarn", "use a mapping"),
    ],
)
def test_rope_requests_refused_one_line(checkpoint, request_, message):
    with pytest.raises(LongLoRAConfigError, match=message) as e:
        rope_for_training(checkpoint, 262_144, request=request_)
    assert "\n" not in str(e.value)


def test_rope_requests_resolved():
    # Llama 3.1 at 256k: its own method, factor and context doubled (the default and an explicit request).
    for request in (None, {"type": "llama3"}, {"type": "llama3", "factor": 16}):
        rope = rope_for_training(LLAMA31, 262_144, request=request)
        assert (rope.rope_type, rope.factor, rope.context_len) == ("llama3", 16.0, 262_144)
    # Qwen-style YaRN from the 32k pretraining context of a checkpoint that states 131072.
    qwen = RopeScaling(original_max_position_embeddings=131_072, rope_theta=1e6)
    rope = rope_for_training(
        qwen, 131_072, request={"type": "yarn", "original_max_position_embeddings": 32_768}
    )
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 32_768)
    assert rope.to_hf_config()["max_position_embeddings"] == 131_072
    # Families' defaults for an unscaled checkpoint.
    assert rope_for_training(PLAIN, 65_536, default_type="yarn").rope_type == "yarn"
    assert rope_for_training(PLAIN, 65_536).rope_type == "linear"
    assert math.isclose(rope_for_training(PLAIN, 65_536, request={"type": "linear", "factor": 3}).factor, 3.0)


def test_builders_refuse_conflicting_factor_and_stacking():
    with pytest.raises(ValueError, match="disagrees"):
        longlora_mistral(VOCAB, 1, 4, 2, 32, 64, intermediate_dim=64, original_max_seq_len=16,
                         rope_scaling={"type": "linear", "factor": 4}, rope_scaling_factor=2.0)  # fmt: skip
    with pytest.raises(LongLoRAConfigError, match="cannot be written as one"):
        longlora_llama3(VOCAB, 1, 4, 2, 32, 64, intermediate_dim=64, original_max_seq_len=128,
                        checkpoint_rope_scaling=dict(LLAMA3_ROPE), rope_scaling={"type": "yarn"})  # fmt: skip


@pytest.mark.parametrize(
    "name, published",
    [("llama3_1_8b", 8_030_261_248), ("llama3_2_1b", 1_235_814_400), ("mistral_7b", 7_248_023_552),
     ("qwen2_5_0_5b", 494_032_768), ("qwen2_5_7b", 7_615_616_512)],
)  # fmt: skip
def test_planner_counts_tied_heads_and_biases(name, published):
    from longlora_tune.models.shapes import MODEL_SHAPES
    from longlora_tune.plan import plan
    from longlora_tune.plan.memory import parameter_counts

    shape = MODEL_SHAPES[name]
    _, total = parameter_counts(shape)
    # The built model (tied head counted once, Qwen's q/k/v biases) equals the table's formula and the
    # published parameter count.
    assert total - shape.lora_params(8) == shape.base_params() == published
    assert plan(name, 32_768, gpus=8, gpu_memory_gib=80) is not None
