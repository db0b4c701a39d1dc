"""Loss and top-1 / top-5 accuracy of the main classifier and of every SAC head: summed per
batch on the device, reduced over torch.distributed ranks, and ``evaluate`` over a loader
(used by fine-tuning and by ``flexsurgeon eval``)."""
from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from ..surgery.sac import forward_with_sac
from ..utils import training_mode
from .batches import device_batches, raise_if_out_of_memory
from .setup import Distributed


def head_names(model) -> list[str]:
    """Names for the classifiers, as logged: the SAC heads as ``sac:NODE`` (the tap's graph node,
    their key in ``model.sac_heads``), then ``main`` (only ``main`` for a model flexsurgeon did
    not convert)."""
    plan = getattr(model, "flexsurgeon_plan", None)
    return [f"sac:{t.node}" for t in (plan.sac if plan else ())] + ["main"]


class Tally:
    """Per-head sums for one epoch: loss, top-1 / top-5 hits and the sample count.

    Sums stay on the device, so adding a batch does not wait for the GPU; ``summary``
    reads them back.
    """

    def __init__(self, heads: list[str], device: torch.device | str = "cpu"):
        self.heads = heads
        n = len(heads)
        self.sums = torch.zeros(3 * n + 1, dtype=torch.float64, device=device)  # loss, top1, top5, count
        self.predicted: torch.Tensor | None = None  # the main head's predictions per class
        self.per_rank: list | None = None

    def add(self, outputs: list[torch.Tensor], losses: list[torch.Tensor], target: torch.Tensor) -> None:
        n, batch = len(self.heads), target.shape[0]
        for i, (out, loss) in enumerate(zip(outputs, losses)):
            top = out.detach().topk(min(5, out.shape[1]), dim=1).indices
            hits = top.eq(target.view(-1, 1))
            self.sums[i] += loss.detach().double() * batch
            self.sums[n + i] += hits[:, 0].sum()
            self.sums[2 * n + i] += hits.any(dim=1).sum()
        main = outputs[-1].detach()
        counts = torch.bincount(main.argmax(1), minlength=main.shape[1]).double()
        self.predicted = counts if self.predicted is None else self.predicted + counts
        self.sums[-1] += batch

    def reduce(self, dist: Distributed) -> None:
        if not dist.enabled:
            return

        n = len(self.heads)
        local = torch.stack([self.sums[2 * n - 1], self.sums[-1]])  # main top-1 hits, count
        gathered = [torch.zeros_like(local) for _ in range(dist.world)]
        tdist.all_gather(gathered, local)  # kept in the log, so the reduction can be checked
        self.per_rank = [{"main_top1_hits": int(g[0].item()), "count": int(g[1].item())} for g in gathered]
        tdist.all_reduce(self.sums)
        if self.predicted is not None:
            tdist.all_reduce(self.predicted)

    def summary(self) -> dict:
        sums = self.sums.tolist()
        n, count = len(self.heads), max(sums[-1], 1.0)
        result = {"per_rank": self.per_rank} if self.per_rank else {}
        result.update({
            "loss": {h: sums[i] / count for i, h in enumerate(self.heads)},
            "top1": {h: 100.0 * sums[n + i] / count for i, h in enumerate(self.heads)},
            "top5": {h: 100.0 * sums[2 * n + i] / count for i, h in enumerate(self.heads)},
            "count": int(sums[-1]),
        })
        if self.predicted is not None and int(self.predicted.max().item()) == int(sums[-1]) > 1:
            result["one_class"] = int(self.predicted.argmax().item())  # every prediction is this class
        return result


def one_class_note(summary: dict) -> str:
    """A word beside a score when every prediction is one class: its top-1 is that class's share,
    often chance, and not a sign of learning (in a very short run, often BatchNorm statistics
    that have not settled)."""
    if summary.get("one_class") is None:
        return ""
    return (f"every prediction is class {summary['one_class']}: the score is that class's share of the data; in a "
            "short run, BatchNorm statistics may not have settled")


def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", dist: Distributed | None = None,
             autocast: bool = False, channels_last: bool = False) -> dict:
    """Top-1 / top-5 accuracy and cross-entropy of the main classifier and every SAC head.

    A model flexsurgeon did not convert (no plan) is scored on its output alone.
    """
    dist = dist or Distributed()
    device = torch.device(device)
    tally = Tally(head_names(model), device)
    with training_mode(model, False), torch.no_grad():
        for x, y in device_batches(loader, device, channels_last, "evaluating"):
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out, sac = forward_with_sac(model, x) if hasattr(model, "flexsurgeon_plan") else (model(x), [])
            except RuntimeError as exc:
                raise_if_out_of_memory(exc, getattr(loader, "batch_size", None) or x.shape[0], "evaluating")
                raise
            outputs = [*sac, out]
            tally.add(outputs, [F.cross_entropy(o.float(), y) for o in outputs], y)
    tally.reduce(dist)
    return tally.summary()
