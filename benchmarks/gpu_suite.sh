#!/usr/bin/env bash
# One prepared command for a short GPU check of cign_jax (docs/performance.md,
# "The GPU suite"). From the repository root:
#
#   bash benchmarks/gpu_suite.sh            # the GPU machine, about 8 minutes
#   bash benchmarks/gpu_suite.sh --quick    # rehearsal anywhere (CPU): tiny
#                                           # batches and step counts
#
# Carried in the git-ignored folder .gpu/ (or $CIGN_GPU_DIR): whl/*.whl (the
# pure-Python wheels the bare machine lacks: ml_collections and clu; the
# event files need only the tensorboard package, which it has), installed
# with pip --no-index into /tmp/site; mnist.npz
# (uint8 train_images (N, 28, 28), train_labels (N,), test_images,
# test_labels). Everything goes to one log: $OUT/gpu_suite.log when $OUT is
# set, else /tmp/gpu_suite.log.
#
# Order (the most important figures first, in case time runs out):
#   1. channel_small train step, float32 (fills the compilation cache);
#      1b. the step of a sweep of 8 channel_small members (cign_jax.sweeps)
#      against one run's;
#   2. a timed channel_small training run, 50 epochs, compilation included,
#      stopped at $SUITE_TRAIN_SECONDS (default 210) if not done;
#   3. compilation of the remaining steps and sampling functions, a few
#      processes in parallel (the cache then serves the timed runs);
#   4. the four paper configs' steps in float32 with our PyTorch port on the
#      same GPU, in bfloat16, channel_small at 'highest' precision; sampling
#      f(z, c) at batch 1000; sweeps of 1, 2 and 4 members.
# Each stage gets what is left of $SUITE_SECONDS (default 480) and is skipped
# when too little is left.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0
if [[ "${1:-}" == "--quick" || "${SUITE_QUICK:-0}" == "1" ]]; then QUICK=1; fi
LOG=${OUT:+$OUT/gpu_suite.log}
LOG=${LOG:-/tmp/gpu_suite.log}
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

PY=${PYTHON:-python3}
GPU_DIR=${CIGN_GPU_DIR:-$ROOT/.gpu}
SITE=${SUITE_SITE:-/tmp/site}
CACHE=${SUITE_CACHE:-/tmp/cign_jax_jit_cache}
BUDGET=${SUITE_SECONDS:-480}
TRAIN_SECONDS=${SUITE_TRAIN_SECONDS:-210}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
stage() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

stage "cign_jax GPU suite, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), quick=$QUICK"
git log -1 --format='commit %H %s' 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  2>/dev/null || echo "no nvidia-smi"
if compgen -G "$GPU_DIR/whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --target "$SITE" \
    "$GPU_DIR"/whl/*.whl && echo "installed: $(ls "$GPU_DIR"/whl)"
  export PYTHONPATH=$SITE:$ROOT
else
  echo "no wheels in $GPU_DIR/whl"
  export PYTHONPATH=$ROOT
fi
export PYTHONUNBUFFERED=1
$PY -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
mkdir -p "$CACHE"
BENCH="$PY $ROOT/benchmarks/train_step.py --compilation_cache=$CACHE"
if (( QUICK )); then
  # Tiny models and batches: every stage runs, in minutes on a CPU.
  TINY="--latent_dim=2 --intermediate_dim=4"
  STEP_ARGS="--batch_size=4 --steps=2 --warmup=1 $TINY"
  FWD_ARGS="--forward_batch=16 --steps=2 $TINY"
  TRAIN_ARGS="--num_train_steps=6 --set=log_every_steps=3 --set=sample_every_steps=6 --set=checkpoint_every_steps=6 --set=batch_size=4 --set=model.latent_dim=2 --set=model.intermediate_dim=4"
  STEPS_ALL="--steps=2 --warmup=1 --batch_size=4 $TINY"
else
  STEP_ARGS="--steps=20 --warmup=3"
  FWD_ARGS="--forward_batch=1000 --steps=20"
  TRAIN_ARGS="--epochs=50 --set=log_every_steps=500"
  STEPS_ALL="--steps=20 --warmup=3"
fi
CS=$ROOT/configs/channel_small.py

run_capped() {  # run_capped SECONDS_NEEDED_AT_LEAST CMD...: with what is left
  local need=$1; shift
  local rest; rest=$(left)
  if (( rest < need )); then
    echo "SKIPPED (only ${rest} s left of ${BUDGET}): $*"
    return 0
  fi
  timeout --signal=INT --kill-after=10 "$rest" "$@"
  local rc=$?
  (( rc == 0 )) || echo "EXIT $rc: $*"
}

stage "1. channel_small train step, float32 (passes auto, channel_conv auto)"
run_capped 60 $BENCH --config=$CS --no_torch $STEP_ARGS

stage "1b. channel_small sweep step, 8 members against one run (issue 23's target: at most twice one run's step)"
run_capped 60 $BENCH --config=$CS --members=8 $STEP_ARGS

stage "2. channel_small training run, compilation included (cap ${TRAIN_SECONDS} s)"
echo "compilation cache before: $(ls "$CACHE" | grep -c jit_train_step) train steps"
if [[ -f "$GPU_DIR/mnist.npz" ]]; then
  rm -rf /tmp/cign_suite_run
  run_capped 90 $PY $ROOT/benchmarks/gpu_train_run.py --npz="$GPU_DIR/mnist.npz" \
    --config=$CS --workdir=/tmp/cign_suite_run --compilation_cache=$CACHE \
    --max_seconds=$TRAIN_SECONDS $TRAIN_ARGS
else
  echo "SKIPPED: no $GPU_DIR/mnist.npz"
fi
echo "compilation cache after: $(ls "$CACHE" | grep -c jit_train_step) train steps (unchanged: the run reused stage 1's compiled step)"

stage "3. compiling the remaining steps and sampling, in parallel"
if (( $(left) > 150 )); then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  pids=()
  for cfg in channel_large filter_small filter_large; do
    ( $BENCH --config=$ROOT/configs/$cfg.py --compile_only $STEP_ARGS \
      && $BENCH --config=$ROOT/configs/$cfg.py --compile_only $STEP_ARGS \
         --compute_dtype=bfloat16 ) > /tmp/cign_compile_$cfg.log 2>&1 &
    pids+=($!)
  done
  ( $BENCH --config=$CS --compile_only $STEP_ARGS --compute_dtype=bfloat16 \
    && $BENCH --config=$CS --compile_only $STEP_ARGS --matmul_precision=highest \
    && $BENCH --all --forward_only --compile_only $FWD_ARGS \
  ) > /tmp/cign_compile_rest.log 2>&1 &
  pids+=($!)
  rest=$(left)
  ( sleep $(( rest > 200 ? rest - 200 : 1 )); kill "${pids[@]}" 2>/dev/null ) &
  watchdog=$!
  wait "${pids[@]}"
  kill $watchdog 2>/dev/null
  for f in /tmp/cign_compile_*.log; do echo "--- $f"; tail -n 4 "$f"; done
  unset XLA_PYTHON_CLIENT_PREALLOCATE
else
  echo "SKIPPED (only $(left) s left)"
fi

stage "4a. the four configs, float32, with our PyTorch port on cuda"
TORCH_DEV=cuda
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  2>/dev/null || TORCH_DEV=cpu
if (( QUICK )) || [[ $TORCH_DEV == cpu ]]; then
  run_capped 40 $BENCH --all --no_torch $STEPS_ALL
else
  run_capped 40 $BENCH --all --torch_device=$TORCH_DEV $STEPS_ALL
fi
stage "4b. the four configs, bfloat16"
run_capped 40 $BENCH --all --no_torch --compute_dtype=bfloat16 $STEPS_ALL
stage "4c. channel_small, matmul_precision=highest (full float32)"
run_capped 20 $BENCH --config=$CS --no_torch --matmul_precision=highest $STEP_ARGS
stage "4d. sampling f(z, c), the four configs"
run_capped 20 $BENCH --all --forward_only $FWD_ARGS
stage "4f. channel_small sweep steps, 1, 2 and 4 members"
for k in 1 2 4; do
  run_capped 30 $BENCH --config=$CS --members=$k $STEP_ARGS
done
if (( QUICK )); then
  stage "4e. our PyTorch port alone, channel_small (quick: cpu)"
  run_capped 20 $BENCH --config=$CS --steps=1 --warmup=1 --torch_device=cpu \
    $STEP_ARGS
fi

stage "done in $(( $(date +%s) - T0 )) s; log: $LOG"
grep -h "^config=\|^RESULT\|step [0-9]*/[0-9]* |" "$LOG" | tail -40
