"""The plan a converted model carries: kept on the model, and among the arguments timm records for rebuilding it.
"""
from __future__ import annotations

from torch import nn

from .plan import SurgeryPlan

ARCHITECTURE = "flexsurgeon"  # the timm architecture that rebuilds a converted model from its plan


def record_plan(model: nn.Module, plan: SurgeryPlan) -> None:
    """Keep ``plan`` on the model, and among the arguments timm records for rebuilding it
    (``_model_args``, which timm's ``save_for_hf`` and ``push_to_hf_hub`` write into
    config.json), so what those write loads as this converted model again."""
    model.flexsurgeon_plan = plan
    recorded = getattr(model, "_model_args", None)
    model._model_args = {**(recorded if isinstance(recorded, dict) else {}), "num_classes": plan.num_classes,
                         "plan": plan.to_dict()}
