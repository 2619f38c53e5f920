#!/usr/bin/env bash
# The GPU path in one script: attention correctness, train-step MFU, long-context evaluation.
#
# On the GPU machine (the device tool; .whl/ holds the ml_collections wheel, git-ignored):
#   run(command='bash benchmarks/gpu.sh "$OUT"', carry=['.whl'], timeout_s=540)
# Anywhere else with a GPU:        bash benchmarks/gpu.sh OUT_DIR
# Check the script on a CPU:       bash benchmarks/gpu.sh OUT_DIR --cpu-dry-run
#
# Parts, each under its own time limit so one failure does not eat the budget (~10 min in all):
#   correctness  cudnn (bf16) and chunked (f32) against a float32 dense reference, ALiBi
#                and RoPE, causal and sliding, forward and gradients            (limit 240 s)
#   train        lcr's train step, ~125M GPT-2-small at 2048 tokens, bf16, 50 steps: tokens/s
#                and MFU (data-sheet and measured peaks)                         (limit 150 s)
#   train_preset the model of configs/lm.py:gpu (6 × 384, T 512), 50 steps       (limit 60 s)
#   long_eval    forward at 32k and 128k tokens, auto (cudnn/chunked) and chunked (limit 110 s)
# Writes OUT_DIR/<part>.log, OUT_DIR/results.jsonl (every JSON line) and OUT_DIR/summary.txt.
# Needs: python3 with jax[cuda], flax, optax, orbax-checkpoint, absl-py, numpy, PyYAML; the data
# room (grain, tensorflow-datasets) is not imported. ml_collections is installed from .whl/ when
# the machine lacks it: python3 -m pip download --no-deps -d .whl ml_collections==1.1.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash benchmarks/gpu.sh OUT_DIR [--cpu-dry-run]}"
DRY="${2:-}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2

if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/lcr_site .whl/*.whl
    export PYTHONPATH="/tmp/lcr_site:$PYTHONPATH"
  else
    echo "ml_collections is missing and .whl/ holds no wheel"; exit 1
  fi
fi

flag=""
short=(1024 2048)          # long_eval lengths of a dry run
long=(32768 131072)
if [ "$DRY" = "--cpu-dry-run" ]; then
  flag="--cpu_dry_run"; long=("${short[@]}")
  export JAX_PLATFORMS=cpu
fi

status=0
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
part() {   # part NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, logs, collects JSON lines
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  note "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep '^{' "$OUT/$name.log" | sed "s/^{/{\"part\": \"$name\", /" >> "$OUT/results.jsonl"
  grep -v '^{' "$OUT/$name.log" | grep -v -i 'warning\|^ *warnings.warn\|^$' | tail -n 40 \
    >> "$OUT/summary.txt"
  local verdict="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMEOUT"
  [ $rc -ne 0 ] && [ "$verdict" = "ok" ] && verdict="FAILED (exit $rc)"
  [ $rc -ne 0 ] && status=1
  note "-- $name: $verdict after $((SECONDS - start)) s"
}

: > "$OUT/results.jsonl"
: > "$OUT/summary.txt"
note "$("$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -n 1)"
part correctness 240 "$PY" benchmarks/gpu_check.py correctness $flag
part train 150 "$PY" benchmarks/gpu_check.py train --model=gpt2 --steps=50 $flag
part train_preset 60 "$PY" benchmarks/gpu_check.py train --model=gpu_preset --steps=50 $flag
part long_eval 110 "$PY" benchmarks/long_eval.py --lengths="$(IFS=,; echo "${long[*]}")" \
  --backends=auto,chunked --variants=causal --pos=rope --dtype=bfloat16 --timeout=50 \
  --memory_budget_gb=64
note "status $status"
echo; echo "==== summary ($OUT/summary.txt)"; cat "$OUT/summary.txt"
exit $status
