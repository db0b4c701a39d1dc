"""Training-step time of a converted model (FlexPool + SAC) against the original, and loader speed.

    .venv/bin/python benchmarks/train_speed.py            # resnet50, 224, batch 16
    .venv/bin/python benchmarks/train_speed.py --quick    # a short run, noisier
    .venv/bin/python benchmarks/train_speed.py --model resnet18 --sections steps --rounds 30   # SAC cost, CPU
    python benchmarks/train_speed.py --device cuda --batch-size 128 --sections steps \
        --variants original,flexpool+sac --compile --target 1.03      # the same, compiled, on a GPU

One process, one machine, the same batch for every model. Three models with the same
weights: ``original`` (timm ``resnet50``, random init, 10 classes, global average pooling),
``flexpool`` (``flexsurgeon.convert(..., sac_stages=[])``: FlexPool only, ``model(x)``) and
``flexpool+sac`` (``flexsurgeon.convert(...)`` with the default SAC heads,
``flexsurgeon.forward_with_sac(model, x)`` and the weighted cross-entropy over heads + main, as
``flexsurgeon.training.loop.finetune`` computes it). A training step is forward, loss,
``zero_grad(set_to_none=True)``, backward and an SGD step (timm's ``create_optimizer_v2``,
momentum 0.9, weight decay 1e-4, label smoothing 0.1), train mode. On the CPU (default):
float32, NCHW. With ``--device cuda``: what ``finetune`` does there, bfloat16 autocast,
channels_last and TF32, with the GPU synchronised around every timed step. ``--compile``
compiles each model's forward and loss with ``torch.compile`` (the backward runs compiled
too; the optimizer step stays eager); ``--variants`` picks the models compared.

After warm-up steps the three models take turns, one step each per round, the order
rotated every round. Each model's time is the median over rounds; each ratio is the
median over rounds of the two steps taken moments apart in that round (less disturbed by
other load on the machine than a ratio of medians), with the interquartile range of
those per-round ratios as its spread.

The loader part times ``make_loader(load_data("synthetic:...").train, ...)`` iterated on
its own (no model), for each ``--workers`` count, as images/s from the iterator's
creation (worker start-up included) and in steady state (first batch excluded), to set
beside the training images/s.
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
import flexsurgeon  # noqa: E402
from flexsurgeon.data import load_data
from flexsurgeon.data.loaders import make_loader
from flexsurgeon.surgery.apply import pool_paths

VARIANTS = ("original", "flexpool", "flexpool+sac")


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _build(name: str, num_classes: int, img_size: int):
    import timm

    torch.manual_seed(0)
    original = timm.create_model(name, num_classes=num_classes, pretrained=False)
    flex_only = flexsurgeon.convert(copy.deepcopy(original), num_classes=num_classes, img_size=img_size,
                                    sac_stages=[])
    with_sac = flexsurgeon.convert(copy.deepcopy(original), num_classes=num_classes, img_size=img_size)
    return {"original": original, "flexpool": flex_only, "flexpool+sac": with_sac}


def _step_fn(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, compile: bool = False):
    from timm.optim import create_optimizer_v2

    cuda = x.device.type == "cuda"
    model.train()
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    plan = getattr(model, "flexsurgeon_plan", None)
    weights = list(plan.sac_weights) if plan is not None else [1.0]

    def forward_loss():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if kind == "flexpool+sac":
                out, sac = flexsurgeon.forward_with_sac(model, x)
                outputs = [*sac, out]
                loss = sum(w * criterion(o.float(), y) for w, o in zip(weights, outputs))
            else:
                loss = criterion(model(x).float(), y)
        return loss

    if compile:  # forward and loss compiled, backward through the compiled graph, optimizer eager
        forward_loss = torch.compile(forward_loss)

    def step():
        loss = forward_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return loss

    return step


def time_training(args) -> dict:
    models = {k: m for k, m in _build(args.model, args.num_classes, args.img_size).items() if k in args.variants}
    data = load_data(f"synthetic:classes={args.num_classes},train={args.batch_size},val=1",
                     data_config={"input_size": (3, args.img_size, args.img_size),
                                  "mean": models["original"].pretrained_cfg["mean"],
                                  "std": models["original"].pretrained_cfg["std"]})
    x, y = next(iter(make_loader(data.train, batch_size=args.batch_size, train=True, seed=0)))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        x = x.contiguous(memory_format=torch.channels_last)
        for m in models.values():
            m.to(device, memory_format=torch.channels_last)
    x, y = x.to(device), y.to(device)
    steps = {kind: _step_fn(kind, m, x, y, args.compile) for kind, m in models.items()}
    kinds = list(steps)
    for _ in range(args.warmup):
        for kind in kinds:
            steps[kind]()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for kind in order:
            t = time.perf_counter()
            steps[kind]()
            times[kind].append(time.perf_counter() - t)
        print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {times[k][-1]:.3f}s" for k in kinds),
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    result = {"times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}}
    for a, b in (("flexpool", "original"), ("flexpool+sac", "original"), ("flexpool+sac", "flexpool")):
        if a in times and b in times:
            result[f"ratio {a}/{b}"] = _quantiles([p / q for p, q in zip(times[a], times[b])])
    return result


def time_added_work(args, model: nn.Module, blocks: int = 15) -> dict:
    """Forward + backward of what conversion adds, alone, against the pool it replaces.

    On tensors of the feature-map shapes of one batch: ``x.mean((2, 3))`` (the replaced
    pool) against the model's own FlexPool, and each of its SAC heads with its weighted
    cross-entropy, gradients flowing to the input as in the network. The extra seconds
    per step, set beside the original model's step, say what conversion can cost at most,
    independent of the step-to-step noise of a busy machine. Two training steps of the
    whole model run first: glibc's malloc adapts its mmap threshold to the large
    activations of a training step, and without that the big tensors here are freshly
    mapped (page faults) on every call, which makes them several times slower than in
    training.
    """
    plan = model.flexsurgeon_plan
    b = args.batch_size
    warm = _step_fn("flexpool+sac", model, torch.randn(b, 3, args.img_size, args.img_size),
                    torch.randint(0, args.num_classes, (b,)))
    warm()
    warm()
    y = torch.randint(0, args.num_classes, (b,))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    fns = {}
    for edit, path in zip(plan.pools, pool_paths(plan)):
        x = torch.randn(b, edit.channels, *edit.size, requires_grad=True)
        pool = model.get_submodule(path)
        fns[f"mean {tuple(x.shape)}"] = lambda x=x: x.mean((2, 3)).sum().backward()
        fns[f"FlexPool {tuple(x.shape)}"] = lambda x=x, pool=pool: pool(x).sum().backward()
    for tap, w in zip(plan.sac, plan.sac_weights):
        x = torch.randn(b, tap.channels, *tap.size, requires_grad=True)
        head = model.sac_heads[tap.node]
        fns[f"SAC head + CE {tuple(x.shape)}"] = lambda x=x, head=head, w=w: (w * criterion(head(x), y)).backward()
    for fn in fns.values():
        for _ in range(3):
            fn()
    reps = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        reps[name] = max(3, int(0.05 / max(time.perf_counter() - t, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t) / reps[name])
    return {k: statistics.median(v) for k, v in times.items()}


def time_loader(args, workers: int) -> dict:
    import timm

    config = timm.data.resolve_data_config(model=timm.create_model(args.model, num_classes=args.num_classes,
                                                                   pretrained=False))
    config["input_size"] = (3, args.img_size, args.img_size)
    data = load_data(f"synthetic:classes={args.num_classes},train={args.loader_images},val=1", data_config=config)
    loader = make_loader(data.train, batch_size=args.batch_size, train=True, seed=0, num_workers=workers)
    start = time.perf_counter()
    first, seen = None, 0
    for x, _ in loader:
        seen += x.shape[0]
        if first is None:
            first, after_first = time.perf_counter() - start, seen
    total = time.perf_counter() - start
    return {"workers": workers, "images": seen, "seconds": total, "first_batch_s": first,
            "images_per_s": seen / total, "steady_images_per_s": (seen - after_first) / max(total - first, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, help="timed rounds [default: 12; 5 with --quick]")
    parser.add_argument("--warmup", type=int, help="untimed steps per model first [default: 2; 1 with --quick]")
    parser.add_argument("--workers", default="0,2", help="loader worker counts to time")
    parser.add_argument("--loader-images", type=int, help="images per loader timing [default: 512; 256 with --quick]")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and loader images")
    parser.add_argument("--sections", default="steps,added,loader",
                        help="what to time: steps (the interleaved training steps), added (the added work "
                             "alone), loader")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"models in the training-step comparison [default: {','.join(VARIANTS)}]")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model's forward and loss (the backward runs compiled too)")
    parser.add_argument("--target", type=float, help="print whether flexpool+sac / original is within this")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's); 1 keeps the "
                        "ratios steady while another process shares the CPU")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the training steps run (cuda: bf16 autocast, channels_last, TF32)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for key, full, quick in (("rounds", 12, 5), ("warmup", 2, 1), ("loader_images", 512, 256)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "original" not in args.variants or any(v not in VARIANTS for v in args.variants):
        parser.error(f"--variants: 'original' and any of {', '.join(VARIANTS[1:])}, got {args.variants}")

    load_start = os.getloadavg()
    print(f"{args.model} {args.img_size}x{args.img_size}, batch {args.batch_size}, {args.num_classes} classes, "
          + (f"bf16 autocast on {torch.cuda.get_device_name()}" if args.device == "cuda" else
             f"float32 CPU, {torch.get_num_threads()} torch threads")
          + f"; {args.rounds} rounds after {args.warmup} warm-up" + (", compiled" if args.compile else ""))
    sections = set(args.sections.split(","))
    train = time_training(args) if "steps" in sections else None
    added = time_added_work(args, flexsurgeon.convert(args.model, num_classes=args.num_classes,
                                                      img_size=args.img_size)) if "added" in sections else None
    loaders = [time_loader(args, w) for w in workers] if "loader" in sections else []
    load_end = os.getloadavg()

    print()
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {os.cpu_count()}-core "
          f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
          f"Load average (1, 5, 15 min): {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start, "
          f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end.")
    if train:
        med = train["median_s"]
        print()
        print("| model | step (s, median) | training images/s |")
        print("|---|---|---|")
        for kind, seconds in med.items():
            print(f"| {kind} | {seconds:.3f} | {args.batch_size / seconds:.1f} |")
        print()
        print("| ratio (per-round median) | median | IQR |")
        print("|---|---|---|")
        for key in [k for k in train if k.startswith("ratio ")]:
            q1, q2, q3 = train[key]
            print(f"| {key[6:]} | {q2:.3f} | {q1:.3f}-{q3:.3f} |")
        sac = train.get("ratio flexpool+sac/original")
        if sac and args.target:
            print(f"\nflexpool+sac / original = {sac[1]:.3f} ({'compiled' if args.compile else 'eager'}; "
                  f"target <= {args.target}: {'met' if sac[1] <= args.target else 'MISSED'})")
    if added:
        print()
        print("| forward + backward alone | ms |")
        print("|---|---|")
        for name, seconds in added.items():
            print(f"| {name} | {seconds * 1e3:.2f} |")
        extra = sum(v for k, v in added.items() if not k.startswith("mean")) - sum(
            v for k, v in added.items() if k.startswith("mean"))
        print(f"Added work per step: {extra * 1e3:.1f} ms"
              + (f" = {100 * extra / med['original']:.2f}% of the original model's median step "
                 f"({med['original']:.3f} s)." if train else "."))
    if loaders:
        print()
        print("| loader workers | images | images/s (incl. start-up) | images/s (steady, after the first batch) "
              "| first batch (s) |")
        print("|---|---|---|---|---|")
        for r in loaders:
            print(f"| {r['workers']} | {r['images']} | {r['images_per_s']:.0f} | {r['steady_images_per_s']:.0f} "
                  f"| {r['first_batch_s']:.2f} |")
        if train:
            slowest = args.batch_size / max(med.values())
            print(f"Training (slowest model): {slowest:.1f} images/s; the loader alone is "
                  + ", ".join(f"{r['images_per_s'] / slowest:.0f}x that at {r['workers']} workers" for r in loaders)
                  + " (start-up included).")
    _dump(args, train, added, loaders, load_start, load_end)


def _dump(args, train, added, loaders, load_start, load_end) -> None:
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "train": train,
                                         "added_s": added, "loader": loaders, "load_start": load_start,
                                         "load_end": load_end}, indent=2))


if __name__ == "__main__":
    main()
