"""Can a CPU setting make the paper ResNet-20's training step faster without changing what is trained?

    .venv/bin/python benchmarks/cpu_step_options.py                 # eager settings
    .venv/bin/python benchmarks/cpu_step_options.py --compile       # and torch.compile (needs a C++ compiler)

The network of the 10-epoch ablation (``benchmarks/paper_resnet20.py:resnet20``, 1 channel,
10 classes), converted as its slowest variant trains it (``flex-linear+sac``: linear FlexPool
and the two SAC heads), one batch of 128 images at 28x28, a full training step (forward with
the SAC heads, the weighted cross-entropy, backward, SGD with momentum: ``train_speed.py``'s step). The settings
change how the same arithmetic is laid out, not what is trained:

- ``default``: what ``finetune`` does on a CPU (torch's thread count, NCHW, eager);
- ``1-thread``: ``torch.set_num_threads(1)``;
- ``channels_last``: model and batch in NHWC;
- ``compile`` (with ``--compile``): forward and loss through ``torch.compile``.

Each setting has its own copy of the same weights. After warm-up, the settings take turns,
one step each per round, the order rotated every round; a setting's time is the median over
rounds, its ratio the median of the per-round ratios to ``default`` (a ratio below 1 is faster).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from paper_resnet20 import resnet20  # noqa: E402
from train_speed import _step_fn as train_speed_step  # noqa: E402

import flexsurgeon  # noqa: E402


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, channels_last: bool, compile: bool):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return train_speed_step("flexpool+sac", model, x, y, compile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = flexsurgeon.convert(resnet20(in_chans=1, num_classes=10), in_chans=1, num_classes=10, img_size=28,
                               pool="linear")
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    threads = torch.get_num_threads()
    settings = {"default": (threads, False, False), "1-thread": (1, False, False),
                "channels_last": (threads, True, False)}
    if args.compile:
        settings["compile"] = (threads, False, True)
    steps = {name: make_step(copy.deepcopy(base), x, y, channels_last=cl, compile=c)
             for name, (_, cl, c) in settings.items()}
    names = list(steps)
    for name in names:
        torch.set_num_threads(settings[name][0])
        for _ in range(args.warmup):
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.set_num_threads(settings[name][0])
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
        print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {times[n][-1] * 1000:.0f} ms" for n in names),
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "batch_size": args.batch_size, "threads": threads, "rounds": args.rounds, "times_s": times}
    print(f"\nbatch {args.batch_size} at 28x28, {threads} threads by default, {args.rounds} rounds")
    print(f"{'setting':<14} {'step (median)':>14} {'images/s':>9} {'vs default':>11}")
    for name in names:
        med = statistics.median(times[name])
        ratio = statistics.median(t / d for t, d in zip(times[name], times["default"]))
        result[name] = {"median_s": med, "ratio_to_default": ratio}
        print(f"{name:<14} {med * 1000:>11.0f} ms {args.batch_size / med:>9.0f} {ratio:>11.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
