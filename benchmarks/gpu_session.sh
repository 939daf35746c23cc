#!/usr/bin/env bash
# One GPU session's checks, as one command on the device machine (see the README's "On a GPU").
#
#   bash benchmarks/gpu_session.sh OUTDIR [STEP...]      STEP: tests, numerics, kernels, bench (default: all)
#
# Carry the wheels of lark and optuna (and fla for the comparison) in .whl/: they are installed to
# /tmp/site first. Each step has its own time limit (TESTS_LIMIT, NUMERICS_LIMIT, KERNELS_LIMIT, BENCH_LIMIT
# seconds), so a slow step cannot eat the others; every step appends to OUTDIR/session.log and writes its
# JSON/XML under OUTDIR as it goes.
set -u
OUTDIR=${1:?usage: gpu_session.sh OUTDIR [STEP...]}
shift
STEPS=${*:-tests numerics kernels bench}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
unset TRITON_INTERPRET
export RECURRENCE_DSL_CACHE=/tmp/recdsl_cache
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUTDIR/session.log"

for step in $STEPS; do
  case $step in
    tests)     # every test marked gpu, float32 / float16 / bfloat16 (forms, and the Triton adjoint kernel)
      timeout "${TESTS_LIMIT:-180}" python3 -m pytest -q -m gpu -n 12 -p no:cacheprovider -p no:benchmark tests/test_gpu.py tests/test_triton_adjoint.py \
        --junitxml="$OUTDIR/gpu_tests.xml" 2>&1 | tail -40 | tee -a "$OUTDIR/session.log" ;;
    numerics)  # issue 8's decay / non-finite properties on the GPU in float32, float16 and bfloat16
      timeout "${NUMERICS_LIMIT:-150}" python3 -m pytest -q -m gpu -n 12 -p no:cacheprovider -p no:benchmark tests/test_numerics_gpu.py \
        --junitxml="$OUTDIR/numerics_gpu.xml" 2>&1 | tail -40 | tee -a "$OUTDIR/session.log" ;;
    kernels)   # registers, spills, shared memory of every forward kernel
      timeout "${KERNELS_LIMIT:-150}" python3 benchmarks/gpu_kernel_report.py --out "$OUTDIR/kernels_gpu.json" 2>&1 \
        | tail -60 | tee -a "$OUTDIR/session.log" ;;
    bench)     # our Triton and torch forms against fla, bfloat16, B=4 T=4096 H=16 K=V=128
      timeout "${BENCH_LIMIT:-240}" python3 benchmarks/bench_triton.py --out "$OUTDIR/triton_gpu.json" 2>&1 \
        | tee -a "$OUTDIR/session.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
