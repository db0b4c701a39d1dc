"""The conversion pipeline: source -> trace -> analyse -> plan -> apply -> check.

``convert`` is the Python twin of ``flexsurgeon convert``; ``inspect`` stops after the
plan and reports what convert would do.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..errors import AnalysisError, FlexSurgeonError
from ..layers.kinds import preserves
from ..utils import as_size, per_channel, training_mode
from .analysis import Analysis, analyse
from .apply import apply_plan
from .costs import CostReport
from .costs import measure as measure_costs
from .plan import ARCHITECTURE, SurgeryPlan
from .planner import make_plan
from .sources import resolve_source

PRESERVATION_TOLERANCE = 1e-5  # float32, the converted model's eval output against the source's


@dataclass
class Inspection:
    analysis: Analysis
    plan: SurgeryPlan | None
    problem: str | None  # why convert would refuse, when it would
    costs: CostReport | None = None  # parameters and multiply-adds before and after, with a plan

    def to_dict(self) -> dict:
        return {**self.analysis.to_dict(), "plan": self.plan.to_dict() if self.plan else None,
                "problem": self.problem, "costs": self.costs.to_dict() if self.costs else None}


def _default_img_size(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (int(size[1]), int(size[2])) if size else (224, 224)


def _as_size(img_size) -> tuple[int, int]:
    size = as_size(img_size)
    if size is None:
        raise AnalysisError(f"img_size must be a positive integer or a pair, got {img_size!r}")
    return size


def _num_classes(model: nn.Module, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    found = getattr(model, "num_classes", None)
    if isinstance(found, int) and found > 0:
        return found
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last:
        return last[-1].out_features
    raise AnalysisError("cannot tell how many classes the model has; pass num_classes")


def inspect(model_or_name, *, img_size=None, in_chans: int = 3, num_classes: int | None = None,
            pool: str = "softmax", dropout: float = 0.0, sac_stages=None, sac_weights=None,
            replace_gating: bool = False, weights: str | Path = "random") -> Inspection:
    """Trace and analyse a model, and plan its surgery without changing it."""
    model, spec = resolve_source(model_or_name, num_classes=num_classes, in_chans=in_chans, weights=weights,
                                 img_size=_as_size(img_size) if img_size is not None else None)
    size = _as_size(img_size) if img_size is not None else _default_img_size(model)
    analysis = analyse(model, size, in_chans=in_chans, replace_gating=replace_gating)
    try:
        plan = make_plan(analysis, spec, _num_classes(model, num_classes), pool=pool, dropout=dropout,
                         sac_stages=sac_stages, sac_weights=sac_weights, replace_gating=replace_gating)
    except FlexSurgeonError as exc:
        return Inspection(analysis, None, str(exc))
    with torch.random.fork_rng(devices=[]):  # the new modules' init must not move the caller's RNG
        converted = apply_plan(copy.deepcopy(model), plan)
    return Inspection(analysis, plan, None, measure_costs(model, converted))


def convert(model_or_name, *, img_size=None, in_chans: int = 3, num_classes: int | None = None,
            pool: str = "softmax", dropout: float = 0.0, sac_stages=None, sac_weights=None,
            replace_gating: bool = False, weights: str | Path = "random", check: bool = True,
            progress: bool = False) -> nn.Module:
    """Convert a model (a timm name, ``tv:NAME``, or an instance) to FlexPool + SAC heads.

    The surgery happens inside the model: given an instance, that very object is changed
    and returned (like peft's ``get_peft_model``), keeping its class and methods. With
    ``check`` (default) its eval output is compared with the output it gave before the
    surgery on a random input, and a mismatch is an error. ``pool`` is a
    FlexPool kind (softmax, linear) or an ablation baseline (avg, lse, simpool, token); a
    baseline that is not the source's own reduction (lse, simpool; token on a mean, avg on a
    class token) changes the output from the start, so it is not checked. ``progress`` shows
    the step under way on a terminal (a large model at a large size takes a while on a CPU).
    """

    label = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    steps = tqdm(total=4, desc=f"building {label}", bar_format="{desc} (step {n_fmt}/{total_fmt}, {elapsed})",
                 leave=False, disable=None if progress else True)
    with steps:
        model, spec = resolve_source(model_or_name, num_classes=num_classes, in_chans=in_chans, weights=weights,
                                 img_size=_as_size(img_size) if img_size is not None else None)
        size = _as_size(img_size) if img_size is not None else _default_img_size(model)
        _next_step(steps, f"analysing at {size[0]}x{size[1]} and {2 * size[0]}x{2 * size[1]}")
        analysis = analyse(model, size, in_chans=in_chans, replace_gating=replace_gating)
        _next_step(steps, "applying the plan")
        plan = make_plan(analysis, spec, _num_classes(model, num_classes), pool=pool, dropout=dropout,
                         sac_stages=sac_stages, sac_weights=sac_weights, replace_gating=replace_gating)
        check = check and all(preserves(plan.pool, edit.reduction) for edit in plan.pools)
        sample, expected = _eval_output(model, plan) if check else (None, None)
        converted = apply_plan(model, plan)
        converted.pretrained_cfg = converted.default_cfg = make_pretrained_cfg(
            getattr(model, "pretrained_cfg", None), plan)
        _next_step(steps, "checking that the outputs are unchanged")
        if check:
            _check_preserved(expected, _eval_output(converted, plan, sample)[1])
        steps.update()
    return converted


def _next_step(steps, desc: str) -> None:
    steps.update()
    steps.set_description_str(desc)


def _eval_output(model: nn.Module, plan: SurgeryPlan, sample: torch.Tensor | None = None):
    """A seeded sample (unless given) and the model's eval-mode output on it; the mode is restored."""
    if sample is None:
        sample = torch.randn(2, plan.in_chans, *plan.img_size, generator=torch.Generator().manual_seed(1))
        reference = next(iter(model.parameters()), None)
        if reference is not None:
            sample = sample.to(reference.device)
    with training_mode(model, False), torch.no_grad():
        return sample, model(sample)


def _check_preserved(expected, got) -> None:
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        diff = (expected.float() - got.float()).abs().max().item()
        scale = max(1.0, expected.float().abs().max().item())
        if not diff <= PRESERVATION_TOLERANCE * scale:
            raise AnalysisError(f"the converted model's output differs from the source's by {diff:.3g}; "
                                "this model is not supported yet")


# pretrained_cfg fields that point at the source's download location; a converted model has none
_SOURCE_LOCATION_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag",
                         "custom_load", "hf_hub_revision")


def _json_safe(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def make_pretrained_cfg(source_cfg: dict | None, plan: SurgeryPlan) -> dict:
    """The data config a converted model carries: the source's, at the plan's input size."""
    cfg = {k: v for k, v in dict(source_cfg or {}).items() if k not in _SOURCE_LOCATION_KEYS and _json_safe(v)}
    cfg.setdefault("mean", (0.485, 0.456, 0.406))
    cfg.setdefault("std", (0.229, 0.224, 0.225))
    for key in ("mean", "std"):  # one value per input channel, so timm's transforms fit the model
        cfg[key] = per_channel(cfg[key], plan.in_chans)
    cfg.setdefault("interpolation", "bilinear")
    cfg.setdefault("crop_pct", 0.875)
    cfg["input_size"] = (plan.in_chans, *plan.img_size)
    cfg["pool_size"] = plan.pools[0].size
    cfg.pop("test_input_size", None)  # FlexPool would resample there; the native size is the tested one
    cfg["num_classes"] = plan.num_classes
    cfg["architecture"] = ARCHITECTURE
    for key in ("label_names", "label_descriptions"):  # the source's, for another head, would mislabel
        if key in cfg and len(cfg[key] or ()) != plan.num_classes:
            del cfg[key]
    return cfg
