"""Tie graph nodes back to modules: which module *is* a pool, which module yields a tap.

In-place surgery works on modules, not on graph nodes: a pool can be swapped on its
parent only when one module computes exactly that pool, and a SAC head can read a stage
through a hook only when one module returns (or takes) that stage's tensor. Both are
decided here from the trace's module calls; the pool check also runs the candidate
module on its own, so a module that does more than pooling (a dropout in train mode, an
activation before the mean) is never mistaken for a pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..utils import training_mode
from .shapes import PoolFinder
from .trace import TracedGraph, trace_model


@dataclass(frozen=True)
class PoolModule:
    """The module that computes a pool: replacing it replaces the pool and nothing else."""

    path: str
    keepdim: bool  # it returns (B, C, 1, 1) (or (B, 1, 1, C) for nhwc), not (B, C)


@dataclass(frozen=True)
class TapHook:
    """Where a hook reads a tap: the output of the module at ``path``, one element of the tuple
    it returns, or its first input."""

    path: str
    read: str  # "output", "output[K]" or "input"


@dataclass(frozen=True)
class RewriteSite:
    """A pool that is code: the module whose code holds it ("" for the model itself), the
    method holding it (``forward``, or timm's ``forward_head``), and the names of the pool
    node and of the map it reads in that method's own graph (submodules as leaves)."""

    holder: str
    forward: str
    node: str
    input: str
    keepdim: bool


def _calls_by_path(traced: TracedGraph) -> dict[str, list]:
    calls: dict[str, list] = {}
    for call in traced.module_calls:
        calls.setdefault(call.path, []).append(call)
    return calls


def _prefixes(path: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: outermost first."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def find_pool_module(model: nn.Module, traced: TracedGraph, node: str, source: str, shape, layout: str) \
        -> PoolModule | None:
    """The outermost module, among those whose code holds the pool ``node``, that takes the
    map ``source`` (of ``shape``) once and returns its mean over positions, in train and eval
    mode; None when the pool is written as a function in code that does more."""
    if layout == "tokens":  # token pools are code in timm's heads: they are rewritten
        return None
    calls = _calls_by_path(traced)
    holder = traced.owners.get(node, "")
    for path in _prefixes(holder):
        found = calls.get(path, [])
        if len(found) != 1 or found[0].inputs != (source,) or found[0].first != source:
            continue  # called more than once (a shared module), or on something else
        module = model.get_submodule(path)
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            continue
        keepdim = _pools_alone(module, shape, layout)
        if keepdim is not None:
            return PoolModule(path, keepdim)
    return None


def _pools_alone(module: nn.Module, shape, layout: str) -> bool | None:
    """Run ``module`` on a random map: whether it returns the mean kept 4-D (True) or flat
    (False), in both modes and (NCHW) both memory formats; None when it is not a mean."""
    b, c = int(shape[0]), int(shape[3] if layout == "nhwc" else shape[1])
    x = torch.randn(*(int(s) for s in shape), generator=torch.Generator().manual_seed(0))
    dims = (1, 2) if layout == "nhwc" else (2, 3)
    mean = x.mean(dims)
    forms = {(b, c): False, ((b, 1, 1, c) if layout == "nhwc" else (b, c, 1, 1)): True}
    inputs = [x] if layout == "nhwc" else [x, x.contiguous(memory_format=torch.channels_last)]
    keepdim = set()
    try:
        with training_mode(module, False):
            for training in (False, True):
                module.train(training)
                for sample in inputs:
                    with torch.no_grad():
                        out = module(sample)
                    if not isinstance(out, torch.Tensor) or tuple(out.shape) not in forms:
                        return None
                    if not torch.allclose(out.reshape(b, c).float(), mean, rtol=1e-4, atol=1e-5):
                        return None
                    keepdim.add(forms[tuple(out.shape)])
    except Exception:  # a module that cannot run alone on a plain map is not a pool we can swap
        return None
    return keepdim.pop() if len(keepdim) == 1 else None


def find_tap_hook(traced: TracedGraph, node: str) -> TapHook | None:
    """The innermost module called once that returns ``node``'s tensor (alone, else as an element
    of a tuple, as MViTv2's blocks return ``(x, feat_size)``), else one called once whose first
    input it is; None when no module call carries it (it exists only inside code).

    Innermost, because a stage container may never be called as a whole: with gradient
    checkpointing timm runs a stage's blocks one by one (``checkpoint_seq``).
    """
    calls = _calls_by_path(traced)
    once = [c for c in traced.module_calls if len(calls[c.path]) == 1]
    returning = sorted((c.path for c in once if c.output == node), key=lambda p: -p.count("."))
    if returning:
        return TapHook(returning[0], "output")
    within = sorted(((c.path, c.items.index(node)) for c in once if node in c.items), key=lambda p: -p[0].count("."))
    if within:
        return TapHook(within[0][0], f"output[{within[0][1]}]")
    taking = sorted((c.path for c in once if c.first == node), key=lambda p: -p.count("."))
    if taking:
        return TapHook(taking[0], "input")
    return None


def find_rewrite_site(model: nn.Module, traced: TracedGraph, node: str, img_size, in_chans: int,
                      shape, layout: str, kind: str = "avg", start: tuple = ()) -> RewriteSite | None:
    """Where the pool ``node`` (a name in the model's trace) sits in the code of the module
    that holds it: that module's ``forward``, or for a model whose own code holds it, timm's
    ``forward_head`` when the pool is there (so ``forward_head`` itself runs FlexPool).

    The holder's method is traced on its own with every submodule a leaf, run on what the
    holder receives from a sample, and its pool found again by value: the average pool over
    an input of the pool's ``shape`` (the trace's, batch aside) in ``layout`` (for tokens: the
    same ``kind`` and ``start``; the size tells apart the streams of a multi-stream head). None
    when the method does not trace.
    """

    holder_path = traced.owners.get(node, "")
    holder = model.get_submodule(holder_path) if holder_path else model
    forwards = ["forward"]
    if holder is model and all(callable(getattr(type(model), m, None)) for m in ("forward_head", "forward_features")):
        forwards.insert(0, "forward_head")
    sample = torch.randn(2, in_chans, *img_size, generator=torch.Generator().manual_seed(0))
    with training_mode(model, False):
        for forward in forwards:
            try:
                with torch.no_grad():
                    args = (model.forward_features(sample),) if forward == "forward_head" else \
                        _inputs_of(model, holder, sample)
                    graph = trace_model(holder, training=False, forward=forward, shallow=True).graph
                    finder = PoolFinder(fx.GraphModule(holder, graph), img_size)
                    finder.run(*args)
            except Exception:  # this method does not trace or run on its own: try the next
                continue
            for name, (source, found_kind, keepdim, found_layout) in finder.candidates.items():
                same = found_kind == kind and found_layout == layout and finder.token_starts.get(name, ()) == start
                if same and _shape(finder, source)[1:] == tuple(shape[1:]):
                    return RewriteSite(holder_path, forward, name, source, keepdim)
    return None


def _shape(finder, name: str):
    node = next(n for n in finder.module.graph.nodes if n.name == name)
    return tuple(node.meta["tensor_meta"].shape)


def _inputs_of(model: nn.Module, holder: nn.Module, sample: torch.Tensor) -> tuple:
    """The positional arguments ``holder`` receives when the model runs on ``sample``."""
    if holder is model:
        return (sample,)
    seen = []
    handle = holder.register_forward_pre_hook(lambda module, args: seen.append(args) if not seen else None)
    try:
        model(sample)
    finally:
        handle.remove()
    return seen[0]


__all__ = ["PoolModule", "RewriteSite", "TapHook", "find_pool_module", "find_rewrite_site", "find_tap_hook"]
