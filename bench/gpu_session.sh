#!/usr/bin/env bash
# The measurements issues 15, 17 and 19 ask of a session lent one GPU, in one call, in
# priority order, each under its own time limit so that a failure or a slow compile
# leaves the rest running (a lease is 15 minutes, machine start included):
#  1. gpt2-small (124M) bf16 + compile: `scaletrain bench` (MFU against the measured
#     bf16 peak, the step by kernel kind, scaletrain's step against the hand loop);
#  2. a ~1.2B llama (Llama 3.2 1B's shape, 128k vocabulary) bf16 + compile: the same;
#  3. an MoE llama (16 experts, top-2, torch._grouped_mm) bf16: bench/mfu.py, eager
#     and compiled.
# Usage, on the GPU machine in the repo root (python3 holds a CUDA torch):
#   OUT=/tmp/out bash bench/gpu_session.sh
# DEVICE=cpu SMALL=1 runs the same flow with tiny shapes on a CPU (a dry run);
# BENCH_STEPS="--steps 8 --warmup 3 --pairs 6" for more hand-loop pairs; MOE_COMPILE=
# (empty) skips the MoE rows. A machine without datatrove (preparation) needs its
# wheels: pip download --no-deps --only-binary=:all: --python-version 3.12 datatrove
# dill loguru multiprocess zstandard into a folder, pip install --target it there, and
# put it on PYTHONPATH (2026-12-04's H200 image had the rest).
# Then the CUDA tests: python3 -m pytest -q -n 8 tests/gpu
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv 2>/dev/null
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

# One prepared corpus (the built-in one, 4096-token BPE) for every run; the models'
# vocabularies are set apart (model.vocab_size), as real shapes need.
DATA="--data.vocab_size=4096 --data.prep_workers=${PREP_WORKERS:-16} --data.prepared_dir=/tmp/prep"
COMMON="$DATA --train.device=$DEVICE --precision.dtype=bf16 \
--run.dir=/tmp/gpu-run --run.overwrite=true"
log prepare
timeout 120 $PY -m scaletrain prepare --config configs/gpt2-small.toml $DATA 2>&1 | tail -4

if [ "${SMALL:-0}" = 1 ]; then
  GPT="--model.n_layer=2 --model.d_model=64 --model.n_head=2 --model.seq_len=64 \
--model.vocab_size=4096 --train.batch_size=2 --train.micro_batch_size=2"
  LLAMA="--model.n_layer=2 --model.d_model=64 --model.n_head=4 --model.n_kv_head=2 \
--model.d_ff=128 --model.seq_len=64 --model.vocab_size=4096 --train.batch_size=2 \
--train.micro_batch_size=2"
  MOE="--model.n_layer=2 --model.d_model=64 --model.n_head=4 --model.n_kv_head=2 \
--model.moe_d_ff=64 --model.seq_len=64 --model.vocab_size=4096 --train.batch_size=2 \
--train.micro_batch_size=2"
  STEPS="--steps 2 --warmup 1 --pairs 1"
else
  # GPT-2 small at micro-batch 16 x 1024 (16k tokens a step, no accumulation).
  GPT="--train.batch_size=16 --train.micro_batch_size=16"
  # Llama 3.2 1B: 16 layers, d 2048, 32 heads over 8 kv heads, SwiGLU 8192, tied
  # 128256-token head, rope 500k; 4 x 2048 tokens a step (the hand loop's model and
  # its unchunked 128k-vocabulary logits live in the same process).
  LLAMA="--model.n_layer=16 --model.d_model=2048 --model.n_head=32 --model.n_kv_head=8 \
--model.d_ff=8192 --model.vocab_size=128256 --model.seq_len=2048 --model.rope_theta=500000 \
--model.tie_embeddings=true --train.batch_size=4 --train.micro_batch_size=4"
  # 8 layers (the first dense), d 1024, 16 experts of width 1024, top-2, one shared.
  MOE="--model.n_layer=8 --model.d_model=1024 --model.n_head=16 --model.n_kv_head=4 \
--model.moe_experts=16 --model.moe_d_ff=1024 --model.seq_len=2048 --model.vocab_size=32768 \
--train.batch_size=8 --train.micro_batch_size=8"
  STEPS=${BENCH_STEPS:-"--steps 8 --warmup 3 --pairs 2"}
fi

log "1. gpt2-small bf16 + compile"
timeout ${T_GPT:-170} $PY -m scaletrain bench --config configs/gpt2-small.toml $COMMON --train.compile=true $GPT \
  $STEPS --out "$OUT/gpt2s" 2>&1 | grep -v "^W\|Warning" | tail -40
log "2. llama 1.2B bf16 + compile"
timeout ${T_LLAMA:-230} $PY -m scaletrain bench --config configs/llama-10m.toml $COMMON --train.compile=true $LLAMA \
  $STEPS --out "$OUT/llama1b" 2>&1 | grep -v "^W\|Warning" | tail -40
for compile in ${MOE_COMPILE-false true}; do  # MOE_COMPILE= skips them
  log "3. moe bf16 compile=$compile"
  timeout ${T_MOE:-90} $PY bench/mfu.py --config configs/moe-tiny.toml $COMMON $MOE \
    --train.compile=$compile --steps 5 --warmup 2 --no-shapes --json "$OUT/moe.jsonl" \
    2>&1 | grep -v "^{\|^W\|Warning" | tail -22
done
log done
