"""Sequence tiling: each decoder layer's position-wise work and the final norm run over tiles of T tokens.

Everything in a decoder layer except attention is position-wise: the attention half's prefix (``sa_norm``,
the q/k/v projections with their LoRA, RoPE) and the MLP block (``mlp_norm``, ``mlp`` and ``mlp_scale``,
before the residual add) give each token's output from that token's hidden state alone (RoPE from its
position). At long context their rebuilt tensors dominate a layer's recompute and backward (Llama 3.1 8B at
512k: the first norm's float32 tensors 16 GiB, the SwiGLU intermediates, ``intermediate_dim`` = 3.5x the
hidden size, even more). :func:`apply_sequence_tiling` makes both run over tiles of T tokens with one
custom autograd function (:class:`_Tiled`): the forward computes tile by tile without keeping any
intermediate (it saves only the block's input), and the backward recomputes one tile's forward,
back-propagates it and moves to the next, so only one tile's intermediates exist at a time. The prefix
produces full q, k, v for S² attention, which is not position-wise and runs whole (with its
context-parallel form), as does the output projection: its input is the attention output, which attention
keeps for its own backward anyway, so tiling it would save only its rank-wide LoRA input. The decoder's
final norm is tiled the same way (it then keeps its bf16 input instead of float32 tensors over all tokens).

**Tiles.** For the MLP block and the final norm the ``batch x seq_len`` tokens are tiled in order, as one
flat row of tokens (contiguous views of the input, no copies); a tile may span two sequences of the batch,
which a position-wise block cannot tell apart. The attention prefix tiles each sequence on its own (RoPE
takes the tile's positions: ``input_pos``' entries for packed batches and context-parallel slices). When T
does not divide the tokens the last tile is shorter. Outputs and input gradients equal the untiled block's
up to float rounding (the matmuls see fewer rows).

**Parameter gradients.** The block's trainable parameters (the norm's scale in LongLoRA; LoRA on the MLP
when a config asks for it) are inputs of the autograd function, so their gradients leave its backward
through the ordinary autograd graph (into ``.grad``, or into FSDP2's gathered parameters, which it then
reduce-scatters). The tiles' gradients are summed at float32 or better and cast to the parameter's dtype
once: a running bf16 sum would stall once it is 256 times a tile's term (a bf16 norm scale over 4096
one-token tiles would lose most of its gradient), while this sum stays within one bf16 rounding of the
exact gradient, as the untiled reduction does.
Frozen weights (bf16, or QLoRA's NF4 tensors with their own autograd function) are only read by the module
calls and get no gradient, as untiled.

**What it composes with.**

* Activation checkpointing (``longlora_tune.training.activation_checkpointing``): a checkpointed layer's
  recompute only needs this block's input back, and the block is the layer's last op that saves a tensor,
  so while :func:`~longlora_tune.training.activation_checkpointing.is_recomputing` the block saves its
  input and returns an unfilled output (the rerun stops there and discards it); the tiled backward then
  recomputes each tile. The MLP's forward thus runs twice per step, as without tiling, and its down
  projection, which an untiled recompute skips, once more. Without checkpointing, tiling adds one MLP
  forward per layer. The planner counts both (:func:`longlora_tune.plan.flops.step_flops`). Layers
  checkpointed by other means (torchtune's ``set_activation_checkpointing`` directly) are correct too,
  but rerun the tiles in their recompute.
* FSDP2: ``fully_shard`` on the decoder layer gathers the block's parameters before the layer's forward
  and again before its backward, and reduce-scatters their gradients after it; the repeated module calls
  inside this function's forward and backward run between those hooks and see the gathered parameters,
  which are collected at every call (FSDP2 swaps the sharded and gathered tensors in and out).
* Context parallelism: each rank's layer sees its own slice of the sequence and the block is
  position-wise, so tiling the slice needs nothing from other ranks (the halo exchange is attention's).
* Activation offloading: the saved input goes through the offloading hooks like any saved tensor; the
  tiles' recompute happens in backward, outside them.
* ``torch.compile`` (``compile: true``): the tiled blocks are excluded from the layer's graph
  (``torch.compiler.disable``: dynamo cannot trace a backward that calls ``torch.autograd.grad``); attention
  and the output projection stay compiled, the prefix and the MLP run eagerly, two graph breaks per layer.
* Dropout inside a tiled block is refused (:func:`apply_sequence_tiling`): the tiles' recompute would draw
  new masks. LongLoRA has none there (LoRA dropout 0 by default). A checkpointed layer's recompute runs
  the prefix (attention needs q, k, v back) but not the MLP block (see above); without checkpointing,
  tiling adds one q/k/v and one MLP forward per layer.

The layers keep their submodules and parameter names (state dicts, checkpoints and exports are unchanged):
the transform re-classes each ``TransformerSelfAttentionLayer`` in place to :class:`SequenceTiledLayer`, a
subclass whose forward tiles the MLP half, as FSDP2's ``fully_shard`` itself re-classes the modules it
shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from torchtune.modules import RMSNorm, TransformerDecoder, TransformerSelfAttentionLayer

from longlora_tune._compat import attention_call
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.lean_layers import LeanRMSNorm
from longlora_tune.training.activation_checkpointing import decoder_layers, is_recomputing
from longlora_tune.training.auto_settings import AUTO

__all__ = [
    "SequenceTiledLayer",
    "SequenceTiledNorm",
    "apply_sequence_tiling",
    "check_tile_tokens",
    "tiled_attention_inputs",
    "tiled_position_wise",
]

_KEY = "sequence_tile_tokens"


def check_tile_tokens(value: Any, *, allow_auto: bool = False) -> Union[int, str, None]:
    """The one rule for a ``sequence_tile_tokens`` value: null (off), a positive int, or ``auto``.

    Args:
        value: The config value.
        allow_auto: Whether ``auto`` (chosen at start-up, :mod:`longlora_tune.training.auto_settings`) is
            accepted; where a tile size is needed it is not.

    Returns:
        The tile size T, None when tiling is off, or ``"auto"``.

    Raises:
        LongLoRAConfigError: If ``value`` is none of those (one line naming the key).
    """
    if value is None:
        return None
    if value == AUTO and allow_auto:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive integer, auto or null" if allow_auto else "a positive integer or null"
        raise LongLoRAConfigError(
            f"{_KEY}={value!r} must be {accepted} (null = off); the MLP then runs over "
            "tiles of that many tokens, the last one shorter when it does not divide batch_size x seq_len"
        )
    return value


class _Chain:
    """Position-wise modules applied one after the other, as one tile block (the MLP block)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = tuple(modules)

    def __call__(self, x: torch.Tensor, where: tuple[slice, ...]) -> tuple[torch.Tensor]:
        for module in self.modules:
            x = module(x)
        return (x,)

    def trainable_tensors(self) -> list[torch.Tensor]:
        """The parameters that require gradients, as they are now (FSDP2 swaps gathered ones in)."""
        return [p for m in self.modules for p in m.parameters() if p.requires_grad]


class _FinalNorm(_Chain):
    """The decoder's final RMSNorm as a tile block (its own forward is the tiled one: call the untiled)."""

    def __call__(self, x: torch.Tensor, where: tuple[slice, ...]) -> tuple[torch.Tensor]:
        return (LeanRMSNorm.forward(self.modules[0], x),)


class _AttentionInputs(_Chain):
    """``sa_norm``, the q/k/v projections and RoPE of one layer: ``[1, rows, dim]`` to q, k, v.

    A tile is ``rows`` consecutive tokens of one sequence, ``where = (sample, positions)``; RoPE gets the
    tile's positions (``input_pos``' entries, or the token indices when there is none), so each token is
    rotated as in the whole sequence. The outputs are ``[1, rows, heads x head_dim]`` (torchtune's
    ``MultiHeadAttention.forward`` up to its transpose; training has no KV cache).
    """

    def __init__(self, layer: TransformerSelfAttentionLayer, input_pos: Optional[torch.Tensor]) -> None:
        attn = layer.attn
        super().__init__((layer.sa_norm, attn.q_proj, attn.k_proj, attn.v_proj))
        self.attn, self.input_pos = attn, input_pos

    def __call__(
        self, x: torch.Tensor, where: tuple[slice, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        norm, q_proj, k_proj, v_proj = self.modules
        attn, rows = self.attn, x.shape[1]
        if self.input_pos is None:
            positions = torch.arange(where[1].start, where[1].start + rows, device=x.device)[None]
        else:
            positions = self.input_pos[where]
        h = norm(x)
        q = q_proj(h).view(1, rows, attn.num_heads, attn.head_dim)
        k = k_proj(h).view(1, rows, attn.num_kv_heads, attn.head_dim)
        if attn.pos_embeddings is not None:
            q = attn.pos_embeddings(q, input_pos=positions)
            k = attn.pos_embeddings(k, input_pos=positions)
        return q.reshape(1, rows, -1), k.reshape(1, rows, -1), v_proj(h)


class _Tiled(torch.autograd.Function):
    """``block`` over ``tiles`` of ``x``, keeping only ``x`` for backward.

    ``forward(ctx, block, tiles, widths, skip_in_recompute, x, *params)``: ``tiles`` index ``x``'s leading
    dimensions; ``block(x[where], where)`` returns one tensor per entry of ``widths`` (its last dimension),
    in ``x``'s dtype, each row depending on the same row of the tile only; the outputs are
    ``x.shape[:-1] + (width,)``. ``params`` are ``block.trainable_tensors()``, inputs here only so that their
    gradients are returned. With ``skip_in_recompute`` a checkpointed layer's rerun returns unfilled outputs
    (see the module docstring).
    """

    @staticmethod
    def forward(
        ctx: Any,
        block: _Chain,
        tiles: Sequence[tuple[slice, ...]],
        widths: Sequence[int],
        skip_in_recompute: bool,
        x: torch.Tensor,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.block, ctx.tiles = block, tiles
        ctx.save_for_backward(x)
        # Filled in place tile by tile: a cat would hold the tiles and the result at once.
        outs = tuple(x.new_empty(*x.shape[:-1], width) for width in widths)
        if skip_in_recompute and is_recomputing():
            # A checkpointed layer's rerun only rebuilds x: it stops once x is saved and drops this output.
            return outs
        # Tiles of a detached x: under no_grad a view of x would still say requires_grad, and module hooks
        # that follow gradients (torch.utils.module_tracker, FlopCounterMode's) would look for a graph.
        source = x.detach()
        for where in tiles:
            for out, y in zip(outs, block(source[where], where)):
                out[where] = y
        return outs

    @staticmethod
    def backward(ctx: Any, *grad_outs: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (x,) = ctx.saved_tensors
        want_x = ctx.needs_input_grad[4]
        wanted = ctx.needs_input_grad[5:]
        # forward's parameters in the same order, as they are now (FSDP2 gathers them again for backward).
        params = [p for p, needed in zip(ctx.block.trainable_tensors(), wanted) if needed]
        sums: list[Optional[torch.Tensor]] = [None] * len(params)
        grad_x = torch.empty_like(x) if want_x else None
        # Each tile is a view of one detached leaf, not a leaf itself: gradient hooks on a module's input
        # (torch.utils.module_tracker's, under FlopCounterMode) cannot watch a leaf inside autograd.grad.
        source = x.detach().requires_grad_(want_x)
        for where in ctx.tiles:
            with torch.enable_grad():
                tile = source[where]
                ys = ctx.block(tile, where)
            inputs = ([tile] if want_x else []) + params
            grads = torch.autograd.grad(
                ys, inputs, [g[where] for g in grad_outs], allow_unused=True, materialize_grads=False
            )
            if want_x:
                grad_x[where] = grads[0]
                grads = grads[1:]
            for k, g in enumerate(grads):
                if g is not None:
                    # Summed at float32 or better and rounded once at the end (see the module docstring).
                    g = g.to(torch.promote_types(g.dtype, torch.float32))
                    sums[k] = g if sums[k] is None else sums[k].add_(g)
        found = iter(None if s is None else s.to(p.dtype) for s, p in zip(sums, params))
        return (None, None, None, None, grad_x, *(next(found) if needed else None for needed in wanted))


def _row_tiles(rows: int, tile_tokens: int) -> list[tuple[slice]]:
    return [(slice(start, start + tile_tokens),) for start in range(0, rows, tile_tokens)]


def _rows(block: _Chain, x: torch.Tensor, tile_tokens: int, skip_in_recompute: bool) -> torch.Tensor:
    # A position-wise block over the batch x seq_len tokens as one flat row of tokens.
    flat = x.reshape(-1, x.shape[-1])
    tiles = _row_tiles(flat.shape[0], tile_tokens)
    (out,) = _Tiled.apply(block, tiles, (x.shape[-1],), skip_in_recompute, flat, *block.trainable_tensors())
    return out.view(x.shape)


@torch.compiler.disable
def tiled_position_wise(modules: Sequence[nn.Module], x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """``modules`` applied in turn to ``x``, over tiles of ``tile_tokens`` tokens (one tile's intermediates).

    Inside a checkpointed layer's recompute it returns an unfilled output (the MLP block's rule, see the
    module docstring).

    Args:
        modules: Position-wise modules (each token's output depends on that token's input only) that keep
            the last dimension and the dtype, e.g. ``(mlp_norm, mlp, mlp_scale)``.
        x: ``[..., dim]`` input (every leading dimension counts tokens).
        tile_tokens: Tokens per tile (the last tile may be shorter).

    Returns:
        The modules' output, shaped like ``x``.
    """
    return _rows(_Chain(modules), x, tile_tokens, skip_in_recompute=True)


@torch.compiler.disable
def tiled_attention_inputs(
    layer: TransformerSelfAttentionLayer, x: torch.Tensor, input_pos: Optional[torch.Tensor], tile_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's ``sa_norm``, q/k/v projections (with their LoRA) and RoPE over tiles of one sequence.

    Args:
        layer: A decoder layer without q/k norms or KV cache.
        x: ``[batch, seq_len, dim]`` layer input.
        input_pos: ``[batch, seq_len]`` RoPE positions, or None for ``0 .. seq_len - 1``.
        tile_tokens: Tokens per tile; a tile never spans two sequences (RoPE needs its positions), so each
            sequence's last tile may be shorter.

    Returns:
        q ``[batch, seq_len, num_heads, head_dim]`` and k, v ``[batch, seq_len, num_kv_heads, head_dim]``,
        as torchtune's ``MultiHeadAttention.forward`` has them before its transpose.
    """
    attn, (batch, seq_len) = layer.attn, x.shape[:2]
    block = _AttentionInputs(layer, input_pos)
    tiles = [(slice(i, i + 1), rows) for i in range(batch) for (rows,) in _row_tiles(seq_len, tile_tokens)]
    kv = attn.num_kv_heads * attn.head_dim
    q, k, v = _Tiled.apply(
        block, tiles, (attn.num_heads * attn.head_dim, kv, kv), False, x, *block.trainable_tensors()
    )
    shape = (batch, seq_len, -1, attn.head_dim)
    return q.view(shape), k.view(shape), v.view(shape)


def _attention_half(
    layer: TransformerSelfAttentionLayer, x: torch.Tensor, mask: Any, input_pos: Any
) -> torch.Tensor:
    # torchtune 0.6.1's MultiHeadAttention.forward in training (no KV cache, no q/k norm) on the tiled
    # prefix's q, k, v: heads first, GQA expansion, the attention call (S², its context-parallel form) and
    # the output projection.
    attn, (batch, seq_len) = layer.attn, x.shape[:2]
    q, k, v = tiled_attention_inputs(layer, x, input_pos, layer.sequence_tile_tokens)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if attn.num_heads != attn.num_kv_heads:
        expand = (batch, attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, -1, attn.head_dim)
        k = k.unsqueeze(2).expand(expand).flatten(1, 2)
        v = v.unsqueeze(2).expand(expand).flatten(1, 2)
    out = attention_call(attn)(
        q,
        k,
        v,
        mask=mask,
        dropout_p=attn.attn_dropout if attn.training else 0.0,
        is_causal=mask is None and attn.is_causal,
    )
    # What attention keeps for backward it has saved itself: the projections' outputs, the expanded keys
    # and values and the attention's own output (re-laid out here) go before the output projection
    # allocates its own (4.5 hidden sizes for Llama 3 8B under S²).
    del q, k, v
    out = out.transpose(1, 2).contiguous().view(batch, seq_len, -1)
    return attn.output_proj(out)


class SequenceTiledLayer(TransformerSelfAttentionLayer):
    """torchtune's decoder layer whose position-wise work runs over sequence tiles.

    The attention half's prefix (``sa_norm``, q/k/v, RoPE: :func:`tiled_attention_inputs`) and the MLP half
    (:func:`tiled_position_wise`); attention itself and the output projection run whole. Made by
    :func:`apply_sequence_tiling` from a ``TransformerSelfAttentionLayer`` in place: same submodules,
    parameters and state-dict names.

    Attributes:
        sequence_tile_tokens: Tokens per tile.
    """

    sequence_tile_tokens: int

    def forward(
        self, x: torch.Tensor, *, mask: Any = None, input_pos: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        """torchtune 0.6.1's ``TransformerSelfAttentionLayer.forward`` with the position-wise work tiled.

        With a KV cache set up (generation) the attention half runs as torchtune's.

        Args:
            x: ``[batch, seq_len, embed_dim]`` hidden states.
            mask: The attention mask, as torchtune's layer takes it.
            input_pos: Token positions, as torchtune's layer takes them.
            **kwargs: Ignored, as by torchtune's layer.

        Returns:
            The layer's output, shaped like ``x``.
        """
        if self.attn.kv_cache is not None:
            h = self.sa_norm(x)
            attn_out = self.attn(h, h, mask=mask, input_pos=input_pos)
        else:
            attn_out = _attention_half(self, x, mask, input_pos)
        h = self.sa_scale(attn_out) + x
        return h + tiled_position_wise(_mlp_block(self), h, self.sequence_tile_tokens)


class SequenceTiledNorm(LeanRMSNorm):
    """torchtune's RMSNorm (its lean form) over tiles of tokens (the decoder's final norm), keeping its input.

    Made by :func:`apply_sequence_tiling` from the decoder's ``norm`` in place (same ``scale``).

    Attributes:
        sequence_tile_tokens: Tokens per tile.
    """

    sequence_tile_tokens: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchtune's ``RMSNorm.forward`` tile by tile (float32 inside a tile only).

        Args:
            x: ``[..., dim]`` hidden states.

        Returns:
            The normalised and scaled tensor, shaped like ``x``.
        """
        return _tiled_norm(self, x)


@torch.compiler.disable
def _tiled_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return _rows(_FinalNorm([norm]), x, norm.sequence_tile_tokens, skip_in_recompute=False)


def _mlp_block(layer: TransformerSelfAttentionLayer) -> tuple[nn.Module, ...]:
    # The position-wise half of the layer, in torchtune's order: mlp_scale(mlp(mlp_norm(h))).
    return layer.mlp_norm, layer.mlp, layer.mlp_scale


def _attention_prefix(layer: TransformerSelfAttentionLayer) -> tuple[nn.Module, ...]:
    return layer.sa_norm, layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj


def _dropout_in(modules: Sequence[nn.Module]) -> Optional[float]:
    rates = [m.p for top in modules for m in top.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    return max(rates) if rates else None


def apply_sequence_tiling(model: nn.Module, tile_tokens: Optional[int]) -> int:
    """Make every decoder layer's position-wise work and the final norm run over tiles of ``tile_tokens``.

    Call it on the unsharded model, next to activation checkpointing (before or after it and ``compile``:
    the modules are re-classed in place, so wrappers and a lazy compile see the tiled forward); a second
    call changes the tile size.

    Args:
        model: A torchtune decoder (or anything holding ``TransformerSelfAttentionLayer`` modules; the
            final norm of each ``TransformerDecoder`` in it is tiled too).
        tile_tokens: T, or None (nothing changes).

    Returns:
        The number of layers tiled.

    Raises:
        LongLoRAConfigError: On a bad ``tile_tokens`` (:func:`check_tile_tokens`), a model without torchtune
            decoder layers, dropout inside a tiled block (its recompute would draw other masks) or q/k
            norms in attention (no family here has them; the tiled prefix does not apply them).
        TypeError: On layers FSDP2 has already sharded (apply the transform before ``fully_shard``), or a
            final norm that is not torchtune's ``RMSNorm``.
    """
    tile_tokens = check_tile_tokens(tile_tokens)
    if tile_tokens is None:
        return 0
    layers = decoder_layers(model)
    if not layers:
        raise LongLoRAConfigError(
            f"{_KEY}: {type(model).__name__} has no torchtune TransformerSelfAttentionLayer; set {_KEY}=null"
        )
    norms = [m.norm for m in model.modules() if isinstance(m, TransformerDecoder)]
    for norm in norms:
        if type(norm) not in (RMSNorm, LeanRMSNorm, SequenceTiledNorm):
            raise TypeError(f"apply_sequence_tiling tiles torchtune's RMSNorm, got {type(norm).__name__}")
    for layer in layers:
        if type(layer) not in (TransformerSelfAttentionLayer, SequenceTiledLayer):
            # FSDP2 re-classes the layers it shards; re-classing again would drop its hooks.
            raise TypeError(
                f"apply_sequence_tiling needs unsharded torchtune layers, got {type(layer).__name__}; "
                "apply it before FSDP2"
            )
        if layer.attn.q_norm is not None or layer.attn.k_norm is not None:
            raise LongLoRAConfigError(f"{_KEY}: attention with q/k norms is not tiled; set {_KEY}=null")
        rate = _dropout_in(_attention_prefix(layer) + _mlp_block(layer))
        if rate is not None:
            raise LongLoRAConfigError(
                f"{_KEY}={tile_tokens} recomputes q/k/v and the MLP tile by tile, which cannot repeat their "
                f"dropout (p={rate}); set model.lora_dropout=0.0 or {_KEY}=null"
            )
    for module in [*layers, *norms]:
        module.__class__ = SequenceTiledLayer if module in layers else SequenceTiledNorm
        module.sequence_tile_tokens = tile_tokens
    return len(layers)
