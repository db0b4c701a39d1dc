"""What every part of the zoo walk shares: the outcomes, the per-model time limit, one-line texts."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import torch

NUM_CLASSES = 5
SMALL_TOKEN_SIZE = (64, 64)  # a ViT's 4x4 patch grid: tried before the native size of a model built for its size
HERE = Path(__file__).resolve().parent
OUTCOMES = ("preserved", "refused", "timm-untraceable", "wrong", "skipped", "not-walked")
CLI_RESULTS = ("preserved", "refused", "failed", "skipped")
METHODS = ("in place", "head rewrite", "graph rewrite")  # how a preserved model was converted
# Refusals that a larger input may cure; anything else is final at the first size.
SIZE_PROBLEMS = ("no global average pool", "fails on a", "is not an average", "not a spatial")


class Timeout(BaseException):
    """Not an Exception: flexsurgeon's own ``except Exception`` (analysis retries a size it
    cannot run) would swallow it, and the one-shot alarm would never fire again."""


@contextlib.contextmanager
def time_limit(seconds: int):
    def fire(signum, frame):
        raise Timeout(f"timed out after {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def eval_output(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)
