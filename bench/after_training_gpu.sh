#!/usr/bin/env bash
# Issue #9 measurements that need more compute than the 2-core CPU (run on a GPU box):
#  1. distillation: a 2-layer student of the default 4-layer model (teacher: a trained
#     run of configs/tiny.toml at $TEACHER), with and without the teacher, equal steps;
#  2. a ~10M-parameter GPT for the quantization measurements (compressed on the CPU).
# Usage: TEACHER=data/m9/demo OUT=/tmp/out bash bench/after_training_gpu.sh
set -euo pipefail
export PYTHONPATH=$PWD
PREP=/tmp/prep
COMMON="--config configs/tiny.toml --data.prepared_dir=$PREP --data.prep_workers=8 --train.progress=off --eval.interval=100"
STEPS=${STEPS:-600}
for mode in plain kd; do
  extra=""
  [ "$mode" = kd ] && extra="--distill.teacher=$TEACHER --distill.alpha=0.5 --distill.temperature=2"
  # Both runs use the teacher's tokenizer, so they see the same token ids and windows.
  python3 -m scaletrain train $COMMON --model.n_layer=2 --train.steps=$STEPS \
    --data.tokenizer=$TEACHER/tokenizer.json --run.dir=/tmp/student-$mode $extra | tail -1
  mkdir -p $OUT/student-$mode
  cp /tmp/student-$mode/{metrics.jsonl,summary.json,config.toml} $OUT/student-$mode/
done
python3 -m scaletrain train $COMMON --model.n_layer=5 --model.n_head=6 --model.d_model=384 \
  --train.batch_size=64 --train.steps=${BIG_STEPS:-2500} --optim.lr=1e-3 \
  --schedule.warmup_steps=100 --schedule.min_lr=1e-4 --eval.interval=500 --run.dir=/tmp/gpt10m | tail -1
mkdir -p $OUT/gpt10m
cp /tmp/gpt10m/{best.safetensors,config.toml,tokenizer.json,summary.json,metrics.jsonl} $OUT/gpt10m/
