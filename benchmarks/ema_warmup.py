"""Does the `quick` recipe's EMA need timm's warm-up on a small data set? (It has it: ``ema_warmup``.)

    .venv/bin/python benchmarks/ema_warmup.py [--subset 2000] [--seeds 2] [--json FILE]

A fine-tune of a trained backbone with a new classifier, on a small data set, as a user runs
the default `quick` recipe (10 epochs, AdamW, the new layers alone for the first epoch, EMA
decay 0.999), on the CPU:

1. "pretrained" backbone: the paper's ResNet-20 (``benchmarks/paper_resnet20.py``), converted
   and trained for ``--pretrain-epochs`` on a seeded ``--pretrain-subset`` of Fashion-MNIST;
   then its classifier and SAC heads are drawn afresh, as for a new task;
2. fine-tune on a seeded ``--subset`` of the training images with `quick` three ways, seed for
   seed on the same batches: no EMA (the trained weights themselves), the EMA at decay 0.999
   without a warm-up, and with timm's warm-up (``ema_warmup``, as `quick` has it); each scored
   on test images (``t10k``) after every epoch, the EMA's weights where there is one.

The test images are the first ``--test-images`` of ``t10k`` (a copy of the data set with its
``t10k`` files cut to those is written into the work folder): every epoch is scored, and
scoring all 10,000 takes most of a run's time on a CPU.

With 2,000 images at batch 128 the fine-tune is 160 steps, and 0.999^160 = 0.85: without a
warm-up the final EMA is still mostly the starting weights, new classifier included.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from paper_resnet20 import resnet20  # noqa: E402

import flexsurgeon  # noqa: E402
from flexsurgeon.training.recipe import load_recipe  # noqa: E402
from flexsurgeon.training.run import run  # noqa: E402

HERE = Path(__file__).resolve().parent
CODE = f"{HERE / 'paper_resnet20.py'}:resnet20"  # the network is our own code: each load names it
WAYS = {"no EMA": ("no-ema", {"ema": False, "ema_warmup": False}),
        "EMA 0.999, no warm-up": ("ema", {"ema": True, "ema_warmup": False}),
        "EMA 0.999 + warm-up (quick)": ("ema-warmup", {"ema": True, "ema_warmup": True})}


def cut_test_split(data: Path, out: Path, count: int) -> Path:
    """A copy of an IDX data set (its ``train`` files linked) whose ``t10k`` files hold the
    first ``count`` test images and labels."""
    out.mkdir(parents=True)
    for kind, header in (("images-idx3-ubyte", 16), ("labels-idx1-ubyte", 8)):
        (out / f"train-{kind}.gz").symlink_to((data / f"train-{kind}.gz").resolve())
        raw = gzip.decompress((data / f"t10k-{kind}.gz").read_bytes())
        item = (len(raw) - header) // struct.unpack(">I", raw[4:8])[0]  # bytes per image or label
        head = raw[:4] + struct.pack(">I", count) + raw[8:header]
        (out / f"t10k-{kind}.gz").write_bytes(gzip.compress(head + raw[header:header + count * item]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--pretrain-subset", type=int, default=20000)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    started = time.time()
    args.work = args.work or Path(tempfile.mkdtemp(prefix="ema_warmup_"))

    args.data = str(cut_test_split(Path(args.data), args.work / "data", args.test_images))

    # 1. the backbone: trained on one subset, then a new classifier and new SAC heads
    torch.manual_seed(0)
    source = args.work / "source"
    model = flexsurgeon.convert(resnet20(in_chans=1, num_classes=10), in_chans=1, num_classes=10, img_size=28)
    flexsurgeon.save(model, source)
    base = load_recipe("smoke").replace(epochs=args.pretrain_epochs, batch_size=128, freeze_epochs=0,
                                        train_subset=args.pretrain_subset, seed=100)
    pretrained = run(str(source), args.data, base, args.work / "pretrain", model_code=CODE, progress=False,
                     log=lambda line: None)
    print(f"backbone: {args.pretrain_epochs} epochs on {args.pretrain_subset} images, "
          f"test top-1 {pretrained.best_top1:.2f}")
    model = flexsurgeon.load(args.work / "pretrain" / "last", model=resnet20(in_chans=1, num_classes=10))
    torch.manual_seed(1)
    for head in [model.fc, *(h.fc for h in model.sac_heads.values())]:
        head.reset_parameters()
    flexsurgeon.save(model, args.work / "backbone")

    # 2. the fine-tunes, seed for seed
    quick = load_recipe("quick").replace(device="cpu", workers=0, train_subset=args.subset)
    results = []
    for seed in range(args.seeds):
        for way, (name, fields) in WAYS.items():
            out = args.work / f"seed{seed}" / name
            recipe = quick.replace(seed=seed, **fields)
            run(str(args.work / "backbone"), args.data, recipe, out, model_code=CODE, progress=False,
                log=lambda line: None)
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            top1 = [r["val"]["top1"]["main"] for r in log]
            results.append({"way": way, "seed": seed, "top1_by_epoch": top1})
            print(f"seed {seed}, {way}: top-1 after each epoch {' / '.join(f'{t:.2f}' for t in top1)}")

    print(f"\n| fine-tune on {args.subset} images, `quick` | " + " | ".join(f"seed {s}" for s in range(args.seeds))
          + " |\n|---|" + "---|" * args.seeds)
    for way in WAYS:
        finals = [r["top1_by_epoch"][-1] for r in results if r["way"] == way]
        print(f"| {way} | " + " | ".join(f"{t:.2f}" for t in finals) + " |")
    minutes = (time.time() - started) / 60
    print(f"\nruns in {args.work}; {minutes:.1f} min on {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps({"subset": args.subset, "test_images": args.test_images,
                                         "pretrain_subset": args.pretrain_subset,
                                         "pretrain_epochs": args.pretrain_epochs, "backbone_top1": pretrained.best_top1,
                                         "results": results, "minutes": round(minutes, 1)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
