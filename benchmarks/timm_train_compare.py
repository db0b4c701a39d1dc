"""`flexsurgeon finetune` against timm's own `train.py` on the same image folder, interleaved.

    git clone <mirror of github.com/huggingface/pytorch-image-models> /tmp/pytorch-image-models
    .venv/bin/python benchmarks/timm_train_compare.py --timm-dir /tmp/pytorch-image-models
    .venv/bin/python benchmarks/timm_train_compare.py --timm-dir /tmp/pytorch-image-models --quick

timm's `train.py` is run from that checkout with the checkout's own `timm` package first
on ``PYTHONPATH`` (the library its train.py was written against), by this project's Python
(the same torch). Nothing of it is copied into this repository.

Three runs take turns, ``--rounds`` times, the order rotated every round:

- ``timm``: ``train.py`` on the original model (global average pooling);
- ``fs-sac``: ``flexsurgeon finetune MODEL --random-init`` (FlexPool + the default SAC heads);
- ``fs-flexpool``: the same with ``--sac-stages none`` (FlexPool only). flexsurgeon cannot
  train an unconverted model, so this is its closest run to timm's.

Matched settings: the same image folder (written here once: the ``synthetic:`` set as PNGs,
``train/`` and ``val/`` class folders), model (random init), classes, input size, batch
size, epochs, workers, SGD (lr, momentum, weight decay), cosine schedule without warm-up,
label smoothing 0.1, timm's default train augmentation (random resized crop, flip 0.5,
colour jitter 0.4) with the model's bicubic interpolation, float32 on the CPU, no mixup,
no EMA, seed 0. Both validate after every epoch and write checkpoints; neither is timed.

Training images/s = images trained in epochs 2..E / seconds of those epochs' training
loops, from each tool's own timer: the time from the start of the epoch's loop (waiting for
the first batch included) to its last optimizer step. timm: the per-update ``Time:`` of
``--log-interval 1`` summed over the epoch (its timer restarts at each update, so the sum
covers the whole loop). flexsurgeon: ``seconds`` of each epoch in ``log.jsonl``. Epoch 1
(start-up, first allocations) is left out of both. The wall time of each whole process is
recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_folder(folder: Path, classes: int, train: int, val: int, size: int) -> None:
    """The synthetic set as PNG files in train/<class>/ and val/<class>/ (skipped when present)."""
    marker = folder / "done.json"
    spec = {"classes": classes, "train": train, "val": val, "size": size}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from flexsurgeon.data import load_data

    data = load_data(f"synthetic:classes={classes},train={train},val={val},size={size}",
                     data_config={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
                     train_transform_kwargs={"hflip": 0.0})
    for split, dataset in (("train", data.train), ("val", data.val)):
        for i in range(len(dataset)):
            image, label = dataset[i]
            out = folder / split / f"c{label:02d}" / f"{i:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(out)
    marker.write_text(json.dumps(spec))


def commands(args, data: Path, out: Path) -> dict[str, tuple[list[str], dict]]:
    py = sys.executable
    common_timm = [
        "--data-dir", str(data), "--model", args.model, "--num-classes", str(args.classes),
        "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
        "--workers", str(args.workers), "--device", "cpu", "--opt", "sgd", "--lr", str(args.lr),
        "--momentum", "0.9", "--weight-decay", "1e-4", "--sched", "cosine", "--warmup-epochs", "0",
        "--smoothing", "0.1", "--train-interpolation", "bicubic", "--seed", "0", "--log-interval", "1",
        "--checkpoint-hist", "1", "--output", str(out),
    ]
    timm_env = {"PYTHONPATH": str(args.timm_dir)}
    fs = [
        str(Path(py).parent / "flexsurgeon"), "finetune", args.model, "--random-init", "--data", str(data),
        "--recipe", "smoke", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--workers", str(args.workers), "--device", "cpu", "--img-size", str(args.img_size),
        "--set", "optimizer=sgd", "--set", "momentum=0.9", "--set", "weight_decay=0.0001", "--set", "sched=cosine",
        "--set", "warmup_epochs=0", "--set", "freeze_epochs=0", "--set", "label_smoothing=0.1",
        "--set", "hflip=0.5", "--set", "seed=0",
    ]
    return {
        "timm": ([py, str(Path(args.timm_dir) / "train.py"), *common_timm], timm_env),
        "fs-sac": (fs, {}),
        "fs-flexpool": ([*fs, "--sac-stages", "none"], {}),
    }


_TIMM_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+).*?Time: ([\d.]+)s")


def parse_timm(text: str, batch_size: int) -> dict[int, tuple[int, float]]:
    """epoch (1-based) -> (images, seconds of the training loop) from --log-interval 1 lines."""
    per_epoch: dict[int, list[float]] = {}
    for m in _TIMM_LINE.finditer(text):
        per_epoch.setdefault(int(m.group(1)) + 1, []).append(float(m.group(4)))
    return {e: (len(t) * batch_size, sum(t)) for e, t in per_epoch.items()}


def parse_fs(log: Path) -> dict[int, tuple[int, float]]:
    out = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        out[r["epoch"]] = (r["train"]["count"], r["seconds"])
    return out


def run_one(name: str, cmd: list[str], env: dict, work: Path, index: int, batch_size: int) -> dict:
    out = work / "runs" / f"{index:02d}-{name}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [c if c != "<OUT>" else str(out) for c in cmd]
    if name.startswith("fs"):
        cmd = [*cmd, "-o", str(out / "run")]
    else:
        cmd = [*cmd, "--experiment", "run"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=str(ROOT))
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    (out / "stdout.txt").write_text(proc.stdout)
    (out / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out}/stderr.txt\n{proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr
    epochs = parse_timm(log, batch_size) if name == "timm" else parse_fs(out / "run" / "log.jsonl")
    timed = {e: v for e, v in epochs.items() if e >= 2}
    images, seconds = sum(v[0] for v in timed.values()), sum(v[1] for v in timed.values())
    return {"name": name, "epochs": epochs, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "wall_s": wall, "load_before": load_before, "load_after": load_after, "cmd": cmd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-dir", type=Path, default=Path("/tmp/pytorch-image-models"),
                        help="a checkout of huggingface/pytorch-image-models")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fs-timm-compare"),
                        help="image folder and run outputs go here")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=224)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--stored-size", type=int, default=144, help="side of the PNGs written")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="timm,fs-sac,fs-flexpool", help="which runs, comma-separated")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = 1, 2
    if not (args.timm_dir / "train.py").is_file():
        raise SystemExit(f"no train.py in {args.timm_dir}: clone huggingface/pytorch-image-models there")
    commit = subprocess.run(["git", "-C", str(args.timm_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    data = args.work / "data"
    write_folder(data, args.classes, args.train_images, args.val_images, args.stored_size)
    cmds = {k: v for k, v in commands(args, data, Path("<OUT>")).items() if k in args.only.split(",")}
    names = list(cmds)
    print(f"timm checkout {args.timm_dir} at {commit}; {args.model} {args.img_size}x{args.img_size}, batch "
          f"{args.batch_size}, {args.epochs} epochs, {args.workers} workers, {args.train_images} train / "
          f"{args.val_images} val images in {data}", flush=True)
    for name, (cmd, env) in cmds.items():
        print(f"  {name}: " + " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + " ".join(cmd))
    results: list[dict] = []
    index = 0
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            cmd, env = cmds[name]
            res = run_one(name, cmd, env, args.work, index, args.batch_size)
            res["round"] = r + 1
            index += 1
            results.append(res)
            print(f"  round {r + 1} {name}: {res['images_per_s']:.2f} train images/s ({res['images']} images in "
                  f"{res['seconds']:.1f} s, epochs 2..{args.epochs}); process wall {res['wall_s']:.0f} s; load "
                  f"{res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f}", flush=True)
    (args.work / "results.json").write_text(json.dumps({"commit": commit, "args": {k: str(v) for k, v in
                                                        vars(args).items()}, "runs": results}, indent=2))
    print()
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; timm commit {commit}")
    print("| run | training images/s (median over rounds) | per round | process wall s (median) |")
    print("|---|---|---|---|")
    med = {}
    for name in names:
        runs = [x for x in results if x["name"] == name]
        med[name] = statistics.median(x["images_per_s"] for x in runs)
        rounds = ", ".join(f"{x['images_per_s']:.2f}" for x in runs)
        print(f"| {name} | {med[name]:.2f} | {rounds} | "
              f"{statistics.median(x['wall_s'] for x in runs):.0f} |")
    if "timm" in med:
        print()
        for name in names:
            if name != "timm":
                ours = [x for x in results if x["name"] == name]
                theirs = [x for x in results if x["name"] == "timm"]
                per_round = [a["images_per_s"] / b["images_per_s"] for a, b in zip(ours, theirs)]
                print(f"{name} / timm: {med[name] / med['timm']:.3f} (medians); per round "
                      + ", ".join(f"{q:.3f}" for q in per_round))


if __name__ == "__main__":
    main()
