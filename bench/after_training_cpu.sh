#!/usr/bin/env bash
# Issue #9 measurements on the CPU, from a trained run of configs/tiny.toml ($BASE):
#  1. LoRA fine-tune on a different text source (Vim's English documentation);
#  2. compress: 50% magnitude pruning + short fine-tune, and int8 / int4 quantization;
#  3. compress: 50% structured pruning (+ short fine-tune).
# Usage: BASE=/tmp/demo-run W=/tmp/m9 bash bench/after_training_cpu.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
W=${W:-/tmp/m9}
mkdir -p "$W"
OTHER=${OTHER:-/usr/share/vim/vim90/doc/*.txt}
$PY -m scaletrain train --config configs/tiny.toml --init.from="$BASE" \
  --data.source="$OTHER" --data.max_files=60 --data.prepared_dir="$W/prep" \
  --finetune.lora_rank=4 --finetune.lora_alpha=8 --train.steps=${LORA_STEPS:-150} \
  --optim.lr=3e-3 --schedule.warmup_steps=10 --eval.interval=50 --train.progress=off \
  --run.dir="$W/lora" --run.overwrite=true | tail -1
$PY -m scaletrain compress "$BASE" --compress.out="$W/c-magnitude" \
  --prune.method=magnitude --prune.amount=0.5 --prune.finetune_steps=${FT_STEPS:-100} \
  --quant.methods=dynamic-int8,weight-int8,weight-int4 --compress.gen_tokens=100
$PY -m scaletrain compress "$BASE" --compress.out="$W/c-structured" \
  --prune.method=structured --prune.amount=0.5 --prune.finetune_steps=${FT_STEPS:-100}
