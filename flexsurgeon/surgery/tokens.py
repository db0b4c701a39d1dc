"""Token sequences in a traced model: what a token pool reads.

A transformer or MLP-Mixer carries ``(B, N, C)`` token sequences where a CNN carries maps.
Its head pool (found from values by ``shapes.PoolFinder``) reads one token or the mean over
a range of tokens; here the rest of what FlexPool over tokens needs is read from the model:
how many prefix tokens (class, register, distillation) come before the patches, and the
patch grid when the model's patch embedding declares one and it accounts for the sequence.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..utils import as_size
from .trace import downstream, node_shape

MAX_PREFIX = 16  # class, distillation and register tokens before the patches


def patch_grid(model: nn.Module, num_tokens: int, img_size) -> tuple[int, tuple[int, int] | tuple]:
    """``(prefix tokens, (Hp, Wp))`` when a patch embedding's patch size (at ``img_size``, else at
    the size the embedding was built for: CrossViT's second stream sees the image resized) or
    declared grid gives ``Hp * Wp`` patches and at most ``MAX_PREFIX`` tokens before them;
    ``(0, ())`` when no grid accounts for the ``num_tokens`` tokens."""
    for module in model.modules():
        grids = []
        patch = as_size(getattr(module, "patch_size", None))  # (16, 16), or 16 (XCiT)
        if patch is not None:
            for size in (img_size, as_size(getattr(module, "img_size", None))):
                if size is not None:
                    grids.append((size[0] // patch[0], size[1] // patch[1]))
        grid = getattr(module, "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid):
            grids.append(tuple(grid))
        for hp, wp in grids:
            if hp * wp > 1 and 0 <= num_tokens - hp * wp <= MAX_PREFIX:
                return num_tokens - hp * wp, (hp, wp)
    return 0, ()


def lands_on_tokens(node: fx.Node, channels: int, pools=frozenset()) -> bool:
    """True when a value computed from ``node`` (a pooled ``(B, C)``) goes back into a sequence or
    a map of ``channels`` features, as a class-attention query does; a head's pooled vector only
    reaches the logits (which may be stacked and averaged over branches, as in CrossViT), or is
    stacked with the other pooled vectors (node names in ``pools``) of a multi-stream head (CoaT)."""
    for user in downstream(node):
        if _stacks_pooled(user, pools):
            continue
        shape = node_shape(user)
        if shape is not None and len(shape) >= 3 and channels in (int(shape[1]), int(shape[-1])):
            positions = 1
            for size in shape[1:]:
                positions *= int(size)
            if positions > channels:
                return True
    return False


def _stacks_pooled(node: fx.Node, pools) -> bool:
    """``torch.stack`` / ``torch.cat`` of pooled vectors only."""
    if node.op != "call_function" or node.target not in (torch.stack, torch.cat):
        return False
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return bool(parts) and all(isinstance(p, fx.Node) and p.name in pools for p in parts)


def token_shape(shape) -> tuple[int, int] | None:
    """``(N, C)`` of a ``(B, N, C)`` token sequence with more than one token, else None."""
    if shape is None or len(shape) != 3 or int(shape[1]) < 2:
        return None
    return int(shape[1]), int(shape[2])
