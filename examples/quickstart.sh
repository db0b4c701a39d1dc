#!/usr/bin/env bash
# The README's main job, end to end on a CPU with no network (a few minutes):
# convert a timm model, fine-tune it on a generated data set, load the best checkpoint
# through timm and print its accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
FS=.venv/bin/flexsurgeon
DATA="synthetic:classes=4,train=512,val=128"

$FS convert resnet18 --random-init --img-size 64 --num-classes 4 -o out/resnet18-flex --force
rm -rf runs/quickstart
$FS finetune out/resnet18-flex --data "$DATA" --recipe smoke --epochs 6 -o runs/quickstart
.venv/bin/python - "$DATA" <<'PY'
import sys

import timm

import flexsurgeon  # registers the 'flexsurgeon' architecture with timm
from flexsurgeon.data import load_data, make_loader
from flexsurgeon.train import evaluate

model = timm.create_model("local-dir:runs/quickstart/best", pretrained=True)
data = load_data(sys.argv[1], data_config=timm.data.resolve_data_config(model=model))
metrics = evaluate(model, make_loader(data.val, batch_size=64, train=False, seed=0), "cpu")
print(f"timm.create_model('local-dir:runs/quickstart/best'): {type(model).__name__}, "
      f"val top-1 {metrics['top1']['main']:.1f}% on {metrics['count']} images "
      f"({data.num_classes} classes, chance {100 / data.num_classes:.0f}%)")
PY
