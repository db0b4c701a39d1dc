"""Fine-tuning: the SAC loss, timm's optimizer / scheduler / EMA, checkpoints and resume.

One loop for one process and for torch.distributed (``torchrun --nproc-per-node N -m
flexsurgeon finetune ...``): DistributedDataParallel, a DistributedSampler, metrics summed
over ranks, and only rank 0 writes. Checkpoints are convert-style folders (``last/`` with
the SAC heads and the training state, ``best/`` without the heads unless ``keep_sac``),
written atomically; the training state is safetensors plus JSON, never a pickle, so
``--resume`` continues exactly where the last finished epoch left off.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, TrainingError
from .recipe import Recipe
from .sac import forward_with_sac, strip_sac_heads

LAST, BEST = "last", "best"
STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"
LOG_NAME, RECIPE_NAME = "log.jsonl", "recipe.yaml"


@dataclass(frozen=True)
class DeviceSettings:
    """What fine-tuning does differently on a GPU, decided in one place.

    The loop reads only these fields, never the device type, so a CPU test can run the
    GPU's code path (bf16 autocast, channels_last, pinned loader, deferred loss reads).
    """
    autocast: bool = False  # bfloat16 autocast
    channels_last: bool = False  # model and batches in NHWC
    pin_memory: bool = False  # loader pins batches; copies are non_blocking
    tf32: bool = False  # TF32 matmuls and convolutions, cudnn autotuning
    sync_every: int = 1  # steps between reads of the loss (NaN check, progress bar); each read waits for the GPU


def device_settings(device: torch.device, recipe: Recipe) -> DeviceSettings:
    """CUDA: the recipe's ``amp`` (where the GPU has bfloat16: Ampere and newer) and
    ``channels_last``, pinned memory, TF32, a loss read every 10 steps. Anything else:
    float32, NCHW, every step checked."""
    if device.type != "cuda":
        return DeviceSettings()
    return DeviceSettings(autocast=recipe.amp and _native_bf16(), channels_last=recipe.channels_last,
                          pin_memory=True, tf32=True, sync_every=10)


def _native_bf16() -> bool:
    """True on GPUs with bfloat16 arithmetic (Ampere and newer); older ones (V100, T4) would
    emulate it slowly, so they train in float32 instead."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch has no emulation and no such argument
        return torch.cuda.is_bf16_supported()


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _TrainForward(nn.Module):
    """Exposes ``forward_with_sac`` as ``forward`` so DDP (and torch.compile) see the SAC path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return forward_with_sac(self.model, x)


class _Tally:
    """Per-head sums for one epoch: loss, top-1 / top-5 hits and the sample count.

    Sums stay on the device, so adding a batch does not wait for the GPU; ``summary``
    reads them back.
    """

    def __init__(self, heads: list[str], device: torch.device | str = "cpu"):
        self.heads = heads
        n = len(heads)
        self.sums = torch.zeros(3 * n + 1, dtype=torch.float64, device=device)  # loss, top1, top5, count
        self.per_rank: list | None = None

    def add(self, outputs: list[torch.Tensor], losses: list[torch.Tensor], target: torch.Tensor) -> None:
        n, batch = len(self.heads), target.shape[0]
        for i, (out, loss) in enumerate(zip(outputs, losses)):
            top = out.detach().topk(min(5, out.shape[1]), dim=1).indices
            hits = top.eq(target.view(-1, 1))
            self.sums[i] += loss.detach().double() * batch
            self.sums[n + i] += hits[:, 0].sum()
            self.sums[2 * n + i] += hits.any(dim=1).sum()
        self.sums[-1] += batch

    def reduce(self, dist: _Dist) -> None:
        if not dist.enabled:
            return
        import torch.distributed as tdist

        n = len(self.heads)
        local = torch.stack([self.sums[2 * n - 1], self.sums[-1]])  # main top-1 hits, count
        gathered = [torch.zeros_like(local) for _ in range(dist.world)]
        tdist.all_gather(gathered, local)  # kept in the log, so the reduction can be checked
        self.per_rank = [{"main_top1_hits": int(g[0].item()), "count": int(g[1].item())} for g in gathered]
        tdist.all_reduce(self.sums)

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
        return result


def head_names(model) -> list[str]:
    """Names for the classifiers, as logged: the SAC heads by module path, then ``main``
    (only ``main`` for a model flexsurgeon did not convert)."""
    plan = getattr(model, "flexsurgeon_plan", None)
    return [f"sac:{t.module or t.node}" for t in (plan.sac if plan else ())] + ["main"]


def _loss_weights(model, recipe: Recipe) -> list[float]:
    weights = list(recipe.sac_weights) if recipe.sac_weights is not None else list(model.flexsurgeon_plan.sac_weights)
    needed = len(model.flexsurgeon_plan.sac) + 1
    if len(weights) != needed:
        raise TrainingError(f"recipe sac_weights has {len(weights)} values but the model has {needed - 1} SAC heads "
                            f"(give {needed}: heads, then main)")
    return weights


def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", dist: _Dist | None = None,
             autocast: bool = False, channels_last: bool = False) -> dict:
    """Top-1 / top-5 accuracy and cross-entropy of the main classifier and every SAC head.

    A model flexsurgeon did not convert (no plan) is scored on its output alone.
    """
    dist = dist or _Dist()
    device = torch.device(device)
    heads = head_names(model)
    tally = _Tally(heads, device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in _batches(loader, "evaluating"):
            x, y = _to_device(x, y, device, channels_last)
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out, sac = forward_with_sac(model, x) if hasattr(model, "flexsurgeon_plan") else (model(x), [])
            except RuntimeError as exc:
                _raise_if_out_of_memory(exc, getattr(loader, "batch_size", None) or x.shape[0], "evaluating")
                raise
            outputs = [*sac, out]
            tally.add(outputs, [F.cross_entropy(o.float(), y) for o in outputs], y)
    model.train(was_training)
    tally.reduce(dist)
    return tally.summary()


def _batches(loader, doing: str):
    """``loader``'s batches; a worker process that died (the OS's out-of-memory killer, most
    often) becomes a TrainingError that says what to try, not an unexplained RuntimeError."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            reason = str(exc).strip().splitlines()[0]
            raise TrainingError(f"a data loader worker died while {doing} ({reason}); this is usually the "
                                "system running out of memory: try fewer --workers or a smaller --batch-size") from exc
        yield batch


def _raise_if_out_of_memory(exc: RuntimeError, batch_size: int, doing: str) -> None:
    """Turn an out-of-memory failure into a TrainingError that suggests a smaller batch.

    CUDA raises ``torch.cuda.OutOfMemoryError``; the CPU and MPS allocators raise a plain
    RuntimeError ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory").
    """
    text = str(exc).lower()
    gpu = isinstance(exc, torch.cuda.OutOfMemoryError)
    if not gpu and "out of memory" not in text and "can't allocate memory" not in text:
        return
    where = "GPU" if gpu or "cuda" in text else "MPS" if "mps" in text else "CPU"
    advice = (f"try --batch-size {batch_size // 2}" if batch_size > 1 else
              "the batch size is already 1: try a smaller --img-size or model")
    raise TrainingError(f"out of {where} memory {doing} at batch size {batch_size}; {advice}") from exc


def _to_device(x, y, device, channels_last: bool = False):
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=non_blocking)


# ---------------------------------------------------------------- training state I/O

def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _json_ready(value):
    if isinstance(value, dict):
        # Older torch keeps functions in some scheduler states (OneCycleLR's anneal_func in 2.3,
        # not in 2.11); the rebuilt scheduler already has them, so they are left out, not saved as None.
        return {str(k): _json_ready(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _state_writers(optimizer, scheduler, ema, progress: dict, recipe: Recipe) -> dict:
    from safetensors.torch import save_file

    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    if ema is not None:
        for name, value in ema.module.state_dict().items():
            tensors[f"ema.{name}"] = value.detach().cpu().contiguous()
    np_state = np.random.get_state()
    meta = {
        **progress,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng_python": random.getstate(),
        "rng_numpy": [np_state[0], np_state[1], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "recipe": recipe.to_dict(),
    }
    text = json.dumps(_json_ready(meta))  # fails here, before the folder is written

    return {
        STATE_TENSORS: lambda path: save_file(tensors, str(path)),
        STATE_JSON: lambda path: path.write_text(text),
        RECIPE_NAME: lambda path: _write_recipe(path, recipe),
    }


def _write_recipe(path: Path, recipe: Recipe) -> None:
    import yaml

    path.write_text("# the fully resolved recipe of this run\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _read_state(directory: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot resume from {directory}: its training state is missing or unreadable "
                              f"({exc})") from exc
    return meta, tensors


def _restore_rng(meta: dict, tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["rng_numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- the run

@dataclass
class FinetuneResult:
    output: Path
    epochs: int
    best_top1: float
    best_epoch: int
    last: dict  # the last epoch's log record
    main: bool = True  # False on the other ranks of a torchrun job, which write and print nothing


def _make_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int):
    if recipe.sched == "none":
        return None
    if recipe.sched == "onecycle":  # timm has no one-cycle; torch's is the field's standard one
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr,
                                                   total_steps=recipe.epochs * steps_per_epoch)
    from timm.scheduler import create_scheduler_v2

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


def finetune(model: nn.Module, data, recipe: Recipe, output: str | Path, *, resume: bool = False,
             progress: bool = True, log=print) -> FinetuneResult:
    """Fine-tune a converted ``model`` on ``data`` (a DataBundle) as ``recipe`` says.

    Writes ``output/last``, ``output/best``, ``output/log.jsonl`` and ``output/recipe.yaml``.
    With ``resume``, continues from ``output/last``: ``model`` must be that checkpoint's model.
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    from .apply import head_parameter_names, regularizer
    from .data import make_loader
    from .io import save

    output = Path(output)
    device = _resolve_device(recipe.device)
    dist = _init_distributed(device)
    settings = device_settings(device, recipe)
    if settings.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    seed_everything(recipe.seed)
    if data.num_classes != model.flexsurgeon_plan.num_classes:
        raise TrainingError(f"the model has {model.flexsurgeon_plan.num_classes} classes but the data has "
                            f"{data.num_classes}; convert with --num-classes {data.num_classes}")

    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    weights = _loss_weights(model, recipe)
    heads = head_names(model)
    head_params = set(head_parameter_names(model))
    backbone = [p for n, p in model.named_parameters() if n not in head_params]
    optimizer = create_optimizer_v2(model, opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    momentum=recipe.momentum)
    ema = ModelEmaV3(model, decay=recipe.ema_decay) if recipe.ema else None

    def loader(split, epoch):  # built once; set_epoch moves it (and its persistent workers) on
        return make_loader(split, batch_size=recipe.batch_size, train=split is data.train, seed=recipe.seed,
                           epoch=epoch, num_workers=recipe.workers, distributed=dist.enabled,
                           pin_memory=settings.pin_memory)

    train_loader, val_loader = loader(data.train, 0), loader(data.val, 0)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainingError(f"the training set ({len(data.train)} images) is smaller than one batch "
                            f"of {recipe.batch_size}; lower --batch-size")
    scheduler = _make_scheduler(optimizer, recipe, steps_per_epoch)
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                      num_classes=data.num_classes)
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    start_epoch, step, best_top1, best_epoch = 0, 0, -1.0, -1
    last_record: dict = {}
    if resume:
        last_dir = output / LAST
        meta, tensors = _read_state(last_dir)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if ema is not None:
            ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        _restore_rng(meta, tensors)
        start_epoch, step = meta["epoch"], meta["step"]
        best_top1, best_epoch = meta["best_top1"], meta["best_epoch"]
        if dist.main:
            log(f"resuming {output} after epoch {start_epoch} of {recipe.epochs}")
            _truncate_log(output / LOG_NAME, start_epoch)

    train_forward: nn.Module = _TrainForward(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        train_forward = DistributedDataParallel(train_forward, device_ids=device_ids)
    if recipe.compile:
        train_forward = torch.compile(train_forward)
    autocast = settings.autocast
    if dist.main:
        output.mkdir(parents=True, exist_ok=True)
        _write_recipe(output / RECIPE_NAME, recipe)
        no_bf16 = recipe.amp and device.type == "cuda" and not autocast
        how = ["bf16 autocast" if autocast else "float32 (this GPU has no bfloat16)" if no_bf16 else "float32",
               "channels_last" if settings.channels_last else "",
               "compiled" if recipe.compile else "", f"{dist.world} processes" if dist.enabled else ""]
        log(f"fine-tuning on {device} ({', '.join(filter(None, how))}): {data.description}")

    for epoch in range(start_epoch, recipe.epochs):
        frozen = recipe.freeze_backbone or epoch < recipe.freeze_epochs
        model.train()
        tally = _Tally(heads, device)
        if hasattr(train_loader.sampler, "set_epoch"):  # not for streaming (iterable) data sets
            train_loader.sampler.set_epoch(epoch)
        started, seen = time.perf_counter(), 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{recipe.epochs}{' (head only)' if frozen else ''}",
                   disable=not (progress and dist.main), leave=False, dynamic_ncols=True)
        for x, y in _batches(bar, "training"):
            x, y = _to_device(x, y, device, settings.channels_last)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out, sac = train_forward(x)
                outputs = [*sac, out]
                losses = [criterion(o.float(), target) for o in outputs]
                loss = sum(w * part for w, part in zip(weights, losses))
                if model.flexsurgeon_plan.pool_mode == "linear" and recipe.reg_weight > 0:
                    loss = loss + recipe.reg_weight * regularizer(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if frozen:  # the backbone keeps its weights; cheaper than re-wrapping DDP per phase
                    for p in backbone:
                        p.grad = None
                if recipe.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                optimizer.step()  # optimizers allocate their state on the first step
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one too
                _raise_if_out_of_memory(exc, recipe.batch_size, "training")
                raise
            step += 1
            _step_scheduler(scheduler, step)
            if ema is not None:
                ema.update(model, step=step)
            tally.add(outputs, losses, y)
            seen += x.shape[0]
            # Reading the loss waits for the GPU, so it happens every few steps, not every step.
            if step % settings.sync_every == 0:
                _check_finite(loss, epoch, step, output)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{tally.summary()['top1']['main']:.1f}",
                                img_s=f"{seen / (time.perf_counter() - started):.0f}")
        bar.close()
        _check_finite(loss, epoch, step, output)
        seconds = time.perf_counter() - started
        tally.reduce(dist)
        train = tally.summary()
        evaluated = ema.module if ema is not None else model
        val = evaluate(evaluated, val_loader, device, dist, autocast, settings.channels_last)
        top1 = val["top1"]["main"]
        improved = top1 > best_top1
        if improved:
            best_top1, best_epoch = top1, epoch + 1
        record = {
            "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"], "frozen_backbone": frozen,
            "train": train, "val": val, "images_per_s": train["count"] / seconds, "seconds": seconds,
            "best_top1": best_top1, "skipped_images": data.skipped, "world_size": dist.world,
        }
        last_record = record
        if dist.main:
            with open(output / LOG_NAME, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            sac_acc = "  ".join(f"{h} {val['top1'][h]:.1f}" for h in heads[:-1])
            log(f"epoch {epoch + 1}/{recipe.epochs}: train loss {train['loss']['main']:.3f}  "
                f"val top-1 {top1:.2f}{'  (best)' if improved else ''}  {sac_acc}  "
                f"{record['images_per_s']:.0f} img/s")
            if improved:  # best first: a kill between the two writes re-runs this epoch
                best_model = evaluated if recipe.keep_sac else strip_sac_heads(evaluated)
                save(best_model, output / BEST, force=True)
            progress_state = {"epoch": epoch + 1, "step": step, "best_top1": best_top1, "best_epoch": best_epoch}
            save(model, output / LAST, force=True,
                 extra_files=_state_writers(optimizer, scheduler, ema, progress_state, recipe))
        if dist.enabled:
            import torch.distributed as tdist

            tdist.barrier()
    if dist.enabled:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return FinetuneResult(output=output, epochs=recipe.epochs, best_top1=best_top1, best_epoch=best_epoch,
                          last=last_record, main=dist.main)


def _truncate_log(path: Path, epochs: int) -> None:
    """Keep the log's first ``epochs`` records: a kill after an epoch's log line but before its
    checkpoint makes the resumed run redo that epoch, which must not be logged twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def _check_finite(loss: torch.Tensor, epoch: int, step: int, output: Path) -> None:
    value = loss.item()
    if not math.isfinite(value):
        kept = f"; the last good checkpoint is {output / LAST}" if (output / LAST).exists() else ""
        raise TrainingError(f"the loss became {value} at epoch {epoch + 1}, step {step}; "
                            f"stopping (try a lower --lr){kept}")


def _data_config_for(model: nn.Module) -> dict:
    from timm.data import resolve_data_config

    return resolve_data_config(model=model)


def _data_config_for_name(name: str, img_size: int | None, in_chans: int) -> dict:
    """The data config a model name implies, before the model exists (its classes come from the data)."""
    from timm.data import resolve_data_config

    from .models import is_model_code

    cfg = {}
    if not name.startswith(("tv:", "torchvision:")) and not is_model_code(name):
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(name.split(".")[0])
        cfg = pretrained.to_dict() if pretrained is not None else {}
    size = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        size = (in_chans, img_size, img_size)
    return resolve_data_config(args={"input_size": (in_chans, *size[1:])}, pretrained_cfg=cfg)


def _train_transform_kwargs(recipe: Recipe) -> dict:
    """The recipe's options for timm's ``create_transform(is_training=True)``."""
    return {"hflip": recipe.hflip, **({"scale": tuple(recipe.scale)} if recipe.scale else {})}


def _run_data(data_spec: str, data_config: dict, in_chans: int, recipe: Recipe):
    from .data import load_data, subset_train

    data = load_data(data_spec, data_config=data_config, in_chans=in_chans, val_split=recipe.val_split,
                     seed=recipe.seed, train_transform_kwargs=_train_transform_kwargs(recipe),
                     val_from_train=recipe.val_from_train)
    return subset_train(data, recipe.train_subset, recipe.seed) if recipe.train_subset else data


def run(source: str, data_spec: str, recipe: Recipe, output: str | Path, *, resume: bool = False,
        overrides: dict | None = None, weights: str | Path = "random", sac_stages=None, in_chans: int = 3,
        replace_gating: bool = False, model_code: str | None = None, progress: bool = True,
        log=print) -> FinetuneResult:
    """``flexsurgeon finetune``: resolve the model (a converted folder or a name to convert), the
    data and the recipe, then fine-tune. On ``resume`` the recipe saved in ``output/last`` is used,
    with ``overrides`` on top (e.g. more epochs). ``model_code`` (``FILE.py:FACTORY``) builds the
    source of a folder converted from a custom model; a source given as ``FILE.py:FACTORY`` is its own."""
    from .folders import recover
    from .io import load_folder, read_config
    from .models import is_model_code
    from .recipe import load_recipe, with_overrides
    from .surgery import convert

    if is_model_code(source):
        model_code = source

    output = Path(output)
    if resume:
        last = output / LAST
        for folder in (last, output / BEST):  # what killed saves left: this run is their writer now
            recover(folder)
        if not (last / STATE_JSON).is_file():
            raise CheckpointError(f"nothing to resume: {last} has no training state (run without --resume)")
        recipe = with_overrides(load_recipe(last / RECIPE_NAME), overrides or {})
        seed_everything(recipe.seed)
        model = load_folder(last, model_code)
        data = _run_data(data_spec, _data_config_for(model), model.flexsurgeon_plan.in_chans, recipe)
        return finetune(model, data, recipe, output, resume=True, progress=progress, log=log)

    if (output / LAST).exists():
        raise CheckpointError(f"{output} already holds a run; pass --resume to continue it or choose another -o")
    seed_everything(recipe.seed)
    if Path(source).is_dir():
        read_config(source)  # a clear error for a folder that is not a checkpoint
        model = load_folder(source, model_code)
        data = _run_data(data_spec, _data_config_for(model), model.flexsurgeon_plan.in_chans, recipe)
    else:
        data = _run_data(data_spec, _data_config_for_name(source, recipe.img_size, in_chans), in_chans, recipe)
        seed_everything(recipe.seed)
        model = convert(source, weights=weights, num_classes=data.num_classes, img_size=recipe.img_size,
                        in_chans=in_chans, pool=recipe.pool, dropout=recipe.dropout, sac_stages=sac_stages,
                        sac_weights=recipe.sac_weights, replace_gating=replace_gating, progress=progress)
    return finetune(model, data, recipe, output, progress=progress, log=log)
