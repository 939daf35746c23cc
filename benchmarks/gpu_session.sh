#!/usr/bin/env bash
# One GPU session's checks, run on the device machine (see the README's "On a GPU").
#
#   bash benchmarks/gpu_session.sh OUTDIR [STEP...]            STEP: tests, numerics, kernels, bench (default: all)
#   bash benchmarks/gpu_session.sh --dry-run OUTDIR [STEP...]  print the plan and the limits, run nothing
#
# The device kills a command at 600 s and lends 15 minutes in all, so the steps go as two calls:
#   call 1: tests numerics kernels   run side by side (none is timed; 16 cores), each under its own limit
#   call 2: bench                    alone on the machine, since it times kernels
# SESSION_LIMIT (690 s) is what the two take together: call 1's setup and slowest step, call 2's setup and bench.
# One call with every step also works: bench then gets what is left of CALL_LIMIT (580 s).
# Limits (seconds, from the environment): TESTS_LIMIT, NUMERICS_LIMIT, KERNELS_LIMIT (150 each, concurrent),
# BENCH_LIMIT (420), SETUP_LIMIT (30: wheels and the header), CALL_LIMIT (580: one invocation ends inside it).
# BENCH_ARGS: more bench_triton.py arguments (a later session finishing what a first one's budget left undone:
# BENCH_ARGS="--shapes 8x1024x8x64"; fla autotunes every kernel at every new shape, tens of seconds a layer).
#
# Carry the wheels benchmarks/fetch_device_wheels.sh puts in .whl/ (lark, optuna and its needs, fla-core): they go
# to /tmp/site first. What lands in OUTDIR, files only, no folders (the device returns 8 files at most):
#   session.log       header (date, GPU, driver, versions), each step's last lines, exit status and seconds
#   gpu_tests.xml     numerics_gpu.xml      JUnit reports of the tests and numerics steps
#   kernels_gpu.json  registers / spills on the GPU beside the compile-only figures (shards merged)
#   triton_gpu.json   bench_triton.py's cells, rewritten after every cell
set -u
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
OUTDIR=${1:?usage: gpu_session.sh [--dry-run] OUTDIR [STEP...]}
shift
STEPS=${*:-tests numerics kernels bench}
for step in $STEPS; do
  case $step in tests|numerics|kernels|bench) ;; *) echo "unknown step '$step': choose from tests numerics kernels bench" >&2; exit 2 ;; esac
done
TESTS_LIMIT=${TESTS_LIMIT:-150} NUMERICS_LIMIT=${NUMERICS_LIMIT:-150} KERNELS_LIMIT=${KERNELS_LIMIT:-150}
BENCH_LIMIT=${BENCH_LIMIT:-420} SETUP_LIMIT=${SETUP_LIMIT:-30} CALL_LIMIT=${CALL_LIMIT:-580}
SESSION_LIMIT=${SESSION_LIMIT:-690}
KERNEL_SHARDS=${KERNEL_SHARDS:-4}
BENCH_TAIL=60  # seconds bench keeps after its --budget: the cell in flight, then the table

has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
concurrent=0
for step in tests numerics kernels; do
  if has $step; then
    limit_var=$(echo "${step}_LIMIT" | tr '[:lower:]' '[:upper:]')
    [ "${!limit_var}" -gt $concurrent ] && concurrent=${!limit_var}
  fi
done
slowest=$(printf '%s\n' "$TESTS_LIMIT" "$NUMERICS_LIMIT" "$KERNELS_LIMIT" | sort -n | tail -1)
two_calls=$((SETUP_LIMIT + slowest + SETUP_LIMIT + BENCH_LIMIT))
if [ $two_calls -gt "$SESSION_LIMIT" ]; then
  echo "limits: call 1 ($SETUP_LIMIT + the slowest concurrent step) and call 2 ($SETUP_LIMIT + BENCH_LIMIT $BENCH_LIMIT)" \
       "take $two_calls s, over SESSION_LIMIT $SESSION_LIMIT s" >&2
  exit 2
fi
if [ $((SETUP_LIMIT + concurrent)) -gt "$CALL_LIMIT" ]; then
  echo "limits: setup and the concurrent steps take $((SETUP_LIMIT + concurrent)) s, over CALL_LIMIT $CALL_LIMIT s" >&2
  exit 2
fi
if [ $DRY_RUN = 1 ]; then
  echo "steps: $STEPS; outputs in $OUTDIR"
  echo "setup: up to $SETUP_LIMIT s"
  has tests && echo "tests: $TESTS_LIMIT s (concurrent)"
  has numerics && echo "numerics: $NUMERICS_LIMIT s (concurrent)"
  has kernels && echo "kernels: $KERNELS_LIMIT s (concurrent, $KERNEL_SHARDS shards)"
  has bench && echo "bench: up to $BENCH_LIMIT s, alone, ending inside CALL_LIMIT $CALL_LIMIT s"
  echo "two calls: $two_calls s of SESSION_LIMIT $SESSION_LIMIT s"
  exit 0
fi

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout "$SETUP_LIMIT" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site \
    || echo "== setup: the wheels in .whl/ did not install (see above); lark, optuna and fla are missing" >&2
else
  echo "== setup: no .whl/ (run benchmarks/fetch_device_wheels.sh, carry .whl): lark, optuna and fla are missing" >&2
fi
unset TRITON_INTERPRET
export RECURRENCE_DSL_CACHE=/tmp/recdsl_cache
LOGS=${GPU_SESSION_LOGS:-/tmp/gpu_session_logs}  # each step's whole log and the kernel shards: not returned
rm -rf "$LOGS" && mkdir -p "$LOGS"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
  echo "steps: $STEPS"
} 2>&1 | tee -a "$OUTDIR/session.log"

# step NAME LIMIT COMMAND...: COMMAND under LIMIT seconds, its output in $LOGS/NAME.log with its exit status.
# SIGINT at the limit: pytest then stops as on Ctrl-C and still writes its JUnit XML with the tests that ran
# (SIGTERM would leave none); the Python scripts have written their JSON after every run or cell already.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)$([ $rc = 124 ] && echo ', stopped at its limit')" \
    >>"$LOGS/$name.log"
}

kernels() {  # shards side by side, each writing its JSON after every run; merged whatever they got to
  local i pids=()
  for ((i = 0; i < KERNEL_SHARDS; i++)); do
    step "kernels_$i" "$KERNELS_LIMIT" python3 benchmarks/gpu_kernel_report.py --shard "$i/$KERNEL_SHARDS" \
      --out "$LOGS/kernels_$i.json" &
    pids+=($!)
  done
  wait "${pids[@]}"
  cat "$LOGS"/kernels_[0-9]*.log >"$LOGS/kernels.log"
  python3 benchmarks/gpu_kernel_report.py --merge "$LOGS"/kernels_[0-9]*.json --out "$OUTDIR/kernels_gpu.json" \
    >>"$LOGS/kernels.log" 2>&1
}

pytest_gpu=(python3 -m pytest -q -m gpu -p no:cacheprovider -p no:benchmark)
pids=()
if has tests; then  # every test marked gpu, float32 / float16 / bfloat16 (forms, and the Triton adjoint kernel)
  step tests "$TESTS_LIMIT" "${pytest_gpu[@]}" -n 6 tests/test_gpu.py tests/test_triton_adjoint.py \
    --junitxml="$OUTDIR/gpu_tests.xml" &
  pids+=($!)
fi
if has numerics; then  # issue 8's decay / non-finite properties on the GPU in float32, float16 and bfloat16
  step numerics "$NUMERICS_LIMIT" "${pytest_gpu[@]}" -n 6 tests/test_numerics_gpu.py \
    --junitxml="$OUTDIR/numerics_gpu.xml" &
  pids+=($!)
fi
if has kernels; then kernels & pids+=($!); fi
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
for name in tests numerics; do
  if has $name; then tail -25 "$LOGS/$name.log" | tee -a "$OUTDIR/session.log"; fi
done
if has kernels; then grep -E "^==|runs;|differs|failed" "$LOGS/kernels.log" | tail -40 | tee -a "$OUTDIR/session.log"; fi

if has bench; then  # alone: fla's chunk_* and fused_recurrent_*, SDPA and ours at fla's shapes, bfloat16
  limit=$((CALL_LIMIT - SECONDS - 10))
  [ $limit -gt "$BENCH_LIMIT" ] && limit=$BENCH_LIMIT
  if [ $limit -lt $((BENCH_TAIL + 60)) ]; then
    echo "== bench: skipped, $limit s left of CALL_LIMIT $CALL_LIMIT s (run it as its own call)" | tee -a "$OUTDIR/session.log"
  else
    # shellcheck disable=SC2086  # BENCH_ARGS: extra words, e.g. "--shapes 8x1024x8x64 --paths fla_chunk,ours_chunked"
    step bench "$limit" python3 benchmarks/bench_triton.py --budget $((limit - BENCH_TAIL)) \
      --out "$OUTDIR/triton_gpu.json" ${BENCH_ARGS:-}
    grep -v "^measured " "$LOGS/bench.log" | tail -80 | tee -a "$OUTDIR/session.log"
  fi
fi
echo "== session: $SECONDS s; files: $(cd "$OUTDIR" && ls | tr '\n' ' ')" | tee -a "$OUTDIR/session.log"
