"""The timm architecture ``flexsurgeon``: what ``timm.create_model('local-dir:DIR')`` and
``timm.create_model('hf-hub:ORG/NAME')`` call.

A checkpoint's ``config.json`` names this architecture and holds the plan in
``model_args``; timm passes the plan and the user's keyword arguments to the entrypoint,
which rebuilds the source, applies the plan and loads the weights.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, PlanError
from ..hub import download_file
from ..surgery.plan import ARCHITECTURE, SurgeryPlan
from ..utils import CONFIG_NAME, WEIGHTS_NAME, first_line
from .io import (
    as_tuples,
    build_from_plan,
    check_model_args,
    load_weights,
    read_folder,
    read_weights_header,
)

# timm keyword arguments the plan fixes: given, they must agree with it
_PLAN_FIXED = {"num_classes": lambda plan: plan.num_classes, "in_chans": lambda plan: plan.in_chans}
# timm keyword arguments that cannot apply to a converted model
_REFUSED = {
    "features_only": "features_only is not supported for a converted model; call its forward_intermediates() "
                     "or forward_features() instead",
    "out_indices": "out_indices applies with features_only, which a converted model does not support; "
                   "use forward_intermediates(indices=...)",
    "global_pool": "global_pool cannot change on a converted model: its global pool is FlexPool",
    "img_size": "img_size is fixed by the conversion (FlexPool resamples its weights for other input sizes); "
                "convert again with --img-size to change it",
}
_FEATURES = ("features_only", "out_indices")  # their advice is timm's API
# what timm's create_model passes to every entrypoint, and what we set ourselves
_TIMM_PLUMBING = ("pretrained_cfg_overlay", "cache_dir", "pretrained_strict")


def _timm_entrypoint(pretrained: bool = False, plan=None, pretrained_cfg=None, pretrained_model_args=None,
                     **kwargs):
    """timm entrypoint for ``architecture: flexsurgeon`` (reached through ``local-dir:DIR`` or
    ``hf-hub:ORG/NAME``).

    Other keyword arguments go to the source model's builder (``drop_rate``,
    ``drop_path_rate``, ...), as ``timm.create_model`` would pass them to the source; those
    the plan fixes must agree with it, and those that cannot apply are refused. timm also
    passes the checkpoint's own ``model_args`` (``pretrained_model_args``): they are checked
    against the plan, and the values they set are not the user's requests.
    """
    if plan is None:
        raise PlanError("the flexsurgeon architecture needs the plan from a checkpoint's config.json "
                        "(timm.create_model('local-dir:DIR' or 'hf-hub:ORG/NAME', pretrained=True))")
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg or {})
    folder = _folder(cfg)
    if folder is not None:  # the checks flexsurgeon.load makes, on the file timm read the plan from
        _, plan = read_folder(folder)
    else:
        plan = SurgeryPlan.from_dict(plan)
    recorded = dict(pretrained_model_args or {})
    check_model_args(recorded, plan)
    extra = {k: v for k, v in kwargs.items() if v is not None and k not in _TIMM_PLUMBING
             and (k in _PLAN_FIXED or k not in recorded or recorded[k] != v)}
    for key, message in _REFUSED.items():
        if extra.get(key) not in (None, False):
            if key in _FEATURES and plan.source is not None and plan.source.library == "torchvision":
                message = message.split(";")[0] + ("; for features of a torchvision model, use torchvision's "
                                                   "feature_extraction.create_feature_extractor(model, return_nodes)")
            raise PlanError(message)
        extra.pop(key, None)
    for key, fixed in _PLAN_FIXED.items():
        if key in extra and extra.pop(key) != fixed(plan):
            raise PlanError(f"this checkpoint has {key}={fixed(plan)}; convert again to change it")
    if plan.source is not None and plan.source.library == "custom":
        raise PlanError(f"this checkpoint was converted from a custom model ({plan.source.name}), which timm cannot "
                        "build: use flexsurgeon.load(DIR, model=YOUR_MODEL)")
    try:
        model = build_from_plan(plan, **extra)
    except TypeError as exc:
        raise PlanError(f"the source model {plan.source.label} does not take {', '.join(sorted(extra))}: "
                        f"{first_line(exc, str(exc))}") from exc
    if pretrained:
        if cfg.get("file"):
            weights = Path(cfg["file"]) / WEIGHTS_NAME
        elif cfg.get("hf_hub_id"):
            weights = download_file(cfg["hf_hub_id"], WEIGHTS_NAME)
        else:
            raise CheckpointError("pretrained=True needs a checkpoint: use 'local-dir:DIR' or 'hf-hub:ORG/NAME'")
        load_weights(model, weights, read_weights_header(weights, plan))
    model.pretrained_cfg = model.default_cfg = as_tuples(cfg)
    return model


def _folder(cfg: dict) -> Path | None:
    """The checkpoint folder timm read the config from: ``local-dir:`` names it; for ``hf-hub:`` it
    is the Hub cache's copy of the repository (config.json is there: timm downloaded it)."""
    if cfg.get("file"):
        return Path(cfg["file"])
    if cfg.get("hf_hub_id"):
        return download_file(cfg["hf_hub_id"], CONFIG_NAME).parent
    return None


def register_timm_architecture() -> None:
    """Register ``flexsurgeon`` in timm's model registry (idempotent)."""
    import sys

    from timm.models import is_model, register_model

    if is_model(ARCHITECTURE):
        return
    module = sys.modules[__name__]
    entry = _timm_entrypoint
    entry.__name__ = ARCHITECTURE
    entry.__module__ = module.__name__
    register_model(entry)


__all__ = ["register_timm_architecture"]
