"""Tracing with torch.fx the way timm traces its own models.

The tracer is torchvision's ``NodePathTracer`` (it records for each node the qualified
name of the module it came from, e.g. ``layer3.5.act3``) with timm's no-trace leaf
modules and auto-wrapped functions, so a timm model traces exactly as timm's own FX
feature extraction traces it. Models behave differently in train and eval mode (dropout
written as ``F.dropout(x, training=self.training)``, drop-path), so callers trace each
mode separately.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from .errors import TraceError


def _timm_notrace() -> tuple[list, list]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but tracing plain torch models needs none of it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


@dataclass
class TracedGraph:
    """A graph of one mode; for each node name, the module path it came from; and for
    each submodule call traced through, its input nodes and the last node it created
    (``module_calls``, names only, so they also apply to copies of the graph)."""

    graph: fx.Graph
    qualnames: dict[str, str]
    training: bool
    module_calls: list[tuple[tuple[str, ...], str]] = field(default_factory=list)


class _Tracer(NodePathTracer):
    """Records what each traced-through module call took and made; remembers the
    innermost module being traced when tracing fails, for the error message."""

    failed_in: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.created = 0
        self.last_created: fx.Node | None = None
        self.module_calls: list[tuple[tuple[str, ...], str]] = []

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        self.created += 1
        self.last_created = node
        return node

    def call_module(self, m, forward, args, kwargs):
        before = self.created
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise
        if self.created - before > 1:  # traced through, not a leaf
            inputs: list[str] = []
            fx.node.map_aggregate((args, kwargs),
                                  lambda a: inputs.append(a.node.name) if isinstance(a, fx.Proxy) else a)
            if inputs:
                self.module_calls.append((tuple(dict.fromkeys(inputs)), self.last_created.name))
        return out


def _default_inputs(model: nn.Module) -> dict[str, object]:
    """Forward inputs after the first that have defaults (Hiera's ``mask=None``, a ViT's
    ``attn_mask=None, is_causal=False``), fixed at those defaults: the path ``model(x)`` takes.

    A traced argument is a proxy, never None, so ``if mask is not None:`` would otherwise
    record the masked branch, which fails when the model is called without a mask.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace_model(model: nn.Module, training: bool, leaf_modules: tuple[type, ...] = ()) -> TracedGraph:
    """Trace ``model`` in the given mode; the model's own mode is restored afterwards.

    Tracing may attach constant tensors to ``model`` (fx's ``_tensor_constant*``); nothing
    else about the model changes.
    """
    leaves, functions = _timm_notrace()
    tracer = _Tracer(leaf_modules=leaves + list(leaf_modules), autowrap_functions=functions)
    was_training = model.training
    model.train(training)
    try:
        graph = tracer.trace(model, concrete_args=_default_inputs(model))
    except Exception as exc:  # fx raises many types; all mean "this construct does not trace"
        where = tracer.failed_in or "the top-level forward"
        module = model.get_submodule(tracer.failed_in) if tracer.failed_in else model
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: in '{where}' ({type(module).__name__}): "
            f"{first_line}. Mark {type(module).__name__} as a leaf "
            f"(timm.layers.register_notrace_module) and try again."
        ) from exc
    finally:
        model.train(was_training)
    qualnames = {node.name: qual for node, qual in tracer.node_to_qualname.items()}
    return TracedGraph(graph=graph, qualnames=qualnames, training=training, module_calls=tracer.module_calls)


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


__all__ = ["TracedGraph", "trace_model", "node_shape"]
