"""What a conversion costs: parameters and multiply-adds of the source and of the converted model.

Multiply-adds come from torch's own FLOP counter (``torch.utils.flop_counter.FlopCounterMode``,
half its FLOPs) per image at the analysis input size. It counts convolutions and matrix
products, FlexPool's weighted sum among them, and not elementwise work (activations,
normalisation, an average pool's additions). The converted model is measured twice: for
inference (``model(x)`` in eval mode, SAC heads neither run nor kept by an export) and for
training (train mode, main classifier and SAC heads).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..utils import training_mode
from .apply import pool_paths
from .model_code import build_from_code, is_model_code
from .sac import forward_with_sac
from .sources import build_source

_BATCH = 2


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


@dataclass(frozen=True)
class CostReport:
    source: Cost
    inference: Cost
    training: Cost
    added: tuple[tuple[str, Cost], ...]  # each new pool and SAC head: module path, its own cost

    def to_dict(self) -> dict:
        return {"source": asdict(self.source), "inference": asdict(self.inference), "training": asdict(self.training),
                "added": [{"module": name, **asdict(cost)} for name, cost in self.added]}


def _count(model: nn.Module, x: torch.Tensor, train: bool) -> tuple[int, dict[str, int]]:
    """Multiply-adds of one forward per image, in total and per module path (timm's names, no
    class prefix). ``x`` holds ``_BATCH`` images: in train mode a BatchNorm on a pooled 1x1 map
    needs more than one value per channel. Buffers a train-mode forward updates (BatchNorm's
    running statistics) are put back, so measuring changes nothing in the model."""
    buffers = {name: b.clone() for name, b in model.named_buffers()} if train else {}
    # Counted with no parameter requiring grad: FlopCounterMode's module tracker hooks every
    # tensor that does, and fails on one a model passes on without a grad_fn (CaiT's class token).
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in trainable:
            p.requires_grad_(False)
        with training_mode(model, train), torch.no_grad(), FlopCounterMode(display=False) as counter:
            if train:
                forward_with_sac(model, x)
            else:
                model(x)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    per_image = 2 * len(x)  # FLOPs are two per multiply-add
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key != "Global":
            per_module[key.partition(".")[2]] = sum(ops.values()) // per_image
    return counter.get_total_flops() // per_image, per_module


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(source: nn.Module, converted: nn.Module) -> CostReport:
    """Costs of ``source`` and of ``converted`` (the same architecture after the plan), per image
    of the plan's input size; neither model's mode, weights or buffers change."""
    plan = converted.flexsurgeon_plan
    reference = next(iter(converted.parameters()), None)
    x = torch.randn(_BATCH, plan.in_chans, *plan.img_size, device=reference.device if reference is not None else "cpu",
                    dtype=reference.dtype if reference is not None else torch.float32)
    source_macs, _ = _count(source, x, train=False)
    inference_macs, _ = _count(converted, x, train=False)
    training_macs, per_module = _count(converted, x, train=True)
    heads = converted.sac_heads
    pools = [(name, converted.get_submodule(name)) for name in pool_paths(plan)]
    added = [(name, m) for name, m in pools] + [(f"sac_heads.{name}", m) for name, m in heads.named_children()]
    total = _params(converted)
    return CostReport(
        source=Cost(_params(source), source_macs),
        inference=Cost(total - _params(heads), inference_macs),
        training=Cost(total, training_macs),
        added=tuple((name, Cost(_params(m), per_module.get(name, 0))) for name, m in added),
    )


def measure_rebuilt(name: str, converted: nn.Module) -> CostReport:
    """``measure`` for a model converted from the command line's MODEL (a timm name, tv:NAME or
    FILE.py:FACTORY): the source is built again, at random init (costs do not depend on weights)."""
    plan = converted.flexsurgeon_plan
    if is_model_code(name):
        source = build_from_code(name, num_classes=plan.num_classes, in_chans=plan.in_chans)
    else:
        source = build_source(plan.source, "random")
    return measure(source, converted)


__all__ = ["Cost", "CostReport", "measure", "measure_rebuilt"]
