#!/usr/bin/env bash
# Method comparison on the compositional task suite with the tiny local model (see docs/results.md).
#
#   bash examples/suite_comparison.sh [OUT_DIR] [PRETRAIN_STEPS] [ADAPT_STEPS]
#
# Pre-trains a shared LoRA, Poly and MHR bundle on the training tasks, adapts every held-out task with
# each few-shot method, trains the zero-shot adapter, and writes one eval report (JSON) per run.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process: oversubscribed cores slow tiny models down
OUT=${1:-/tmp/mhr-suite}
STEPS=${2:-300}
ADAPT_STEPS=${3:-60}
mkdir -p "$OUT/reports"
python -c "from tests.tiny import build_tiny_llama; build_tiny_llama('$OUT/model')"
mhr suite --out "$OUT/suite" --n-train 64 --n-test 16 --n-shots 16
HELD=$(python -c "from training.suite import HELD_OUT_TASKS; print(' '.join(HELD_OUT_TASKS))")
SHAPE=(--skills 8 --rank 4 --alpha 8 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)

for method in lora poly mhr; do
  mhr train --model "$OUT/model" --data "$OUT/suite/train.jsonl" --out "$OUT/$method" --method "$method" \
    "${SHAPE[@]}" --heads 4 --steps "$STEPS" --batch-size 16 --warmup-steps 20 --lr 1e-2 --logits-lr 0.1 --quiet
  mhr eval --bundle "$OUT/$method" --data "$OUT/suite/test.jsonl" --out "$OUT/reports/pretrain-$method.json" \
    --max-new-tokens 16 > /dev/null
done

adapt_all() {  # adapt_all BUNDLE METHOD: every held-out task into a copy of BUNDLE, then evaluate the copy
  local copy="$OUT/adapt-$1-$2"
  rm -rf "$copy" && cp -r "$OUT/$1" "$copy"
  for task in $HELD; do
    grep "\"task\": \"$task\"" "$OUT/suite/heldout-train.jsonl" > "$OUT/suite/shots-$task.jsonl"
    mhr adapt --bundle "$copy" --data "$OUT/suite/shots-$task.jsonl" --task "$task" --method "$2" \
      --steps "$ADAPT_STEPS" --batch-size 8 --lr 1e-2 --logits-lr 0.1 --quiet
  done
  mhr eval --bundle "$copy" --data "$OUT/suite/heldout-test.jsonl" --out "$OUT/reports/adapt-$1-$2.json" \
    --max-new-tokens 16 > /dev/null
}
adapt_all lora lora     # a fresh LoRA: no pre-training
adapt_all lora mhr-mu   # the multi-task shared LoRA (the average of its one skill), fine-tuned
adapt_all poly poly
for method in mhr mhr-z mhr-mu; do adapt_all mhr "$method"; done

mhr zeroshot --bundle "$OUT/mhr" --data "$OUT/suite/train.jsonl" --steps 100 --batch-size 16 --lr 1e-2 --quiet
mhr eval --bundle "$OUT/mhr" --data "$OUT/suite/heldout-test.jsonl" --zero-shot \
  --out "$OUT/reports/zeroshot-mhr.json" --max-new-tokens 16 > /dev/null
python - "$OUT/reports" <<'PY'
import json, sys, pathlib
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    avg = json.loads(path.read_text())["average"]
    print(f"{path.stem:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(avg.items())))
PY
