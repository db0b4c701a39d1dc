"""Where a model's stages end, read from the outputs of its numbered blocks.

A CNN's stages end where the resolution changes (``analysis``). A model whose blocks all keep
one shape has no such place: an isotropic transformer or MLP-Mixer (one token count), and
an isotropic CNN (ConvMixer, SAM's ViT: one map size). There every numbered block's output
is a stage end, and the default SAC heads go after the blocks at one and two thirds of the
depth, as the paper spreads them over a ResNet's stages.
"""
from __future__ import annotations

import collections
import re

from torch import fx

_BLOCK = re.compile(r"(^|\.)([A-Za-z]+_)*\d+$")  # a numbered block: blocks.3, stages.1.blocks.0, encoder_layer_3


def block_stage_ends(cuts: list[fx.Node], stop: str | None, hook_of, key) -> tuple[list[fx.Node], tuple[int, ...]]:
    """Where SAC heads can read a model, and the default heads among those places.

    Places are cut nodes (every path passes them) for which ``key`` gives a shape (a token
    count, a map size; None for anything else) and that are a numbered block's output
    (``blocks.3``) that a hook reads; they are grouped by that shape. A block's numbered
    children (ConvMixer's ``blocks.1.0`` to ``blocks.1.3``) give one place, its last. (Only
    block outputs count: inside a block, a transposed (B, C, N) view, as in Twins' position
    convolution, would look like a sequence of C tokens and split a stage.) A hierarchical
    model (PiT, Twins, LeViT: the shape changes between stages) gets the last block of each
    stage and no default heads (they are then chosen as for a CNN). An isotropic one (one
    shape throughout, or nearly: XCiT, ConViT and CaiT add the class token for their last
    two blocks) gets every block of its block list (a numbered stem, ``stem.0`` to ``stem.2``,
    is not one), and default heads after the blocks at one and two thirds of the depth.
    """
    groups: list[tuple[object, list[tuple[fx.Node, str]]]] = []  # shape -> [(place, its block's path)]
    for n in cuts:
        if n.op == "placeholder":
            continue
        shape = key(n)
        hook = hook_of(n.name) if shape is not None else None
        if hook is not None and hook.read.startswith("output") and _BLOCK.search(hook.path):
            if not groups or groups[-1][0] != shape:
                groups.append((shape, []))
            parent = hook.path.rpartition(".")[0]
            block = parent if _BLOCK.search(parent) else hook.path
            places = groups[-1][1]
            if places and places[-1][1] == block:
                places[-1] = (n, block)  # a later child of the same block
            else:
                places.append((n, block))
        if n.name == stop:
            break
    staged = [places for _, places in groups if places]
    main = max(staged, key=len, default=[])
    lists = collections.Counter(block.rpartition(".")[0] for _, block in main)
    if lists:  # the block list is the container most of the main group's blocks belong to
        block_list = lists.most_common(1)[0][0]
        others = sum(1 for _, block in main if block.rpartition(".")[0] != block_list)
        main = [(n, block) for n, block in main if block.rpartition(".")[0] == block_list]
    total = sum(len(places) for places in staged) - (others if lists else 0)
    if not staged or len(main) < 3 or len(main) < 0.75 * total:
        return [places[-1][0] for places in staged], ()
    depth = len(main)
    taps = sorted({min(depth - 2, max(0, round(depth * k / 3) - 1)) for k in (1, 2)})
    return [n for n, _ in main], tuple(taps)


__all__ = ["block_stage_ends"]
