"""The peer: the LongLoRA training step a user would assemble from transformers + PEFT, timed like ours.

Same shape, seed and tokens as a ``longlora`` case of :mod:`benchmarks.train_step`:
``LlamaForCausalLM`` built from a ``LlamaConfig`` (random init), PEFT LoRA r8/alpha16 (no dropout) on
q/k/v/o with ``embed_tokens`` and every RMSNorm trainable through ``modules_to_save``, non-reentrant gradient
checkpointing, AdamW over the trainable parameters, and the no-wrap S² registered through transformers'
``AttentionInterface`` as :func:`s2_sdpa_attention`: about 20 lines computing it per group with SDPA,
the second half of the heads shifted by ``G/2``. The loss is the model's own (``labels=`` to the forward).

Adapters are kept in the model's dtype (``autocast_adapter_dtype=False``) so that both sides run one
precision; PEFT's default would upcast them to fp32 under bf16.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.train_step import Case, add_flops, measure_steps, resolve_shape
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.s2_attention import S2AttentionConfig
from longlora_tune.training.distributed import resolve_device, resolve_dtype

__all__ = ["ATTN_IMPLEMENTATION", "run_peer_case", "s2_sdpa_attention", "s2_sdpa_reference"]

#: Name under which the peer's S² is registered in transformers' ``AttentionInterface``.
ATTN_IMPLEMENTATION = "longlora_peer_s2"

_MODULES_TO_SAVE = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]


def _causal_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float | None):
    # Causal attention inside consecutive groups of `group` tokens from position 0 (the last may be short):
    # whole groups are folded into the batch for one SDPA call, the remainder gets a second call.
    b, h, n, d = q.shape
    whole = n // group * group
    outs = []
    if whole:
        fold = [x[:, :, :whole].reshape(b, h * (whole // group), group, d) for x in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*fold, is_causal=True, scale=scale).view(b, h, whole, d))
    if whole < n:
        rest = [x[:, :, whole:] for x in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*rest, is_causal=True, scale=scale))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def s2_sdpa_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float | None = None
) -> torch.Tensor:
    """No-wrap S² over ``[b, h, n, d]``: heads ``[0, h//2)`` in groups from 0, the rest shifted by ``G/2``.

    Args:
        q: Queries ``[b, h, n, d]``.
        k: Keys ``[b, h, n, d]`` (GQA already expanded).
        v: Values ``[b, h, n, d]``.
        group: Group size ``G`` (even).
        scale: Softmax scale (default ``1/sqrt(d)``).

    Returns:
        ``[b, h, n, d]``.
    """
    half, shift = q.shape[1] // 2, group // 2
    first = _causal_groups(q[:, :half], k[:, :half], v[:, :half], group, scale)
    q2, k2, v2 = q[:, half:], k[:, half:], v[:, half:]
    head = F.scaled_dot_product_attention(
        q2[:, :, :shift], k2[:, :, :shift], v2[:, :, :shift], is_causal=True, scale=scale
    )
    if q.shape[2] > shift:
        tail = _causal_groups(q2[:, :, shift:], k2[:, :, shift:], v2[:, :, shift:], group, scale)
        head = torch.cat([head, tail], dim=2)
    return torch.cat([first, head], dim=1)


def s2_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function: S² with the group size from ``module.config``.

    Args:
        module: The attention module (``module.config.s2_group_size`` is ``G``).
        query: ``[b, h, n, d]``.
        key: ``[b, h_kv, n, d]``.
        value: ``[b, h_kv, n, d]``.
        attention_mask: Ignored (unpadded training sequences; no mask function is registered).
        scaling: Softmax scale.
        dropout: Must be 0.
        **kwargs: Ignored.

    Returns:
        ``([b, n, h, d], None)`` as transformers' attention functions return.
    """
    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = s2_sdpa_reference(query, key, value, module.config.s2_group_size, scaling)
    return out.transpose(1, 2).contiguous(), None


def run_peer_case(case: Case) -> dict[str, Any]:
    """Build the transformers + PEFT model of ``case`` and time its training steps in this process.

    Args:
        case: What to measure (``variant`` is ``peer``; ``backend`` is ignored: the peer's S² uses SDPA).

    Returns:
        The same fields as :func:`benchmarks.train_step.run_case`.

    Raises:
        ValueError: If the device or dtype is unavailable here.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    try:
        device = resolve_device(case.device)
        dtype = resolve_dtype(case.dtype, device)
    except LongLoRAConfigError as e:
        raise ValueError(str(e)) from e
    if device.type == "cpu":
        torch.set_num_threads(case.threads)
    shape = resolve_shape(case.shape, case.layers)
    load_before = os.getloadavg()
    AttentionInterface.register(ATTN_IMPLEMENTATION, s2_sdpa_attention)
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.embed_dim,
        intermediate_size=shape.intermediate_dim,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=case.seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config.s2_group_size = S2AttentionConfig().resolve_group_size(case.seq_len)  # our model's group
    config._attn_implementation = ATTN_IMPLEMENTATION
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype)
    if case.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        modules_to_save=_MODULES_TO_SAVE,
    )
    model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (case.batch_size, case.seq_len), generator=generator).to(
        device
    )

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss  # shifts labels inside
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    result = measure_steps(case, device, step, load_before=load_before)
    result["trainable"] = {"total": sum(p.numel() for p in trainable)}
    add_flops(result, case, shape, config.s2_group_size, device)
    return result
