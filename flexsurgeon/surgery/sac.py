"""SAC heads on a converted model: a child module that reads its taps through forward hooks.

The heads live in ``model.sac_heads`` and cost nothing in ``model(x)``: their hooks exist
only for the duration of ``forward_with_sac(model, x)``, the one call that asks for their
logits. The hooks only keep the taps' tensors; the heads run after the model's forward,
outside any region gradient checkpointing recomputes (a head run inside one would make the
recomputation save fewer tensors than the forward did). A tap changed in place after its
stage produced it would give its head wrong input, so that is checked and refused.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..errors import FlexSurgeonError
from ..layers.sac_head import SACHead
from .plan import SurgeryPlan
from .state import plan_of, record_plan


class SACHeads(nn.ModuleDict):
    """The auxiliary classifiers of a converted model, keyed by the tap's node name."""

    @classmethod
    def from_plan(cls, plan: SurgeryPlan) -> SACHeads:
        return cls({t.node: SACHead(t.channels, t.size, plan.num_classes, pool=plan.pool, layout=t.layout,
                                    prefix=t.prefix, grid=t.grid) for t in plan.sac})

    def reset_classes(self, num_classes: int) -> None:
        """New ``fc`` layers with ``num_classes`` outputs (the pools keep what they learned)."""
        for head in self.values():
            old = head.fc
            head.fc = nn.Linear(old.in_features, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)


def forward_with_sac(model: nn.Module, *args, **kwargs):
    """``model(*args, **kwargs)`` and the SAC heads' logits: ``(output, [head_1, ..., head_k])``.

    Heads are ordered by depth, as the plan's ``sac_weights`` (heads first, main classifier
    last) weigh them. Follows the model's train/eval mode like ``model(x)``.
    """
    plan = plan_of(model, "run with SAC heads")
    taps: dict[str, tuple[torch.Tensor, int | None]] = {}  # node -> (tensor, its version when the stage made it)
    handles = []

    def keep(node: str, tensor) -> None:
        # inside a compiled forward the version would be a constant of the trace, not the tensor's:
        # only eager runs are checked
        taps[node] = (tensor, None if torch.compiler.is_compiling() else tensor._version)

    try:
        for tap in plan.sac:
            module = model.get_submodule(tap.module)
            if tap.read == "output":
                handles.append(module.register_forward_hook(lambda m, a, out, node=tap.node: keep(node, out)))
            elif tap.output_item is not None:
                handles.append(module.register_forward_hook(
                    lambda m, a, out, node=tap.node, k=tap.output_item: keep(node, out[k])))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, a, node=tap.node: keep(node, a[0])))
        output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    logits = []
    for tap in plan.sac:
        if tap.node not in taps:
            raise FlexSurgeonError(f"the SAC tap module '{tap.module}' did not run in this forward")
        tensor, version = taps[tap.node]
        if version is not None and tensor._version != version:
            raise FlexSurgeonError(f"the model changed the tensor at SAC tap '{tap.module}' in place after that "
                                   "module made it; choose another tap with --sac-stages")
        logits.append(model.sac_heads[tap.node](tensor))
    return output, logits


def strip_sac_heads(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` sharing its parameters, with no SAC heads and a plan that
    has none: for inference and for checkpoints that drop the training-only heads."""
    plan = plan_of(model, "stripped of SAC heads")

    stripped = copy.copy(model)
    stripped.__dict__["_modules"] = {**model._modules, "sac_heads": SACHeads()}
    for registry in ("_parameters", "_buffers"):
        stripped.__dict__[registry] = dict(getattr(model, registry))
    record_plan(stripped, dataclasses.replace(plan, sac=(), sac_weights=(1.0,)))  # a new dict: the model's stays
    return stripped

