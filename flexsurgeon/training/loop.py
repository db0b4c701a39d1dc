"""Fine-tuning: the SAC loss, timm's optimizer / scheduler / EMA, checkpoints and resume.

One loop for one process and for torch.distributed (``torchrun --nproc-per-node N -m
flexsurgeon finetune ...``): DistributedDataParallel, a DistributedSampler, metrics summed
over ranks, and only rank 0 writes. Checkpoints are convert-style folders (``last/`` with
the SAC heads and the training state, ``best/`` without the heads unless ``keep_sac``),
written atomically; ``--resume`` continues exactly where the last finished epoch left off
(``train_state.py``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoints.io import check_can_save, save
from ..data.loaders import make_loader
from ..errors import TrainingError
from ..runs.layout import BEST, LAST, LOG_NAME, RECIPE_NAME
from ..runs.log import append_log, truncate_log
from ..surgery.sac import forward_with_sac, strip_sac_heads
from .batches import device_batches, raise_if_out_of_memory
from .heads import head_parameter_names, regularizer
from .metrics import Tally, evaluate, head_names, one_class_note
from .recipe import Recipe
from .run_data import name_classes
from .setup import (
    DeviceSettings,
    Distributed,
    device_settings,
    enable_tf32,
    init_distributed,
    resolve_device,
    seed_everything,
)
from .state import restore_state, state_writers, write_recipe

__all__ = ["DeviceSettings", "FinetuneResult", "device_settings", "evaluate", "finetune"]


@dataclass
class FinetuneResult:
    output: Path
    epochs: int
    best_top1: float
    best_epoch: int
    last: dict  # the last epoch's log record
    main: bool = True  # False on the other ranks of a torchrun job, which write and print nothing


def finetune(model: nn.Module, data, recipe: Recipe, output: str | Path, *, resume: bool = False,
             progress: bool = True, log=print) -> FinetuneResult:
    """Fine-tune a converted ``model`` on ``data`` (a DataBundle) as ``recipe`` says.

    Writes ``output/last``, ``output/best``, ``output/log.jsonl`` and ``output/recipe.yaml``.
    With ``resume``, continues from ``output/last``: ``model`` must be that checkpoint's model.
    """
    output = Path(output)
    device = resolve_device(recipe.device)
    dist = init_distributed(device)
    settings = device_settings(device, recipe)
    if settings.tf32:
        enable_tf32()
    seed_everything(recipe.seed)
    if dist.main:
        check_can_save(model, output)
    if data.num_classes != model.flexsurgeon_plan.num_classes:
        raise TrainingError(f"the model has {model.flexsurgeon_plan.num_classes} classes but the data has "
                            f"{data.num_classes}; pass --num-classes {data.num_classes} to re-initialise its "
                            "classifier and SAC heads")
    name_classes(model, data)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)

    job = FinetuneRun(model, data, recipe, output, device, dist, settings, log=log, progress=progress)
    if resume:
        job.resume()
    job.start()
    for epoch in range(job.epoch, recipe.epochs):
        job.end_epoch(epoch, *job.train_epoch(epoch))
    if dist.enabled:

        tdist.destroy_process_group()
    return FinetuneResult(output=output, epochs=recipe.epochs, best_top1=job.best_top1, best_epoch=job.best_epoch,
                          last=job.last_record, main=dist.main)


class TrainForward(nn.Module):
    """Exposes ``forward_with_sac`` as ``forward`` so DDP (and torch.compile) see the SAC path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return forward_with_sac(self.model, x)


class FinetuneRun:
    """One ``finetune`` call: what it trains with, built once, and how far it has got
    (``epoch`` is the number of finished epochs)."""

    def __init__(self, model: nn.Module, data, recipe: Recipe, output: Path, device: torch.device,
                 dist: Distributed, settings: DeviceSettings, log, progress: bool):

        self.model, self.data, self.recipe, self.output = model, data, recipe, output
        self.device, self.dist, self.settings, self.log, self.progress = device, dist, settings, log, progress
        self.loss_weights = _loss_weights(model, recipe)
        self.heads = head_names(model)
        head_params = set(head_parameter_names(model))
        self.backbone = [p for n, p in model.named_parameters() if n not in head_params]
        self.optimizer = create_optimizer_v2(model, opt=recipe.optimizer, lr=recipe.lr,
                                             weight_decay=recipe.weight_decay, momentum=recipe.momentum)
        self.ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=recipe.ema_warmup) if recipe.ema else None
        self.train_loader, self.val_loader = self._loader(data.train), self._loader(data.val)
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise TrainingError(f"the training set ({len(data.train)} images) is smaller than one batch "
                                f"of {recipe.batch_size}; lower --batch-size")
        self.scheduler = _make_scheduler(self.optimizer, recipe, steps_per_epoch)
        self.mixup, self.criterion = _mixup_and_criterion(recipe, data.num_classes)
        self.train_forward: nn.Module = TrainForward(model)
        self.epoch, self.step, self.best_top1, self.best_epoch = 0, 0, -1.0, -1
        self.last_record: dict = {}

    def _loader(self, split):  # built once; set_epoch moves it (and its persistent workers) on

        recipe = self.recipe
        return make_loader(split, batch_size=recipe.batch_size, train=split is self.data.train, seed=recipe.seed,
                           epoch=0, num_workers=recipe.workers, distributed=self.dist.enabled,
                           pin_memory=self.settings.pin_memory)

    def resume(self) -> None:
        meta = restore_state(self.output / LAST, self.optimizer, self.scheduler, self.ema)
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.best_top1, self.best_epoch = meta["best_top1"], meta["best_epoch"]
        if self.dist.main:
            self.log(f"resuming {self.output} after epoch {self.epoch} of {self.recipe.epochs}")
            truncate_log(self.output / LOG_NAME, self.epoch)

    def start(self) -> None:
        """Wrap the training forward (DDP, torch.compile); rank 0 writes the recipe and says how it trains."""
        recipe, device, dist, settings = self.recipe, self.device, self.dist, self.settings
        if dist.enabled:

            device_ids = [device.index] if device.type == "cuda" else None
            self.train_forward = DistributedDataParallel(self.train_forward, device_ids=device_ids)
        if recipe.compile:
            self.train_forward = torch.compile(self.train_forward)
        if not dist.main:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        write_recipe(self.output / RECIPE_NAME, recipe)
        no_bf16 = recipe.amp and device.type == "cuda" and not settings.autocast
        how = ["bf16 autocast" if settings.autocast else "float32 (this GPU has no bfloat16)" if no_bf16 else "float32",
               "channels_last" if settings.channels_last else "",
               "compiled" if recipe.compile else "", f"{dist.world} processes" if dist.enabled else ""]
        self.log(f"fine-tuning on {device} ({', '.join(filter(None, how))}): {self.data.description}")

    def train_epoch(self, epoch: int) -> tuple[dict, float, bool]:
        """One pass over the training set: its summed metrics, the seconds it took, and whether
        the backbone was frozen."""

        recipe, sync_every = self.recipe, self.settings.sync_every
        frozen = recipe.freeze_backbone or epoch < recipe.freeze_epochs
        self.model.train()
        tally = Tally(self.heads, self.device)
        if hasattr(self.train_loader.sampler, "set_epoch"):  # not for streaming (iterable) data sets
            self.train_loader.sampler.set_epoch(epoch)
        started, seen = time.perf_counter(), 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{recipe.epochs}{' (head only)' if frozen else ''}",
                   disable=not (self.progress and self.dist.main), leave=False, dynamic_ncols=True)
        for x, y in device_batches(bar, self.device, self.settings.channels_last, "training"):
            outputs, losses, loss = self._train_step(x, y, frozen)
            tally.add(outputs, losses, y)
            seen += x.shape[0]
            # Reading the loss waits for the GPU, so it happens every few steps, not every step.
            if self.step % sync_every == 0:
                _check_finite(loss, epoch, self.step, self.output)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{tally.summary()['top1']['main']:.1f}",
                                img_s=f"{seen / (time.perf_counter() - started):.0f}")
        bar.close()
        _check_finite(loss, epoch, self.step, self.output)
        seconds = time.perf_counter() - started
        tally.reduce(self.dist)
        return tally.summary(), seconds, frozen

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, frozen: bool):
        """Forward, the weighted loss over the heads, backward and the updates; returns the
        outputs, the per-head losses and the total loss."""

        recipe = self.recipe
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.autocast):
                out, sac = self.train_forward(x)
            outputs = [*sac, out]
            losses = [self.criterion(o.float(), target) for o in outputs]
            loss = sum(w * part for w, part in zip(self.loss_weights, losses))
            if self.model.flexsurgeon_plan.pool == "linear" and recipe.reg_weight > 0:
                loss = loss + recipe.reg_weight * regularizer(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if frozen:  # the backbone keeps its weights; cheaper than re-wrapping DDP per phase
                for p in self.backbone:
                    p.grad = None
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), recipe.grad_clip)
            self.optimizer.step()  # optimizers allocate their state on the first step
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one too
            raise_if_out_of_memory(exc, recipe.batch_size, "training")
            raise
        self.step += 1
        _step_scheduler(self.scheduler, self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return outputs, losses, loss

    def end_epoch(self, epoch: int, train: dict, seconds: float, frozen: bool) -> None:
        """Validate, log the epoch, and (rank 0) save ``best/`` when it improved and ``last/``."""
        settings = self.settings
        evaluated = self.ema.module if self.ema is not None else self.model
        val = evaluate(evaluated, self.val_loader, self.device, self.dist, settings.autocast, settings.channels_last)
        top1 = val["top1"]["main"]
        improved = top1 > self.best_top1
        if improved:
            self.best_top1, self.best_epoch = top1, epoch + 1
        self.epoch = epoch + 1
        self.last_record = {
            "epoch": epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
            "frozen_backbone": frozen, "train": train, "val": val, "images_per_s": train["count"] / seconds,
            "seconds": seconds, "best_top1": self.best_top1, "skipped_images": self.data.skipped,
            "world_size": self.dist.world,
        }
        if self.dist.main:
            self._write_epoch(self.last_record, evaluated, improved)
        if self.dist.enabled:

            tdist.barrier()

    def _write_epoch(self, record: dict, evaluated: nn.Module, improved: bool) -> None:
        output, recipe, val, train = self.output, self.recipe, record["val"], record["train"]
        append_log(output / LOG_NAME, record)
        sac_acc = "  ".join(f"{h} {val['top1'][h]:.1f}" for h in self.heads[:-1])
        note = f" ({one_class_note(val)})" if one_class_note(val) else ""
        self.log(f"epoch {record['epoch']}/{recipe.epochs}: train loss {train['loss']['main']:.3f}  "
                 f"val top-1 {val['top1']['main']:.2f}{note}{'  (best)' if improved else ''}  {sac_acc}  "
                 f"{record['images_per_s']:.0f} img/s")
        if improved:  # best first: a kill between the two writes re-runs this epoch
            save(evaluated if recipe.keep_sac else strip_sac_heads(evaluated), output / BEST, force=True)
        progress = {"epoch": self.epoch, "step": self.step, "best_top1": self.best_top1,
                    "best_epoch": self.best_epoch}
        save(self.model, output / LAST, force=True,
             extra_files=state_writers(self.optimizer, self.scheduler, self.ema, progress, recipe))


def _loss_weights(model, recipe: Recipe) -> list[float]:
    weights = list(recipe.sac_weights) if recipe.sac_weights is not None else list(model.flexsurgeon_plan.sac_weights)
    needed = len(model.flexsurgeon_plan.sac) + 1
    if len(weights) != needed:
        raise TrainingError(f"recipe sac_weights has {len(weights)} values but the model has {needed - 1} SAC heads "
                            f"(give {needed}: heads, then main)")
    return weights


def _mixup_and_criterion(recipe: Recipe, num_classes: int):
    """timm's Mixup / CutMix (None when the recipe has neither) and the loss that goes with it."""

    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None, nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                  num_classes=num_classes)
    return mixup, SoftTargetCrossEntropy()


def _make_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int):
    if recipe.sched == "none":
        return None
    if recipe.sched == "onecycle":  # timm has no one-cycle; torch's is the field's standard one
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr,
                                                   total_steps=recipe.epochs * steps_per_epoch)

    scheduler, _ = create_scheduler_v2(optimizer, sched=recipe.sched, num_epochs=recipe.epochs,
                                       warmup_epochs=recipe.warmup_epochs, min_lr=recipe.min_lr,
                                       warmup_lr=recipe.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    return scheduler


def _step_scheduler(scheduler, step: int) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler.step()
    else:
        scheduler.step_update(num_updates=step)


def _check_finite(loss: torch.Tensor, epoch: int, step: int, output: Path) -> None:
    value = loss.item()
    if not math.isfinite(value):
        kept = f"; the last good checkpoint is {output / LAST}" if (output / LAST).exists() else ""
        raise TrainingError(f"the loss became {value} at epoch {epoch + 1}, step {step}; "
                            f"stopping (try a lower --lr){kept}")
