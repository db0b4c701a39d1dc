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

from ..errors import TraceError
from ..utils import first_line, training_mode


def _timm_notrace() -> tuple[list, list]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but tracing plain torch models needs none of it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


@dataclass(frozen=True)
class ModuleCall:
    """One call of a submodule during tracing: its path, the nodes of its tensor inputs
    (``first``: its first positional argument's) and of its output (None unless the call
    returned a single tensor; ``items``: each element's of a tuple or list it returned, None
    for one that is not a traced value). Names only, so they also apply to copies of the graph."""

    path: str
    inputs: tuple[str, ...]
    first: str | None
    output: str | None
    items: tuple[str | None, ...] = ()


@dataclass
class TracedGraph:
    """A graph of one mode; for each node name, its qualified name (``layer3.5.act3``, or
    ``layer1.0.add`` for an operation) and the path of the module whose code made it
    (``owners``: a leaf module's own path, "" for the model's forward); and every submodule
    call, leaf or traced through (``module_calls``)."""

    graph: fx.Graph
    qualnames: dict[str, str]
    training: bool
    module_calls: list[ModuleCall] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)


class _Tracer(NodePathTracer):
    """Records every module call (what it took and what it returned); remembers the
    innermost module being traced when tracing fails, for the error message."""

    failed_in: str | None = None

    def __init__(self, *args, shallow: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.shallow = shallow
        self.module_calls: list[ModuleCall] = []
        self.owners: dict[str, str] = {}

    def is_leaf_module(self, m, module_qualname):
        return self.shallow or super().is_leaf_module(m, module_qualname)

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        self.owners[proxy.node.name] = self.current_module_qualname
        return proxy

    def call_module(self, m, forward, args, kwargs):
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise
        inputs: list[str] = []
        fx.node.map_aggregate((args, kwargs), lambda a: inputs.append(a.node.name) if isinstance(a, fx.Proxy) else a)
        first = args[0].node.name if args and isinstance(args[0], fx.Proxy) else None
        output = out.node.name if isinstance(out, fx.Proxy) else None
        items = tuple(o.node.name if isinstance(o, fx.Proxy) else None for o in out) \
            if isinstance(out, (tuple, list)) else ()
        self.module_calls.append(ModuleCall(self.path_of_module(m), tuple(dict.fromkeys(inputs)), first, output,
                                            items))
        return out


def downstream(node: fx.Node):
    """Every node computed from ``node``'s value, each once (breadth does not matter)."""
    seen, todo = set(), list(node.users)
    while todo:
        user = todo.pop()
        if user not in seen:
            seen.add(user)
            yield user
            todo.extend(user.users)


def default_inputs(model: nn.Module) -> dict[str, object]:
    """Forward inputs after the first that have defaults (Hiera's ``mask=None``, a ViT's
    ``attn_mask=None, is_causal=False``), fixed at those defaults: the path ``model(x)`` takes.

    A traced argument is a proxy, never None, so ``if mask is not None:`` would otherwise
    record the masked branch, which fails when the model is called without a mask.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace_model(model: nn.Module, training: bool, leaf_modules: tuple[type, ...] = (),
                concrete: dict | None = None, forward: str = "forward", shallow: bool = False) -> TracedGraph:
    """Trace ``model`` in the given mode; the model's own mode is restored afterwards.
    Forward inputs after the first are fixed at their defaults, or at the values in ``concrete``.

    ``forward``: the name of the method to trace as the forward (``forward``, or ``forward_head``).
    ``shallow``: every submodule is a leaf, so the graph holds only the model's own code.

    Tracing may attach constant tensors to ``model`` (fx's ``_tensor_constant*``); nothing
    else about the model changes.
    """
    leaves, functions = _timm_notrace()
    tracer = _Tracer(leaf_modules=leaves + list(leaf_modules), autowrap_functions=functions, shallow=shallow)
    cls = type(model)
    with training_mode(model, training):
        if forward != "forward":  # fx traces type(root).forward: a subclass whose forward is that method, for the trace
            model.__class__ = type(cls.__name__, (cls,),
                                   {"forward": getattr(cls, forward), "__module__": cls.__module__})
        try:
            graph = tracer.trace(model, concrete_args={**default_inputs(model), **(concrete or {})})
        except Exception as exc:  # fx raises many types; all mean "this construct does not trace"
            where = tracer.failed_in or "the top-level forward"
            module = model.get_submodule(tracer.failed_in) if tracer.failed_in else model
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: in '{where}' ({type(module).__name__}): "
                f"{first_line(exc)}. Mark {type(module).__name__} as a leaf "
                f"(timm.layers.register_notrace_module) and try again."
            ) from exc
        finally:
            model.__class__ = cls
    qualnames = {node.name: qual for node, qual in tracer.node_to_qualname.items()}
    return TracedGraph(graph=graph, qualnames=qualnames, training=training, module_calls=tracer.module_calls,
                       owners=tracer.owners)


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


__all__ = ["ModuleCall", "TracedGraph", "default_inputs", "trace_model", "node_shape"]
