"""Greedy and nucleus-sampling decoding for torchtune decoders, with a KV cache and a streaming callback.

The loop relies on a small interface that every torchtune ``TransformerDecoder`` (and a LongLoRA model
built from one) provides, so a test can drive it with a stub module:

* ``model(tokens, input_pos=..., mask=...)`` returns logits ``[batch, seq, vocab]``;
* ``model.setup_caches(batch_size, dtype, decoder_max_seq_len=...)``, ``model.caches_are_setup()``,
  ``model.reset_caches()``, the ``model.decoder_max_cache_seq_len`` attribute and torchtune's
  ``delete_kv_caches(model)`` manage the cache (only when ``use_cache=True``).

With a cache, the prompt is prefilled in chunks of ``prefill_chunk_size`` tokens: torchtune needs an
explicit boolean mask of shape ``[1, chunk, cache_len]`` once caches exist, and one mask for a whole
100k-token prompt would take 10 GB, whereas a 2048-token chunk needs 200 MB. Attention over the chunks
is exactly full causal attention over the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchtune.modules.common_utils import delete_kv_caches

__all__ = ["drop_kv_caches", "generate", "prepare_kv_cache", "sample_next_token"]


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from one position's logits.

    Args:
        logits: ``[vocab]`` logits of the last position.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` (1.0 keeps all).
        top_k: keep only the ``top_k`` most likely tokens (None keeps all).
        generator: random generator for reproducible sampling.

    Returns:
        The chosen token id.

    Raises:
        ValueError: on a negative temperature, ``top_p`` outside (0, 1] or ``top_k`` < 1.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits).item())
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens ranked above it already reach top_p, so the most likely
        # token always survives.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def drop_kv_caches(model: nn.Module) -> None:
    """Delete the model's KV caches, if any, before mask-less full-sequence forward passes.

    Deleted, not disabled: torchtune 0.6.1's attention passes ``is_causal=False`` to SDPA for a call
    without a mask whenever a KV cache object exists, even a disabled one, so a leftover cache would make
    later full-sequence passes silently non-causal.

    Args:
        model: torchtune decoder (or any module; modules without caches are left alone).
    """
    if hasattr(model, "caches_are_setup") and model.caches_are_setup():
        delete_kv_caches(model)


def prepare_kv_cache(model: nn.Module, cache_len: int, dtype: torch.dtype | None = None) -> int:
    """Make the model's KV cache hold ``cache_len`` positions, emptied, reusing the current one if it fits.

    A cache is reused while it is at most twice the needed length (every decode step attends over the
    whole cache, so a far larger one wastes compute); otherwise it is deleted and a new one of
    ``cache_len`` rounded up to 256 positions is allocated.

    Args:
        model: torchtune decoder.
        cache_len: positions needed (prompt + new tokens).
        dtype: cache dtype; defaults to the dtype of the model's parameters.

    Returns:
        The cache length (positions); attention masks must span all of them.
    """
    if model.caches_are_setup():
        current = model.decoder_max_cache_seq_len or 0
        if cache_len <= current <= 2 * cache_len:
            model.reset_caches()
            return current
        delete_kv_caches(model)
    allocated = -(-cache_len // 256) * 256
    model.setup_caches(batch_size=1, dtype=dtype or _model_dtype(model), decoder_max_seq_len=allocated)
    return allocated


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    stop_tokens: Sequence[int] = (),
    use_cache: bool = True,
    prefill_chunk_size: int = 2048,
    on_token: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[int]:
    """Decode up to ``max_new_tokens`` tokens after ``prompt`` (batch size 1).

    Args:
        model: a torchtune decoder in eval mode (full attention), or any module with the interface in
            the module docstring.
        prompt: prompt token ids (including BOS if the model expects it).
        max_new_tokens: most tokens to generate.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling threshold.
        top_k: top-k filter (None = off).
        stop_tokens: generation stops after emitting one of these (it is included in the result).
        use_cache: decode with a KV cache; False recomputes the whole sequence at every step (needs no
            cache memory, ``max_new_tokens`` full forward passes).
        prefill_chunk_size: prompt tokens per forward pass while filling the cache.
        on_token: called with each new token id as soon as it is chosen (streaming).
        generator: random generator for sampling.
        device: device of the model's inputs; defaults to the device of the model's first parameter.

    Returns:
        The generated token ids (without the prompt).

    Raises:
        ValueError: on an empty prompt, ``max_new_tokens`` < 1 or ``prefill_chunk_size`` < 1.
    """
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
    if not ids:
        raise ValueError("prompt is empty; give at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    stops = set(int(t) for t in stop_tokens)

    def pick(last_logits: torch.Tensor) -> int:
        return sample_next_token(
            last_logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
        )

    out: list[int] = []
    if not use_cache:
        drop_kv_caches(model)
        seq = torch.tensor([ids], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            token = pick(model(seq)[0, -1])
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                break
            seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
        return out

    slots = torch.arange(prepare_kv_cache(model, len(ids) + max_new_tokens), device=device)

    def causal_rows(start: int, end: int) -> torch.Tensor:
        # Rows start..end-1 of the causal mask over the cache ([1, end-start, cache_len]); never the whole
        # cache_len x cache_len matrix.
        return (slots[None, :] <= torch.arange(start, end, device=device)[:, None])[None]

    prompt_t = torch.tensor([ids], dtype=torch.long, device=device)
    logits = None
    for start in range(0, len(ids), prefill_chunk_size):
        end = min(start + prefill_chunk_size, len(ids))
        pos = torch.arange(start, end, device=device)
        logits = model(prompt_t[:, start:end], input_pos=pos[None], mask=causal_rows(start, end))
    pos = len(ids)
    for step in range(max_new_tokens):
        token = pick(logits[0, -1])
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in stops or step == max_new_tokens - 1:
            break
        logits = model(
            torch.tensor([[token]], dtype=torch.long, device=device),
            input_pos=torch.tensor([[pos]], device=device),
            mask=causal_rows(pos, pos + 1),
        )
        pos += 1
    return out
