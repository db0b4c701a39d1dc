"""The FlexPool op alone against average pooling on the same tensor: a diagnostic, no target.

    .venv/bin/python benchmarks/flexpool_op.py               # eager and compiled (a few minutes on 2 cores)
    .venv/bin/python benchmarks/flexpool_op.py --no-compile  # eager only, about a minute
    .venv/bin/python benchmarks/flexpool_op.py --quick       # fewer, shorter rounds (noisier)

For each shape and memory layout (NCHW, channels_last) it times ``x.mean((2, 3))`` and
``FlexPool`` (weights perturbed away from the uniform init), in one process, taking turns
within every round (the order flips each round): inference (eval mode, ``no_grad``) and
forward + backward in train mode (gradients for the input, and for FlexPool also its
weight), each eager and under ``torch.compile(fullgraph=True)`` (both sides compiled).
Each figure is the median over rounds of a block of calls; each ratio flexpool / mean is
the median of the per-round ratios. Float32, CPU (``--device cuda`` on a GPU).

What counts for a user is the whole model (``train_speed.py``, ``infer_throughput.py``):
the op is a tiny part of a network, so this table explains those ratios and sets no target.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from flexsurgeon.layers.pools import FlexPool

# ResNet-50's head at batch 1, 8 and 128; resnet18's and resnet50's SAC taps at batch 16; a small net.
SHAPES = [(1, 2048, 7, 7), (8, 2048, 7, 7), (128, 2048, 7, 7), (16, 128, 28, 28), (16, 512, 28, 28),
          (16, 1024, 14, 14), (64, 64, 8, 8)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, block_s: float,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each fn, one entry per round; the fns take turns within every
    round, in alternating order."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        calls[name] = max(3, int(block_s / max(time.perf_counter() - t, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        for name, fn in list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]:
            n = calls[name]
            _sync(device)
            t = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t) / n)
    return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(p / q for p, q in zip(times[a], times[b], strict=True))


def _case(shape: tuple[int, int, int, int], channels_last: bool, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(shape, device=args.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pool = FlexPool(shape[1], shape[2:]).to(args.device)
    with torch.no_grad():
        pool.weight.normal_(0.0, 0.5)  # a trained-looking, non-uniform weight
    xg = x.detach().requires_grad_(True)
    g = torch.randn(shape[:2], device=args.device)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t.mean((2, 3))

    def flex(t: torch.Tensor) -> torch.Tensor:
        return pool(t)

    variants = {"": (mean, flex)}
    if args.compile:
        variants["compiled "] = (torch.compile(mean, fullgraph=True, dynamic=False),
                                 torch.compile(flex, fullgraph=True, dynamic=False))
    infer: dict[str, Callable[[], object]] = {}
    train: dict[str, Callable[[], object]] = {}
    for prefix, (m, f) in variants.items():
        infer[prefix + "mean"] = lambda m=m: m(x)
        infer[prefix + "flex"] = lambda f=f: f(x)
        train[prefix + "mean"] = lambda m=m: torch.autograd.grad(m(xg), (xg,), g)
        train[prefix + "flex"] = lambda f=f: torch.autograd.grad(f(xg), (xg, pool.weight), g)
    block = args.block_ms / 1e3
    pool.eval()
    with torch.no_grad():
        infer_t = time_interleaved(infer, args.rounds, block, args.device)
    pool.train()
    train_t = time_interleaved(train, args.rounds, block, args.device)
    out = {}
    for prefix in variants:
        for kind, times in (("infer", infer_t), ("train", train_t)):
            key = f"{prefix}{kind}"
            out[key + " mean"] = statistics.median(times[prefix + "mean"])
            out[key + " flex"] = statistics.median(times[prefix + "flex"])
            out[key + " ratio"] = _ratio(times, prefix + "flex", prefix + "mean")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (noisier)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile columns")
    parser.add_argument("--rounds", type=int, help="timing rounds per case [default: 15; 5 with --quick]")
    parser.add_argument("--block-ms", type=float, help="ms per timed block [default: 20; 5 with --quick]")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (5 if args.quick else 15)
    args.block_ms = args.block_ms or (5.0 if args.quick else 20.0)
    if args.compile:  # one graph per shape, layout and mode for the same two functions
        dyn = torch._dynamo.config
        setattr(dyn, "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit", 128)
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"threads, {args.device}, float32, {args.rounds} rounds of {args.block_ms:g} ms blocks, load average at "
          f"start {os.getloadavg()[0]:.2f}\n")
    kinds = [("infer", "inference"), ("train", "train fwd+bwd")]
    prefixes = ["", "compiled "] if args.compile else [""]
    head, sep = "| shape | layout |", "|---|---|"
    for prefix in prefixes:
        for _, label in kinds:
            head += f" {prefix}{label}: mean (us) | FlexPool (us) | ratio |"
            sep += "---|---|---|"
    print(head)
    print(sep, flush=True)
    for shape in SHAPES:
        for channels_last in (False, True):
            r = _case(shape, channels_last, args)
            row = f"| {shape} | {'channels_last' if channels_last else 'NCHW'} |"
            for prefix in prefixes:
                for key, _ in kinds:
                    k = prefix + key
                    row += f" {r[k + ' mean'] * 1e6:.1f} | {r[k + ' flex'] * 1e6:.1f} | {r[k + ' ratio']:.2f} |"
            print(row, flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
