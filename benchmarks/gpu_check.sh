#!/usr/bin/env bash
# The CUDA checks in one prepared run, on a machine with a CUDA GPU
# (a few minutes on one H200 plus the capped test suite; everything
# it needs is in the device machine's image: torch, timm, safetensors, click, tqdm, pyyaml,
# pytest). From the repository root:
#     OUT=/some/folder bash benchmarks/gpu_check.sh      # logs and figures go to $OUT
# What it shows, each step logged to $OUT/gpu_check.log:
#   1. first, what SAC heads cost in training: the training step of the converted
#      model with SAC heads against the original, resnet50 at 224, batch 128, bf16 autocast,
#      channels_last, eager and then compiled; each prints its ratio against the target 1.03;
#   2. `flexsurgeon finetune --device cuda` runs the quick recipe (bf16 autocast,
#      channels_last, TF32, pinned memory, EMA), then again with torch.compile, and the best
#      checkpoint loads through timm on the GPU;
#   3. torchrun with the NCCL backend (one process: the machine has one GPU);
#   4. inference images/s, converted against original, bf16 + channels_last, eager and
#      compiled with freezing;
#   5. the tests about CUDA (pytest -m cuda), then, capped by TESTS_TIMEOUT (300 s), the
#      default suite on that machine's Python and torch (pinned to the CPU by tests/conftest.py),
#      each test's name and result logged as it runs (-v).
# A dry run of the script itself on a CPU, small and fast (the suite runs in CI anyway):
#     DEVICE=cpu MODEL=test_resnet IMG=64 DATA=synthetic:classes=10,train=256,val=64 BATCH=32 \
#         ROUNDS=3 SKIP_TESTS=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-resnet50} IMG=${IMG:-224} BATCH=${BATCH:-128}
DATA=${DATA:-synthetic:classes=10,train=4096,val=1024} ROUNDS=${ROUNDS:-20}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
RUNS=$(mktemp -d)
failed=0
step() {  # step NAME COMMAND...: run, log, and remember a failure without stopping the rest
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  if "$@" >>"$LOG" 2>&1; then echo "   ok ($((SECONDS - start)) s)" | tee -a "$LOG"
  else echo "   FAILED ($((SECONDS - start)) s)" | tee -a "$LOG"; failed=1; fi
}

{ date -u; nvidia-smi -L 2>/dev/null; $PY -c "import sys, torch, timm; print(sys.version.split()[0], torch.__version__, timm.__version__, torch.cuda.is_available())"; } | tee -a "$LOG"

step convert $PY -m flexsurgeon convert "$MODEL" --random-init --num-classes 10 --img-size "$IMG" -o "$RUNS/model"
step sac-cost-eager $PY benchmarks/train_speed.py --device "$DEVICE" --model "$MODEL" --img-size "$IMG" \
  --batch-size "$BATCH" --rounds "$ROUNDS" --warmup 5 --sections steps --target 1.03
step sac-cost-compiled $PY benchmarks/train_speed.py --device "$DEVICE" --model "$MODEL" --img-size "$IMG" \
  --batch-size "$BATCH" --rounds "$ROUNDS" --warmup 3 --sections steps --variants original,flexpool+sac \
  --compile --target 1.03
grep -h "^flexpool+sac / original = " "$LOG" | sed 's/^/   /'
step finetune $PY -m flexsurgeon finetune "$RUNS/model" --data "$DATA" --recipe quick --epochs 2 \
  --batch-size "$BATCH" --workers 8 --device "$DEVICE" -o "$RUNS/ft"
if [ "$DEVICE" = cuda ]; then  # what finetune says it runs with
  step bf16-channels-last grep -q "fine-tuning on cuda (bf16 autocast, channels_last)" "$LOG"
fi
step finetune-compiled $PY -m flexsurgeon finetune "$RUNS/model" --data "$DATA" --recipe quick --epochs 2 \
  --batch-size "$BATCH" --workers 8 --device "$DEVICE" --set compile=true -o "$RUNS/ft-compiled"
step logs-and-load $PY - "$RUNS" "$DEVICE" "$IMG" <<'EOF'
import json, math, sys
from pathlib import Path
import timm, torch
import flexsurgeon  # registers local-dir: loading of converted models
runs, device, img = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for run in ("ft", "ft-compiled"):
    records = [json.loads(line) for line in (runs / run / "log.jsonl").read_text().splitlines()]
    last = records[-1]
    print(run, json.dumps({k: last[k] for k in ("epoch", "images_per_s", "lr") if k in last}), last["val"]["top1"])
    assert len(records) == 2 and all(math.isfinite(v) for r in records for v in r["train"]["loss"].values())
model = timm.create_model(f"local-dir:{runs / 'ft' / 'best'}", pretrained=True).to(device).eval()
x = torch.randn(4, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    full = model(x)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        half = model(x).float()
print("best/ via timm:", tuple(full.shape), "bf16 vs float32 max abs diff", (half - full).abs().max().item())
assert full.shape == (4, 10) and torch.isfinite(full).all()
EOF
step torchrun-nccl $PY -m torch.distributed.run --nproc-per-node 1 -m flexsurgeon finetune "$RUNS/model" \
  --data synthetic:classes=10,train=512,val=128 --recipe smoke --batch-size "$BATCH" --device "$DEVICE" -o "$RUNS/ddp"
cp -r "$RUNS/ft/log.jsonl" "$OUT/finetune_log.jsonl" 2>/dev/null
cp -r "$RUNS/ft-compiled/log.jsonl" "$OUT/finetune_compiled_log.jsonl" 2>/dev/null
step infer-throughput $PY benchmarks/infer_throughput.py --device "$DEVICE" --model "$MODEL" --img-size "$IMG" \
  --batch "$((BATCH * 2))" --rounds "$((ROUNDS / 2 > 1 ? ROUNDS / 2 : 2))"
# The tests about CUDA (marked cuda; the rest of the suite hides CUDA from itself), then, last and
# capped, the default suite on that machine's Python and torch: -v logs each result as it comes,
# so a cut-off run still names its failures (grep FAILED).
step tests-cuda $PY -m pytest -v -p no:cacheprovider -m cuda tests
[ -n "${SKIP_TESTS:-}" ] || step tests timeout "${TESTS_TIMEOUT:-300}" $PY -m pytest -v -p no:cacheprovider tests

echo "gpu_check: $([ $failed = 0 ] && echo 'all steps passed' || echo 'some steps FAILED'); log: $LOG" | tee -a "$LOG"
exit $failed
