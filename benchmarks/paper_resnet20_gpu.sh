#!/usr/bin/env bash
# The paper's schedule for its ResNet-20 on Fashion-MNIST (100 epochs, batch 1000, one-cycle to lr 0.1),
# for as many variants as fit in one device call of at most 8 minutes on one GPU. Each variant in
# VARIANTS runs as its own `flexsurgeon ablate` process, all at once on the same GPU; a run that has
# not finished by TIME_LIMIT is stopped and its finished epochs are kept in its log.
#
# The device machine cannot download anything: carry the data with the working tree.
#     mkdir -p ablations/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz ablations/fashion-mnist/
#     run: OUT=$OUT DATA=ablations/fashion-mnist bash benchmarks/paper_resnet20_gpu.sh
#          (carry: ablations/fashion-mnist; timeout_s 480)
# Writes to $OUT: summary.md (the ablation table of the finished runs, `ablate`'s format),
# results.csv, VARIANT.log (each process's output) and runs/VARIANT/seedK/{log.jsonl,recipe.yaml}.
# Data loading is per image on the CPU (16 cores there): WORKERS per process times the number of
# VARIANTS should not exceed the cores; the default pairs the baseline with the paper's full method.
# A CPU dry run, small and fast:
#     DEVICE=cpu EPOCHS=1 SUBSET=512 WORKERS=0 TIME_LIMIT=300 bash benchmarks/paper_resnet20_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
DEVICE=${DEVICE:-cuda} EPOCHS=${EPOCHS:-100} SEEDS=${SEEDS:-1} WORKERS=${WORKERS:-7} TIME_LIMIT=${TIME_LIMIT:-420}
VARIANTS=${VARIANTS:-"avg flex-linear+dropout+sac"}
SUBSET=${SUBSET:-}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
RUNS=$(mktemp -d)
{ date -u; nvidia-smi -L 2>/dev/null; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } \
  | tee "$OUT/machine.txt"

for v in $VARIANTS; do
  timeout "$TIME_LIMIT" $PY -m flexsurgeon ablate benchmarks/paper_resnet20.py:resnet20 --random-init --in-chans 1 \
    --data "$DATA" --recipe benchmarks/paper_resnet20.yaml --epochs "$EPOCHS" --batch-size 1000 \
    --workers "$WORKERS" --device "$DEVICE" ${SUBSET:+--set train_subset=$SUBSET} \
    --variants "$v" --seeds "$SEEDS" -o "$RUNS/$v" >"$OUT/$v.log" 2>&1 &
done
wait

# one report over every variant's finished runs, in ablate's own format
mkdir -p "$RUNS/all/runs"
for v in $VARIANTS; do ln -s "$RUNS/$v/runs/$v" "$RUNS/all/runs/$v" 2>/dev/null; done
$PY - "$RUNS/all" "$OUT" "$SEEDS" $VARIANTS <<'PY'
import shutil, sys
from pathlib import Path
from flexsurgeon.commands.ablate import write_report
runs, out, seeds, variants = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
variants = [v for v in variants if (runs / "runs" / v).exists()]
result = write_report(runs, variants, seeds, log=print) if variants else None
for name in ("summary.md", "results.csv"):
    if (runs / name).is_file():
        shutil.copy(runs / name, out / name)
for v in variants:
    for seed in sorted((runs / "runs" / v).glob("seed*")):
        dest = out / "runs" / v / seed.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("log.jsonl", "recipe.yaml", "score.json"):
            if (seed / f).is_file():
                shutil.copy(seed / f, dest / f)
        epochs = sum(1 for line in (seed / "log.jsonl").open() if line.strip()) if (seed / "log.jsonl").is_file() else 0
        print(f"{v} {seed.name}: {epochs} epoch(s) logged, {'finished' if (seed / 'score.json').is_file() else 'stopped'}")
print(result.table if result else "no finished runs")
PY
rm -rf "$RUNS"
