"""Feeding batches to a model: a loader's batches on the device, and the resource failures
of training or evaluating (a killed loader worker, out of memory) as one-line TrainingErrors
that say what to try."""
from __future__ import annotations

import torch

from ..errors import TrainingError
from ..utils import first_line


def device_batches(loader, device: torch.device, channels_last: bool, doing: str):
    """``loader``'s ``(x, y)`` batches on ``device`` (``x`` in NHWC with ``channels_last``); a
    worker process that died (the OS's out-of-memory killer, most often) becomes a
    TrainingError, not an unexplained RuntimeError. ``doing`` ("training") goes into it."""
    batches = iter(loader)
    while True:
        try:
            x, y = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise TrainingError(f"a data loader worker died while {doing} ({first_line(exc)}); this is usually the "
                                "system running out of memory: try fewer --workers or a smaller --batch-size") from exc
        yield _to_device(x, y, device, channels_last)


def _to_device(x, y, device: torch.device, channels_last: bool):
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=non_blocking)


def raise_if_out_of_memory(exc: RuntimeError, batch_size: int, doing: str) -> None:
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
