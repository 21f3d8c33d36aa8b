"""Which query heads S²-Attn shifts: the one head-split rule, torch-free so the planner shares it.

LongLoRA's non-flash path shifts ``qkv[:, num_heads // 2:]``; defined for every head count, 9 heads give
4 unshifted and 5 shifted ones, and a single head is shifted. Every backend
(:mod:`longlora_tune.modules.s2_attention`), the context-parallel form and the planner take the split from
here.
"""

from __future__ import annotations

__all__ = ["shifted_heads", "straddling_heads"]


def shifted_heads(num_heads: int) -> slice:
    """The query heads whose S² groups are shifted by ``G/2``: ``[H // 2, H)``.

    Heads ``[0, H // 2)`` group from position 0.

    Args:
        num_heads: Query heads ``H`` (key/value heads already expanded to them).

    Returns:
        The slice of shifted heads along the head dimension.

    Raises:
        ValueError: If ``num_heads`` is not an int >= 1.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"S2 attention needs at least one head, got {num_heads!r}")
    return slice(num_heads // 2, num_heads)


def straddling_heads(start: int, group_size: int, num_heads: int) -> slice:
    """The heads with a group straddling global position ``start`` (a multiple of ``G/2``).

    The shifted heads when ``start % G == 0`` (their groups run from ``start - G/2``), else the unshifted
    ones; empty for one head at a mid-group start. A context-parallel slice boundary at ``start`` carries
    exactly these heads' halo.

    Args:
        start: a global position, a multiple of ``G/2``.
        group_size: ``G``.
        num_heads: query heads ``H``.

    Returns:
        The slice of heads along the head dimension.
    """
    shifted = shifted_heads(num_heads)
    return shifted if start % group_size == 0 else slice(0, shifted.start)
