"""The PEFT export of a LongLoRA model: LoRA weights plus the trained embedding and norms.

The trainable set itself is :mod:`longlora_tune.models.trainable`. torchtune's own helpers lose the
extras: ``get_adapter_state_dict`` keeps only LoRA keys and the HF checkpointer's PEFT conversion raises on
anything else, so :func:`save_peft_adapter` converts names itself and exports the embedding and norms as
PEFT ``modules_to_save``.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor
from torchtune.models import convert_weights

from longlora_tune._compat import hf_to_tune_names
from longlora_tune._io import atomic_path, atomic_write_json, atomic_write_text
from longlora_tune.models.trainable import _EMBED_KEY, _LORA_SUFFIXES, _NORM_KEY, unwrapped_name
from longlora_tune.modules.position_interpolation import check_rope_factor

__all__ = ["save_peft_adapter"]

log = logging.getLogger(__name__)

# torchtune -> Hugging Face names of the base weights (torchtune's own table, inverted).
_TUNE_TO_HF = {tune: hf for hf, tune in hf_to_tune_names().items() if tune is not None}
# Hugging Face module names of the extras, for PEFT modules_to_save. "model.norm" (not "norm") because
# PEFT matches modules_to_save by name suffix and "norm" would also match every *_layernorm.
_TUNE_TO_PEFT_SAVED = {"tok_embeddings": "embed_tokens", "sa_norm": "input_layernorm",
                       "mlp_norm": "post_attention_layernorm", "norm": "model.norm"}  # fmt: skip


def _hf_name(tune_key: str) -> str:
    return convert_weights.get_mapped_key(tune_key, _TUNE_TO_HF)


def _permute_rows_to_hf(t: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """Apply to the rows (output features) of ``t`` the permutation torchtune applies to q/k weights.

    HF stores q/k rotary halves as [x0..x(d/2-1), x(d/2)..] while torchtune interleaves pairs; torchtune's
    ``tune_to_hf`` permutes the weight rows: W_hf = P W_tune. With W_tune + B A, the HF equivalent is
    P W_tune + (P B) A, so LoRA B (and a DoRA magnitude, one value per row) gets the same P. torchtune's
    function is reused (with ``dim`` = number of columns) so the two permutations cannot drift apart.
    """
    matrix = t if t.dim() == 2 else t.unsqueeze(1)
    key = "layers.0.attn.q_proj.weight"
    permuted = convert_weights.tune_to_hf(
        {key: matrix}, num_heads=n_heads, num_kv_heads=n_heads, dim=matrix.shape[1], head_dim=head_dim
    )
    out = next(iter(permuted.values()))
    return out if t.dim() == 2 else out.squeeze(1)


# Where the model card's loading snippet names this folder; users (and the tests) put the real path there.
_CARD_ADAPTER_PLACEHOLDER = "path/to/peft"


def _peft_model_card(
    *,
    base_model_name_or_path: str,
    factor: float,
    rope_theta: float,
    lora_rank: int,
    lora_alpha: float,
    target_modules: list[str],
    use_dora: bool,
    saved_modules: list[str],
    quantized_base: bool = False,
    rope_files: Mapping[str, Any] | None = None,
) -> str:
    """README.md of a PEFT export: how to load it with its RoPE scaling, which PEFT cannot record."""
    base = json.dumps(base_model_name_or_path)  # a JSON string is a valid YAML scalar, whatever the path
    rope_type = "linear"
    parameters = json.dumps({"rope_type": "linear", "factor": factor, "rope_theta": rope_theta})
    scaling = json.dumps({"type": "linear", "factor": factor})
    if rope_files is not None:
        rope_type = rope_files["rope_parameters"]["rope_type"]
        # yarn/llama3 also need the served context (transformers 4.51-4.56 derive the YaRN factor from it).
        mpe = f', "max_position_embeddings": {rope_files["max_position_embeddings"]}'
        parameters = json.dumps(rope_files["rope_parameters"]) + f"{mpe}"
        scaling = json.dumps(rope_files["rope_scaling"]) + f"{mpe}"
    method = "DoRA" if use_dora else "LoRA"
    if saved_modules:
        extras = (
            "LongLoRA trains the token embedding and every RMSNorm scale along with the low-rank weights, so "
            "this adapter stores full trained copies of them as PEFT `modules_to_save`: "
            + ", ".join(f"`{m}`" for m in saved_modules)
            + ". PEFT swaps them in when the adapter loads (and `merge_and_unload()` keeps them), which is "
            "why the adapter file is much larger than a plain LoRA adapter. Loading only the LoRA weights "
            "would drop them (LongLoRA paper, Table 2: long-context perplexity is much worse without them)."
        )
        extras = textwrap.fill(extras, width=100, break_long_words=False, break_on_hyphens=False)
    else:
        extras = "This adapter was trained without the embedding/norm extras: LoRA weights only."
    quantization = ""
    if quantized_base:
        quantization = "\n\n## Trained against a 4-bit (NF4) base\n\n" + textwrap.fill(
            "This adapter was trained with QLoRA: the frozen base projections were torchao NF4 tensors "
            "(4-bit NormalFloat, blocks of 64 weights, double-quantized scales) and the adapter learned "
            "on top of their dequantized values. Applying it to the original bf16 base, as the code above "
            "does, differs from the trained model by the quantization error of those weights (the NF4 "
            "rounding, about 9% of each weight's magnitude relative RMS on Gaussian weights; on the tiny "
            "random test model up to 1.1 in max |logit|). The run's `hf/` export holds the dequantized "
            "base with the adapter merged, i.e. the model as trained (max |logit| difference 5e-6 in fp32); "
            "prefer it, or quantize the base to NF4 the same way before applying the adapter.",
            width=100,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return f"""---
library_name: peft
base_model: {base}
tags:
- lora
- longlora
- rope-scaling
---

# LongLoRA {method} adapter ({rope_type} RoPE scaling, factor {factor:g})

{method} adapter (r={lora_rank}, alpha={lora_alpha:g}, target modules: {", ".join(target_modules)}) trained
with LongLoRA for long contexts on top of `{base_model_name_or_path}`. Training interpolated the
positions with **{rope_type} RoPE scaling, factor {factor:g}** (see `rope_scaling.json` for every setting).
PEFT's `adapter_config.json` has no field for RoPE scaling, so the base model must be loaded with it
before the adapter is applied. The same values are in `rope_scaling.json` next to this file.

## Loading it correctly

```python
import transformers
from peft import PeftModel

adapter_dir = "{_CARD_ADAPTER_PLACEHOLDER}"  # the folder holding this README
if int(transformers.__version__.split(".")[0]) >= 5:
    # transformers 5 reads rope_parameters (it also carries rope_theta, which rope_scaling alone would lose)
    rope = {{"rope_parameters": {parameters}}}
else:
    rope = {{"rope_scaling": {scaling}}}
base = transformers.AutoModelForCausalLM.from_pretrained({base}, **rope)
model = PeftModel.from_pretrained(base, adapter_dir)
```

`AutoPeftModelForCausalLM.from_pretrained(adapter_dir, **rope)` is equivalent: PEFT passes the extra
keyword arguments on to the base model's `from_pretrained`.

## Why `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` alone is wrong

Without the `rope_parameters` / `rope_scaling` argument, PEFT loads the base model with its own
`config.json`, i.e. **without** the factor-{factor:g} {rope_type} RoPE scaling. The adapter then sees rotary
positions it was never trained with: the logits differ from the trained model's throughout the
sequence (not only past the base's original context), and long inputs degrade badly. The same holds for
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`. Nothing warns
about it: check that `model.config.rope_parameters` (transformers 5) or `model.config.rope_scaling`
(4.x) shows factor {factor:g}.

If the training run also exported `hf/` (merged weights, `rope_scaling` in its `config.json`),
`AutoModelForCausalLM.from_pretrained("<run>/hf")` loads the same model with no extra arguments.

## Trainable extras

{extras}{quantization}
"""


def save_peft_adapter(
    trainable_sd: Mapping[str, Tensor],
    out_dir: str | Path,
    *,
    model_config: Mapping[str, Any],
    base_model_name_or_path: str,
    lora_rank: int,
    lora_alpha: float,
    target_modules: Iterable[str],
    rope_scaling_factor: float,
    quantized_base: bool = False,
    rope_config: Mapping[str, Any] | None = None,
) -> None:
    """Write a Hugging Face PEFT LoRA adapter, with the embedding and norms as ``modules_to_save``.

    Files: ``adapter_model.safetensors`` (PEFT names, ``base_model.model.`` + HF Llama names; LoRA
    ``lora_A``/``lora_B``, DoRA ``lora_magnitude_vector``; q/k LoRA B rows permuted like torchtune's
    ``tune_to_hf`` permutes the base weights), ``adapter_config.json``, ``rope_scaling.json`` with the
    ``rope_scaling`` the base model must be loaded with, and a ``README.md`` model card (YAML front matter
    ``library_name: peft`` and ``base_model``) that gives the loading code below with the values filled in
    and explains why ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` alone loads the wrong model::

        extra = json.load(open(out_dir / "rope_scaling.json"))
        base = AutoModelForCausalLM.from_pretrained(base_dir, rope_parameters=extra["rope_parameters"])
        model = PeftModel.from_pretrained(base, out_dir)

    (``rope_scaling`` in transformers 4; transformers 5 needs the ``rope_parameters`` form, which also
    carries ``rope_theta``: overriding only ``rope_scaling`` there loses the RoPE base.) PEFT's
    ``adapter_config.json`` has no field for RoPE scaling, so without it the adapter loads but positions
    beyond the original context are wrong.

    Args:
        trainable_sd: torchtune-named trainable tensors (from :func:`trainable_state_dict`): LoRA/DoRA
            weights, optionally ``tok_embeddings.weight`` and norm scales. Any other key is an error.
        out_dir: Output folder (created if missing).
        model_config: ``num_heads``, ``num_kv_heads``, ``embed_dim``; optionally ``head_dim``,
            ``rope_base`` (default 10000, written to ``rope_scaling.json``), ``permute_qk`` (False for Qwen2,
            whose Hugging Face q/k rows are not permuted; default True) and ``tie_word_embeddings``: a tied
            model's trained embedding is also saved as ``lm_head`` (PEFT copies each module it saves, so
            without it the head would keep the base embedding).
        base_model_name_or_path: The base model PEFT should load (hub id or folder).
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA alpha.
        target_modules: torchtune LoRA module names (``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``,
            ``w1``/``w2``/``w3``, ``output``).
        rope_scaling_factor: Linear RoPE factor the adapter was trained with (in ``rope_scaling.json``).
        quantized_base: The adapter was trained against an NF4 base (QLoRA); the model card says so and
            what merging into the bf16 base costs.
        rope_config: The trained RoPE setting as ``config.json`` keys
            (:meth:`~longlora_tune.modules.rope_config.RopeScaling.to_hf_config`: ``rope_theta``,
            ``rope_scaling``, ``max_position_embeddings``) for yarn/llama3; None writes the linear factor.

    Raises:
        ValueError: On a key that cannot be exported, a LoRA module outside ``target_modules``, a shape
            that does not match ``lora_rank``, or a missing ``model_config`` entry.
    """
    missing = [k for k in ("num_heads", "num_kv_heads", "embed_dim") if k not in model_config]
    if missing:
        raise ValueError(f"model_config lacks {missing}; pass num_heads, num_kv_heads and embed_dim")
    num_heads, num_kv_heads = int(model_config["num_heads"]), int(model_config["num_kv_heads"])
    head_dim = int(model_config.get("head_dim") or int(model_config["embed_dim"]) // num_heads)
    rope_theta = float(model_config.get("rope_base", 10_000))
    factor = check_rope_factor(rope_scaling_factor, "rope_scaling_factor")
    permute_qk = bool(model_config.get("permute_qk", True))
    tied = bool(model_config.get("tie_word_embeddings", False))
    if not base_model_name_or_path:
        raise ValueError("base_model_name_or_path is empty; pass the HF base model id or folder")
    target_modules = list(target_modules)
    # torchtune's config conversion validates and maps the module names (e.g. output_proj -> o_proj).
    peft_config = convert_weights.tune_to_peft_adapter_config(
        {"target_modules": target_modules, "r": lora_rank, "lora_alpha": lora_alpha}, base_model_name_or_path
    )

    tensors: dict[str, Tensor] = {}
    saved_modules: set[str] = set()
    use_dora = False
    for key, value in trainable_sd.items():
        key = unwrapped_name(key)
        value = value.detach().to("cpu")
        if key.endswith(_LORA_SUFFIXES):
            suffix = next(s for s in _LORA_SUFFIXES if key.endswith(s))
            module = key[: -len(suffix)]
            if module.rsplit(".", 1)[-1] not in target_modules:
                raise ValueError(f"{key} is a LoRA weight of a module not in target_modules {target_modules}")
            if suffix != ".magnitude" and lora_rank not in value.shape:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}, which does not match lora_rank {lora_rank}"
                )
            hf_module = _hf_name(module + ".weight")[: -len(".weight")]
            if permute_qk and suffix != ".lora_a.weight" and module.endswith((".q_proj", ".k_proj")):
                n = num_heads if module.endswith(".q_proj") else num_kv_heads
                value = _permute_rows_to_hf(value, n, head_dim)
            peft_suffix = {".lora_a.weight": ".lora_A.weight", ".lora_b.weight": ".lora_B.weight"}.get(
                suffix, ".lora_magnitude_vector"
            )
            use_dora = use_dora or suffix == ".magnitude"
            tensors[f"base_model.model.{hf_module}{peft_suffix}"] = value
        elif key == _EMBED_KEY or _NORM_KEY.search(key):
            try:
                hf_key = _hf_name(key)
            except Exception as e:  # torchtune raises a bare Exception for unknown names
                raise ValueError(f"{key} has no Hugging Face Llama name; cannot export it to PEFT") from e
            local = key[: -len(".weight" if key == _EMBED_KEY else ".scale")].rsplit(".", 1)[-1]
            saved_modules.add(_TUNE_TO_PEFT_SAVED[local])
            tensors[f"base_model.model.{hf_key}"] = value
            if tied and key == _EMBED_KEY:
                saved_modules.add("lm_head")
                tensors["base_model.model.lm_head.weight"] = value.clone()  # safetensors refuses aliases
        else:
            raise ValueError(
                f"Cannot export {key} to a PEFT adapter: only LoRA weights, tok_embeddings and norm scales "
                "belong to the LongLoRA trainable set"
            )
    if not any(".lora_" in k for k in tensors):
        raise ValueError("trainable_sd has no LoRA weights; pass trainable_state_dict(model)")

    peft_config.update(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        lora_dropout=0.0,
        bias="none",
        use_dora=use_dora,
        modules_to_save=sorted(saved_modules) or None,
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    atomic_write_json(out / "adapter_config.json", peft_config)
    rope_files: dict[str, Any] | None = None
    if rope_config is not None and rope_config.get("rope_scaling"):
        entry = dict(rope_config["rope_scaling"])
        params = {k: v for k, v in entry.items() if k != "type"}
        rope_files = {
            "rope_scaling": entry,
            "rope_parameters": {**params, "rope_theta": float(rope_config["rope_theta"])},
            "max_position_embeddings": int(rope_config["max_position_embeddings"]),
        }
    note = (
        "Load the base model with this RoPE scaling before PeftModel.from_pretrained: "
        "from_pretrained(base, rope_parameters=...) on transformers>=5, rope_scaling=... on 4.x."
    )
    atomic_write_json(
        out / "rope_scaling.json",
        {**rope_files, "note": note + " Pass max_position_embeddings too."}
        if rope_files is not None
        else {
            "rope_scaling": {"type": "linear", "factor": factor},
            "rope_parameters": {"rope_type": "linear", "factor": factor, "rope_theta": rope_theta},
            "note": note,
        },
    )
    atomic_write_text(
        out / "README.md",
        _peft_model_card(
            base_model_name_or_path=base_model_name_or_path,
            factor=factor,
            rope_theta=rope_theta,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=sorted(peft_config["target_modules"]),
            use_dora=use_dora,
            saved_modules=sorted(saved_modules),
            quantized_base=quantized_base,
            rope_files=rope_files,
        ),
    )
    log.info(
        "Wrote PEFT adapter (%d tensors, modules_to_save=%s) to %s", len(tensors), sorted(saved_modules), out
    )
