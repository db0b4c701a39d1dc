"""Carry out a surgery plan inside the user's own model, the way peft injects adapters.

The model object keeps its class, its forward and every method it had: each replaced
pool module is swapped for a FlexPool on its parent (``in_place``), or, where a pool is
code rather than a module, only the module holding that code gets a regenerated forward
(``graph_rewrite``, see ``rewrite.py``). SAC heads are a child module, ``sac_heads``, read
through hooks by ``forward_with_sac``. The plan is kept on the model as
``flexsurgeon_plan``; original parameter names are unchanged.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import PlanError
from ..layers.kinds import FLEXPOOL_KINDS, SPATIAL_BASELINES, TOKEN_BASELINES
from ..layers.pools import FlexPoolNHWC, make_pool
from ..layers.token_pool import TokenFlexPool, TokenPool
from .plan import PoolEdit, SurgeryPlan
from .rewrite import rewrite_forward
from .sac import SACHeads
from .state import record_plan


def _new_pool(plan: SurgeryPlan, edit: PoolEdit) -> nn.Module:
    """The pool that replaces ``edit``'s, returning the same form the old one returned."""
    if edit.layout == "tokens":
        if plan.pool == "avg":  # the mean over the tokens the source averaged, else over the patch tokens
            start = tuple(edit.start) if edit.reduction == "mean" else ("mean", edit.prefix, edit.size[1])
            return TokenPool(edit.size[1], start, num_prefix=edit.prefix, dropout=plan.dropout)
        if plan.pool == "token":
            if edit.prefix == 0:
                raise PlanError("pool 'token' reads the class token, and this model has none (it averages its "
                                "tokens); use avg for its own reduction")
            return TokenPool(edit.size[1], ("token", 0), num_prefix=edit.prefix, dropout=plan.dropout)
        if plan.pool not in FLEXPOOL_KINDS:
            kinds = ", ".join(FLEXPOOL_KINDS + TOKEN_BASELINES)
            raise PlanError(f"pool {plan.pool!r} does not take token sequences; use one of {kinds}")
        return TokenFlexPool(edit.channels, edit.size[1], tuple(edit.start), grid=tuple(edit.grid) or None,
                             num_prefix=edit.prefix, pool=plan.pool, dropout=plan.dropout)
    if plan.pool not in FLEXPOOL_KINDS + SPATIAL_BASELINES:
        raise PlanError(f"pool {plan.pool!r} reads one token of a token sequence, and this model pools a spatial "
                        f"map; use one of {', '.join(FLEXPOOL_KINDS + SPATIAL_BASELINES)}")
    if edit.layout == "nhwc":
        if plan.pool not in FLEXPOOL_KINDS:
            raise PlanError(f"pool {plan.pool!r} does not take channels-last (NHWC) maps")
        return FlexPoolNHWC(edit.channels, edit.size, pool=plan.pool, dropout=plan.dropout, keepdim=edit.keepdim)
    return make_pool(plan.pool, edit.channels, edit.size, dropout=plan.dropout, keepdim=edit.keepdim)


def _submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PlanError(f"the plan names module '{path}', which this {type(model).__name__} does not have; "
                        "the plan was made for a different model") from None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_submodule(model, parent) if parent else model, name, module)


class _KeepFlexPools:
    """``reset_classifier`` of a converted model: the source's own, then the FlexPools it
    replaced put back (timm rebuilds ``global_pool`` there) and the SAC heads re-headed."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, num_classes: int, *args, **kwargs):
        model = self.model
        plan = model.flexsurgeon_plan
        pools = {e.module: model.get_submodule(e.module) for e in plan.pools if e.replacement == "in_place"}
        type(model).reset_classifier(model, num_classes, *args, **kwargs)
        for path, pool in pools.items():
            if model.get_submodule(path) is not pool:
                _set_submodule(model, path, pool)
        if num_classes > 0:  # 0 removes the classifier (features only): the heads and plan stay as they were
            model.sac_heads.reset_classes(num_classes)
            source = plan.source
            if source is not None and source.library != "custom":  # rebuilt on load with the new head
                source = dataclasses.replace(source, kwargs={**source.kwargs, "num_classes": num_classes})
            record_plan(model, dataclasses.replace(plan, num_classes=num_classes, source=source))

    def __reduce__(self):
        return _KeepFlexPools, (self.model,)


class _TokenPoolsNoDecay:
    """``no_weight_decay`` of a converted model whose source exempts its tokens from weight
    decay (timm's class and position tokens): the source's names, plus the token pools'
    parameters, which take over the class token's part (weight decay would pull a class-token
    start's weights towards zero, away from the class token)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> set[str]:
        model = self.model
        return set(type(model).no_weight_decay(model)) | {
            f"{path}.{name}" for path, module in model.named_modules() if isinstance(module, TokenFlexPool)
            for name, _ in module.named_parameters()}

    def __reduce__(self):
        return _TokenPoolsNoDecay, (self.model,)


def apply_plan(model: nn.Module, plan: SurgeryPlan) -> nn.Module:
    """Carry out ``plan`` on ``model`` itself and return it (the same object)."""
    if getattr(model, "flexsurgeon_plan", None) is not None:
        raise PlanError("this model has been converted already")
    if hasattr(model, "sac_heads"):
        raise PlanError(f"{type(model).__name__} already has an attribute named 'sac_heads'")
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32

    holders: dict[str, dict] = {}
    for edit in plan.pools:
        pool = _new_pool(plan, edit).to(device=device, dtype=dtype)
        if edit.replacement == "in_place":
            old = _submodule(model, edit.module)
            if any(True for _ in old.parameters()):
                raise PlanError(f"the plan replaces '{edit.module}' as a pool, but that {type(old).__name__} has "
                                "parameters; the plan was made for a different model")
            _set_submodule(model, edit.module, pool)
        else:
            holders.setdefault((edit.module, edit.forward), {})[edit.node] = (edit.input, pool)
    for (path, forward), pools in holders.items():
        rewrite_forward(_submodule(model, path) if path else model, forward, pools)
    for tap in plan.sac:
        _submodule(model, tap.module)
    model.sac_heads = SACHeads.from_plan(plan).to(device=device, dtype=dtype)
    record_plan(model, plan)
    if callable(getattr(type(model), "reset_classifier", None)):
        model.reset_classifier = _KeepFlexPools(model)
    if callable(getattr(type(model), "no_weight_decay", None)) and any(e.layout == "tokens" for e in plan.pools):
        model.no_weight_decay = _TokenPoolsNoDecay(model)
    return model


def pool_paths(plan: SurgeryPlan) -> list[str]:
    """Where the new pools live in a converted model: the replaced module's path, or
    ``flex_pools.<node>`` under the module whose forward was rewritten."""
    return [e.module if e.replacement == "in_place" else ".".join(filter(None, (e.module, "flex_pools", e.node)))
            for e in plan.pools]


def new_parameter_names(model: nn.Module) -> list[str]:
    """Parameters surgery added: the new pools' and the SAC heads'."""
    return [f"{path}.{name}" for path in [*pool_paths(model.flexsurgeon_plan), "sac_heads"]
            for name, _ in model.get_submodule(path).named_parameters()]


