#!/usr/bin/env bash
# The accelerator rows of the README's performance table, in one run on one GPU or TPU chip:
#   bash benchmarks/accelerator.sh [LOG_DIR] [PEAK_GFLOPS]
# 1. the 15-cell ImageNet distillation step as training runs it (one program per layer shape), B7 teacher,
#    batch 64, bfloat16: first step (compile), s/step, img/s, model-FLOPs utilisation, device memory;
# 2. rating on the block-5 cells (bfloat16, 256 rating + 256 calibration images, chunk 216), exhaustive and
#    adaptive, and the whole-space projection;
# 3. the same step as one program (distill.programs='step'), which may not compile in its time limit.
# Each part has its own time limit (seconds: DISTILL_S, RATE_S, ONE_PROGRAM_S) and log in LOG_DIR;
# PARTS names the parts to run (default: all three); THREADS compile at once (default 8).
# PEAK_GFLOPS defaults to an H100's or H200's dense bfloat16 rate (datasheet, 989,000).
set -u
log_dir=${1:-accelerator_logs}
peak=${2:-989000}
mkdir -p "$log_dir"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

part() {
  local name=$1 limit=$2
  shift 2
  [[ " ${PARTS:-distill_layer rate one_program} " == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout -k 10 "$limit" "$python" "$@" >"$log_dir/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s; 124: timed out); log $log_dir/$name.log"
  grep -v -e '^WARNING' -e '^I0000' -e '^W0000' "$log_dir/$name.log" | tail -n "${TAIL_LINES:-40}"
}

"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv
part distill_layer "${DISTILL_S:-270}" benchmarks/distill_programs.py --batch 64 --dtype bfloat16 --steps 5 \
  --compile_threads "${THREADS:-8}" --progress --peak_gflops "$peak"
part rate "${RATE_S:-150}" benchmarks/rate_paths.py --dtype bfloat16 --batch 256 --calib_batch 256 --chunk_size 216 \
  --repeats 3 --subtrees 2 --survivors 0.05,0.1,0.25,0.5 --memory_chunks "" --peak_gflops "$peak"
part one_program "${ONE_PROGRAM_S:-150}" benchmarks/distill_step.py --batch 64 --dtype bfloat16 --steps 5 \
  --skip_separate --memory_batch 0 --init_threads "${THREADS:-8}" --peak_gflops "$peak"
