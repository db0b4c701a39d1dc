"""Where and how fine-tuning and evaluation run: the device, what it does differently on a
GPU, the torch.distributed process group (``torchrun``) and the seeds."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import TrainingError
from .recipe import Recipe


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


def enable_tf32() -> None:
    """TF32 matmuls and convolutions and cudnn autotuning: process-wide switches."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` (this process's GPU under torchrun) or any torch device name."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


@dataclass
class Distributed:
    """This process's place in a torchrun job; one process alone is rank 0 of 1."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun's environment describes (nccl on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
