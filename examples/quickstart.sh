#!/usr/bin/env bash
# The README's main job, end to end on a CPU with no network: convert a timm model from
# random weights, fine-tune it on a generated data set whose low pixel noise makes it
# learnable in a few epochs, load the best checkpoint through timm and print its accuracy.
# PYTHON and WORK (where out/ and runs/ go) can be set; tests/test_quickstart.py runs it
# that way and checks the accuracy the README states.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-.}
DATA="synthetic:classes=4,train=512,val=128,noise=0.05"

$PY -m flexsurgeon convert resnet10t --random-init --img-size 64 --num-classes 4 -o "$WORK/out/resnet10t-flex" --force
rm -rf "$WORK/runs/quickstart"
$PY -m flexsurgeon finetune "$WORK/out/resnet10t-flex" --data "$DATA" --recipe smoke --epochs 5 -o "$WORK/runs/quickstart"
$PY - "$DATA" "$WORK/runs/quickstart/best" <<'PY'
import sys

import timm

import flexsurgeon  # registers the 'flexsurgeon' architecture with timm
from flexsurgeon.data import load_data, make_loader
from flexsurgeon.training.metrics import evaluate

data_spec, best = sys.argv[1:]
model = timm.create_model(f"local-dir:{best}", pretrained=True)
data = load_data(data_spec, data_config=timm.data.resolve_data_config(model=model))
metrics = evaluate(model, make_loader(data.val, batch_size=64, train=False, seed=0), "cpu")
print(f"timm.create_model('local-dir:{best}'): {type(model).__name__}, "
      f"val top-1 {metrics['top1']['main']:.1f}% on {metrics['count']} images "
      f"({data.num_classes} classes, chance {100 / data.num_classes:.0f}%)")
PY
