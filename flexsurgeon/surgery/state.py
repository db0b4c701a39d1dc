"""The plan a converted model carries: kept on the model, and among the arguments timm records for rebuilding it.
"""
from __future__ import annotations

from torch import nn

from ..errors import FlexSurgeonError
from .plan import SurgeryPlan


def plan_of(model: nn.Module, doing: str = "used here", error: type[FlexSurgeonError] = FlexSurgeonError
            ) -> SurgeryPlan:
    """The plan ``model`` carries; ``error`` (saying it cannot be ``doing``) for a model that
    flexsurgeon did not convert or load."""
    plan = getattr(model, "flexsurgeon_plan", None)
    if not isinstance(plan, SurgeryPlan) or not isinstance(getattr(model, "sac_heads", None), nn.ModuleDict):
        raise error(f"only models returned by flexsurgeon.convert or flexsurgeon.load can be {doing}")
    return plan


def record_plan(model: nn.Module, plan: SurgeryPlan) -> None:
    """Keep ``plan`` on the model, and among the arguments timm records for rebuilding it
    (``_model_args``, which timm's ``save_for_hf`` and ``push_to_hf_hub`` write into
    config.json), so what those write loads as this converted model again."""
    model.flexsurgeon_plan = plan
    recorded = getattr(model, "_model_args", None)
    model._model_args = {**(recorded if isinstance(recorded, dict) else {}), "num_classes": plan.num_classes,
                         "plan": plan.to_dict()}
