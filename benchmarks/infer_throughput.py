"""Inference throughput of a converted model (FlexPool) against the original, on CPU or GPU.

    .venv/bin/python benchmarks/infer_throughput.py --device cuda        # on a GPU machine
    .venv/bin/python benchmarks/infer_throughput.py --quick --batch 8    # a CPU dry run
    .venv/bin/python benchmarks/infer_throughput.py --batch 8 --no-compile   # CPU inference, no compiled code

The deployment a user would run: eval mode, ``torch.no_grad()``, the same random-init
weights in both models (timm ``resnet50``, 10 classes; the converted one is
``flexsurgeon.convert(copy.deepcopy(original), sac_stages=[])`` (convert changes the model it
is given), so FlexPool replaces the global average
pool and nothing else changes). On CUDA: bfloat16 autocast and channels_last; each
configuration also runs under ``torch.compile`` with inductor's ``freezing`` (FlexPool's
softmax weights become a constant, as the README recommends for inference).

The two models take turns, one timed block each per round, the order swapped every round;
a block is ``--iters`` forward passes, synchronised before and after on a GPU. Reported:
images/s of each (median over rounds) and the median of the per-round ratios
converted/original with its interquartile range. Ratio 1.0 means FlexPool costs nothing.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import flexsurgeon  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _block_seconds(model, x, iters: int, device: str, bf16: bool) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(iters):
            model(x)
    _sync(device)
    return time.perf_counter() - start


def measure(models: dict, x, args, bf16: bool) -> dict:
    names = list(models)
    for name in names:  # warm-up: autotuning, compilation, caches
        _block_seconds(models[name], x, max(2, args.iters // 2), args.device, bf16)
    seconds = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            seconds[name].append(_block_seconds(models[name], x, args.iters, args.device, bf16))
    images = x.shape[0] * args.iters
    ratios = [c / o for o, c in zip(seconds["original"], seconds["converted"])]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"original": images / statistics.median(seconds["original"]),
            "converted": images / statistics.median(seconds["converted"]), "ratio": median, "iqr": (q1, q3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="images per forward [default: 256]")
    parser.add_argument("--iters", type=int, help="forwards per timed block [default: 10; 2 with --quick]")
    parser.add_argument("--rounds", type=int, help="timed rounds [default: 15; 3 with --quick]")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.iters = args.iters or (2 if args.quick else 10)
    args.rounds = args.rounds or (3 if args.quick else 15)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm

    torch.manual_seed(0)
    original = timm.create_model(args.model, num_classes=10, pretrained=False).eval()
    converted = flexsurgeon.convert(copy.deepcopy(original), img_size=args.img_size, sac_stages=[]).eval()
    cuda = args.device == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    models = {"original": original, "converted": converted}
    for model in models.values():
        model.to(args.device, memory_format=memory_format)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    x = x.contiguous(memory_format=memory_format)
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"{args.model} at {args.img_size}, batch {args.batch}, {args.device} ({gpu}), torch {torch.__version__}; "
          f"{args.rounds} rounds of {args.iters} forwards, {torch.get_num_threads()} torch threads")
    print("| configuration | original img/s | converted img/s | converted/original (IQR) |")
    print("|---|---|---|---|")
    configs = [("eager", models, cuda)]
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        configs.append(("compiled (freezing)", {n: torch.compile(m) for n, m in models.items()}, cuda))
    for label, variant, bf16 in configs:
        label = f"{label}, {'bf16, channels_last' if bf16 else 'float32'}"
        result = measure(variant, x, args, bf16)
        print(f"| {label} | {result['original']:.0f} | {result['converted']:.0f} | "
              f"{result['ratio']:.3f} ({result['iqr'][0]:.3f}-{result['iqr'][1]:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
