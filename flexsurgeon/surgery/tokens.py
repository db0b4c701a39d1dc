"""Token sequences in a traced model: what a token pool reads, and where a token model's stages end.

A transformer or MLP-Mixer carries ``(B, N, C)`` token sequences where a CNN carries maps.
Its head pool (found from values by ``shapes.PoolFinder``) reads one token or the mean over
a range of tokens; here the rest of what FlexPool over tokens needs is read from the model:
how many prefix tokens (class, register, distillation) come before the patches, and the
patch grid when the model's patch embedding declares one and it accounts for the sequence.
"""
from __future__ import annotations

import re

from torch import fx, nn

from .trace import downstream, node_shape

MAX_PREFIX = 16  # class, distillation and register tokens before the patches
_BLOCK = re.compile(r"(^|\.)([A-Za-z]+_)*\d+$")  # a numbered block: blocks.3, stages.1.blocks.0, encoder_layer_3


def patch_grid(model: nn.Module, num_tokens: int, img_size) -> tuple[int, tuple[int, int] | tuple]:
    """``(prefix tokens, (Hp, Wp))`` when a patch embedding's patch size (at ``img_size``) or
    declared grid gives ``Hp * Wp`` patches and at most ``MAX_PREFIX`` tokens before them;
    ``(0, ())`` when no grid accounts for the ``num_tokens`` tokens."""
    for module in model.modules():
        grids = []
        patch = getattr(module, "patch_size", None)
        if isinstance(patch, (tuple, list)) and len(patch) == 2 and all(isinstance(p, int) and p > 0 for p in patch):
            grids.append((img_size[0] // patch[0], img_size[1] // patch[1]))
        grid = getattr(module, "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid):
            grids.append(tuple(grid))
        for hp, wp in grids:
            if hp * wp > 1 and 0 <= num_tokens - hp * wp <= MAX_PREFIX:
                return num_tokens - hp * wp, (hp, wp)
    return 0, ()


def lands_on_tokens(node: fx.Node, channels: int) -> bool:
    """True when a value computed from ``node`` (a pooled ``(B, C)``) goes back into a sequence or
    a map of ``channels`` features, as a class-attention query does; a head's pooled vector only
    reaches the logits (which may be stacked and averaged over branches, as in CrossViT)."""
    for user in downstream(node):
        shape = node_shape(user)
        if shape is not None and len(shape) >= 3 and channels in (int(shape[1]), int(shape[-1])):
            positions = 1
            for size in shape[1:]:
                positions *= int(size)
            if positions > channels:
                return True
    return False


def token_shape(shape) -> tuple[int, int] | None:
    """``(N, C)`` of a ``(B, N, C)`` token sequence with more than one token, else None."""
    if shape is None or len(shape) != 3 or int(shape[1]) < 2:
        return None
    return int(shape[1]), int(shape[2])


def token_stage_ends(cuts: list[fx.Node], stop: str | None, hook_of) -> tuple[list[fx.Node], tuple[int, ...]]:
    """Where SAC heads can read a token model, and the default heads among those places.

    Places are cut nodes (every path passes them) that carry a token sequence and are a
    numbered block's output (``blocks.3``) that a hook reads; they are grouped by their number
    of tokens. (Only block outputs count: inside a block, a transposed (B, C, N) view, as in
    Twins' position convolution, would look like a sequence of C tokens and split a stage.)
    A hierarchical model (PiT, Twins, LeViT: the count changes between stages) gets the last
    block of each stage, and the default heads are then chosen as for a CNN. An isotropic one
    (ViT, DeiT, EVA, Mixer: one count throughout) gets every block, and by default heads
    after the blocks at one and two thirds of the depth, as the paper spreads them over a
    ResNet's stages.
    """
    groups: list[tuple[int, list[fx.Node]]] = []
    for n in cuts:
        if n.op == "placeholder":
            continue
        shape = token_shape(node_shape(n))
        hook = hook_of(n.name) if shape is not None else None
        if hook is not None and hook.read.startswith("output") and _BLOCK.search(hook.path):
            if not groups or groups[-1][0] != shape[0]:
                groups.append((shape[0], []))
            groups[-1][1].append(n)
        if n.name == stop:
            break
    staged = [blocks for _, blocks in groups if blocks]
    total = sum(len(blocks) for blocks in staged)
    main = max(staged, key=len, default=[])
    # isotropic: one token count throughout, or nearly (XCiT, ConViT, CaiT add the class token for
    # their last two blocks)
    if not staged or len(main) < 3 or len(main) < 0.75 * total:
        return [blocks[-1] for blocks in staged], ()
    blocks = main
    depth = len(blocks)
    taps = sorted({min(depth - 2, max(0, round(depth * k / 3) - 1)) for k in (1, 2)}) if depth >= 3 else []
    return blocks, tuple(taps)
