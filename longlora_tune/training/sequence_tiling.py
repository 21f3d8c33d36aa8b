"""Sequence tiling: each decoder layer's MLP block runs over tiles of T tokens (``sequence_tile_tokens``).

Everything in a decoder layer except attention is position-wise: the MLP block (``mlp_norm``, ``mlp`` and
``mlp_scale``, before the residual add) gives each token's output from that token's hidden state alone. Its
SwiGLU intermediates are ``intermediate_dim`` wide (14,336 for Llama 3.1 8B, 3.5x the hidden size), so at
long context the recompute and backward of one layer are dominated by three or four ``tokens x 14336``
tensors (Llama 3.1 8B at 256k: 21 GiB saved by the rebuilt MLP plus 14 GiB of its gradients).
:func:`apply_sequence_tiling` makes the block run over tiles of T tokens with a custom autograd function
(:class:`_TiledPositionWise`): the forward computes tile by tile without keeping any intermediate (it saves
only the block's input), and the backward recomputes one tile's forward, back-propagates it and moves to
the next, so only one tile's intermediates exist at a time and that phase scales with T instead of N.

**Tiles.** The ``batch x seq_len`` tokens are tiled in order, as one flat row of tokens (contiguous views of
the input, no copies); a tile may span two sequences of the batch, which a position-wise block cannot tell
apart. When T does not divide ``batch x seq_len`` the last tile is shorter. Outputs and input gradients equal
the untiled block's up to float rounding (the matmuls see fewer rows).

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
* ``torch.compile`` (``compile: true``): the tiled block is excluded from the layer's graph
  (``torch.compiler.disable``: dynamo cannot trace a backward that calls ``torch.autograd.grad``); the
  attention half stays compiled and the MLP runs eagerly, one graph break per layer.
* Dropout inside the block is refused (:func:`apply_sequence_tiling`): the tiles' recompute would draw
  new masks. LongLoRA has none there (no LoRA on the MLP, and LoRA dropout 0 by default).

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
from torchtune.modules import TransformerSelfAttentionLayer

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.training.activation_checkpointing import decoder_layers, is_recomputing
from longlora_tune.training.auto_settings import AUTO

__all__ = [
    "SequenceTiledLayer",
    "apply_sequence_tiling",
    "check_tile_tokens",
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
    """Position-wise modules applied one after the other, as one callable (the tiled function's block)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = tuple(modules)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            x = module(x)
        return x

    def trainable_tensors(self) -> list[torch.Tensor]:
        """The parameters that require gradients, as they are now (FSDP2 swaps gathered ones in)."""
        return [p for m in self.modules for p in m.parameters() if p.requires_grad]


class _TiledPositionWise(torch.autograd.Function):
    """``block`` over row tiles of a ``[tokens, dim]`` input, keeping only the input for backward.

    ``forward(ctx, block, tile_tokens, x, *params)``: ``params`` are ``block.trainable_tensors()``, inputs
    here only so that their gradients are returned; ``block`` maps ``[rows, dim]`` to ``[rows, dim]`` row by
    row, in ``x``'s dtype.
    """

    @staticmethod
    def forward(
        ctx: Any, block: _Chain, tile_tokens: int, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.block, ctx.tile_tokens = block, tile_tokens
        ctx.save_for_backward(x)
        # Filled in place tile by tile: a cat would hold the tiles and the result at once.
        out = torch.empty_like(x)
        if is_recomputing():
            # A checkpointed layer's rerun only rebuilds x: it stops once x is saved and drops this output.
            return out
        # Tiles of a detached x: under no_grad a view of x would still say requires_grad, and module hooks
        # that follow gradients (torch.utils.module_tracker, FlopCounterMode's) would look for a graph.
        rows = x.detach()
        for start in range(0, x.shape[0], tile_tokens):
            out[start : start + tile_tokens] = block(rows[start : start + tile_tokens])
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (x,) = ctx.saved_tensors
        want_x = ctx.needs_input_grad[2]
        wanted = ctx.needs_input_grad[3:]
        # forward's parameters in the same order, as they are now (FSDP2 gathers them again for backward).
        params = [p for p, needed in zip(ctx.block.trainable_tensors(), wanted) if needed]
        sums: list[Optional[torch.Tensor]] = [None] * len(params)
        grad_x = torch.empty_like(x) if want_x else None
        # Each tile is a view of one detached leaf, not a leaf itself: gradient hooks on a module's input
        # (torch.utils.module_tracker's, under FlopCounterMode) cannot watch a leaf inside autograd.grad.
        source = x.detach().requires_grad_(want_x)
        for start in range(0, x.shape[0], ctx.tile_tokens):
            rows = slice(start, start + ctx.tile_tokens)
            with torch.enable_grad():
                tile = source[rows]
                y = ctx.block(tile)
            inputs = ([tile] if want_x else []) + params
            grads = torch.autograd.grad(y, inputs, grad_out[rows], allow_unused=True)
            if want_x:
                grad_x[rows] = grads[0]
                grads = grads[1:]
            for k, g in enumerate(grads):
                if g is not None:
                    # Summed at float32 or better and rounded once at the end (see the module docstring).
                    g = g.to(torch.promote_types(g.dtype, torch.float32))
                    sums[k] = g if sums[k] is None else sums[k].add_(g)
        found = iter(None if s is None else s.to(p.dtype) for s, p in zip(sums, params))
        return (None, None, grad_x, *(next(found) if needed else None for needed in wanted))


@torch.compiler.disable
def tiled_position_wise(modules: Sequence[nn.Module], x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """``modules`` applied in turn to ``x``, over tiles of ``tile_tokens`` tokens (one tile's intermediates).

    Args:
        modules: Position-wise modules (each token's output depends on that token's input only) that keep
            the last dimension and the dtype, e.g. ``(mlp_norm, mlp, mlp_scale)``.
        x: ``[..., dim]`` input (every leading dimension counts tokens).
        tile_tokens: Tokens per tile (the last tile may be shorter).

    Returns:
        The modules' output, shaped like ``x``.
    """
    block = _Chain(modules)
    flat = x.reshape(-1, x.shape[-1])
    return _TiledPositionWise.apply(block, tile_tokens, flat, *block.trainable_tensors()).view(x.shape)


class SequenceTiledLayer(TransformerSelfAttentionLayer):
    """torchtune's decoder layer whose MLP half runs over sequence tiles (:func:`tiled_position_wise`).

    Made by :func:`apply_sequence_tiling` from a ``TransformerSelfAttentionLayer`` in place: same
    submodules, parameters and state-dict names.

    Attributes:
        sequence_tile_tokens: Tokens per tile of the MLP block.
    """

    sequence_tile_tokens: int

    def forward(
        self, x: torch.Tensor, *, mask: Any = None, input_pos: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        """torchtune 0.6.1's ``TransformerSelfAttentionLayer.forward`` with the MLP block tiled.

        Args:
            x: ``[batch, seq_len, embed_dim]`` hidden states.
            mask: The attention mask, as torchtune's layer takes it.
            input_pos: Token positions, as torchtune's layer takes them.
            **kwargs: Ignored, as by torchtune's layer.

        Returns:
            The layer's output, shaped like ``x``.
        """
        h = self.sa_norm(x)
        h = self.sa_scale(self.attn(h, h, mask=mask, input_pos=input_pos)) + x
        return h + tiled_position_wise(_mlp_block(self), h, self.sequence_tile_tokens)


def _mlp_block(layer: TransformerSelfAttentionLayer) -> tuple[nn.Module, ...]:
    # The position-wise half of the layer, in torchtune's order: mlp_scale(mlp(mlp_norm(h))).
    return layer.mlp_norm, layer.mlp, layer.mlp_scale


def _dropout_in(modules: Sequence[nn.Module]) -> Optional[float]:
    rates = [m.p for top in modules for m in top.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    return max(rates) if rates else None


def apply_sequence_tiling(model: nn.Module, tile_tokens: Optional[int]) -> int:
    """Make every decoder layer's MLP block run over tiles of ``tile_tokens`` tokens.

    Call it on the unsharded model, next to activation checkpointing (before or after it and ``compile``:
    the layers are re-classed in place, so wrappers and a lazy compile see the tiled forward); a second call
    changes the tile size.

    Args:
        model: A torchtune decoder (or anything holding ``TransformerSelfAttentionLayer`` modules).
        tile_tokens: T, or None (nothing changes).

    Returns:
        The number of layers tiled.

    Raises:
        LongLoRAConfigError: On a bad ``tile_tokens`` (:func:`check_tile_tokens`), a model without torchtune
            decoder layers, or dropout inside an MLP block (its recompute would draw other masks).
        TypeError: On layers FSDP2 has already sharded (apply the transform before ``fully_shard``).
    """
    tile_tokens = check_tile_tokens(tile_tokens)
    if tile_tokens is None:
        return 0
    layers = decoder_layers(model)
    if not layers:
        raise LongLoRAConfigError(
            f"{_KEY}: {type(model).__name__} has no torchtune TransformerSelfAttentionLayer; set {_KEY}=null"
        )
    for layer in layers:
        if type(layer) not in (TransformerSelfAttentionLayer, SequenceTiledLayer):
            # FSDP2 re-classes the layers it shards; re-classing again would drop its hooks.
            raise TypeError(
                f"apply_sequence_tiling needs unsharded torchtune layers, got {type(layer).__name__}; "
                "apply it before FSDP2"
            )
        rate = _dropout_in(_mlp_block(layer))
        if rate is not None:
            raise LongLoRAConfigError(
                f"{_KEY}={tile_tokens} recomputes the MLP tile by tile, which cannot repeat its dropout "
                f"(p={rate}); set model.lora_dropout=0.0 (or model.apply_lora_to_mlp=false) or {_KEY}=null"
            )
    for layer in layers:
        layer.__class__ = SequenceTiledLayer
        layer.sequence_tile_tokens = tile_tokens
    return len(layers)
