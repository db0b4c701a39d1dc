"""The fallback for a pool written as code (``x.mean((2, 3))`` in a forward): regenerate
that one method with torch.fx, the pool node replaced by a FlexPool call.

Only the code that holds the pool is rewritten: a head module's ``forward``, or the
model's own ``forward_head`` (timm) or ``forward``. It is traced with every submodule as a
leaf, so submodules still run as modules (their hooks fire, their own code is untouched),
and installed on the instance, so the model keeps its class and its other methods. It is
traced in train and in eval mode, since code such as ``F.dropout(x,
training=self.training)`` differs between them. Attributes read in that code (timm's
``grad_checkpointing`` in a rewritten ``forward``) are fixed at their values when traced.
"""
from __future__ import annotations

import functools
import inspect
import itertools

from torch import fx, nn

from ..errors import AnalysisError, PlanError
from .trace import trace_model


class RewrittenForward:
    """A module's forward as fx regenerated it, run with the module itself as ``self``.

    One graph per mode and per value of each true/false forward option (timm's
    ``pre_logits``): tracing fixes such options, so each combination is traced. Attributes
    resolve on the module at call time, so moving or copying the module carries the new
    forward along; pickling rebuilds it from the graphs.
    """

    def __init__(self, owner: nn.Module, forward: str, graph_modules: dict[tuple, fx.GraphModule],
                 flags: dict[str, tuple]):
        self.owner = owner
        self.forward = forward  # the name of the method this replaces: forward or forward_head
        self.graph_modules = graph_modules
        self.flags = flags  # option name -> (its position among the forward's arguments, its default)
        # fx renames an argument that clashes with an attribute (pre_logits -> pre_logits_1)
        original = list(inspect.signature(getattr(type(owner), forward)).parameters)[1:]
        self.renamed = {key: dict(zip(original, list(inspect.signature(type(gm).forward).parameters)[1:]))
                        for key, gm in graph_modules.items()}

    def __call__(self, *args, **kwargs):
        values = tuple(bool(kwargs.get(name, args[position] if position < len(args) else default))
                       for name, (position, default) in self.flags.items())
        key = (self.owner.training, values)
        renamed = self.renamed[key]
        return type(self.graph_modules[key]).forward(self.owner, *args,
                                                     **{renamed.get(k, k): v for k, v in kwargs.items()})

    def __reduce__(self):
        return RewrittenForward, (self.owner, self.forward, self.graph_modules, self.flags)


def _call(rewritten: RewrittenForward, *args, **kwargs):
    return rewritten(*args, **kwargs)


_MAX_FLAGS = 2  # options traced both ways; any further ones stay at their defaults (fx asserts on them)


def _flags(holder: nn.Module, forward: str) -> dict[str, tuple]:
    """The true/false options of the method named ``forward``, with a default, by position (after ``x``)."""
    params = list(inspect.signature(getattr(type(holder), forward)).parameters.values())[1:]
    found = {p.name: (i, p.default) for i, p in enumerate(params)
             if i > 0 and isinstance(p.default, bool) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return dict(list(found.items())[:_MAX_FLAGS])


def rewrite_forward(holder: nn.Module, forward: str, pools: dict[str, tuple[str, nn.Module]]) -> None:
    """Put ``pools`` (pool node -> (its input node, the new pool module, which returns what
    the old pool returned)) into ``holder``'s method named ``forward`` (``forward`` or
    ``forward_head``), as ``holder.flex_pools.<node>``."""
    if "flex_pools" in holder._modules or hasattr(type(holder), "flex_pools"):
        raise PlanError(f"{type(holder).__name__} already has an attribute named 'flex_pools'")
    flags = _flags(holder, forward)
    holder.flex_pools = nn.ModuleDict({node: pool for node, (_, pool) in pools.items()})
    graph_modules = {}
    for training in (False, True):
        for values in itertools.product((False, True), repeat=len(flags)):
            graph = trace_model(holder, training=training, concrete=dict(zip(flags, values)), forward=forward,
                                shallow=True).graph
            if any(n.name in pools for n in graph.nodes):  # an option may skip the pool (pre_logits)
                for node, (source, _) in pools.items():
                    _replace_pool(graph, node, source, "train" if training else "eval")
            graph.lint()
            graph_modules[(training, values)] = fx.GraphModule(holder, graph)
    # a partial, not the object itself: torch.export reads the forward's code object through it
    setattr(holder, forward, functools.partial(_call, RewrittenForward(holder, forward, graph_modules, flags)))


def _replace_pool(graph: fx.Graph, name: str, source_name: str, mode: str) -> None:
    nodes = {n.name: n for n in graph.nodes}
    node, source = nodes.get(name), nodes.get(source_name)
    if node is not None and source is None:
        raise AnalysisError(f"the pool at '{name}' reads '{source_name}' in one call and another value when an "
                            "option of the method holding it changes (e.g. pre_logits=True, when it pools after "
                            "the classifier, as an attention pool's head does); one FlexPool cannot replace it")
    if node is None or source is None:
        raise PlanError(f"plan names node '{name if node is None else source_name}', which the {mode}-mode graph "
                        "does not have; the plan was made for a different model")
    with graph.inserting_after(node):
        flex = graph.call_module(f"flex_pools.{name}", (source,))
    node.replace_all_uses_with(flex)
    _erase_unused(graph, node)


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the inputs that only it used (the old pool and e.g. its flatten)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        todo.extend(inputs)
