#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the device machine lacks, for benchmarks/gpu_session.sh.
#
#   bash benchmarks/fetch_device_wheels.sh [PIP]        PIP: the pip to ask (default: python3 -m pip)
#
# The device has Python 3.12, torch 2.11, triton 3.6, einops, tqdm, PyYAML, numpy, MarkupSafe, matplotlib,
# pytest-xdist and execnet (the device README's package list), and no package registry. It lacks our own
# dependencies lark and optuna (with optuna's alembic, colorlog, SQLAlchemy; alembic's Mako; SQLAlchemy's
# greenlet) and fla-core, whose fla.ops holds the chunk_* and fused_recurrent_* kernels we time against.
# fla-core alone: the flash-linear-attention wheel adds fla.layers / fla.models, which import transformers
# at `import fla` (seconds of the session) and are not timed. fla-core 0.6.0 asks for torch >= 2.7 and
# triton >= 3.3, so it runs on the device's torch 2.11 / triton 3.6.
# Versions are pinned to what the development venv runs, so both machines run the same code; one version
# of each, since two stop the device's `pip install --no-deps`.
set -eu
cd "$(dirname "$0")/.."
PIP=${1:-python3 -m pip}
WHEELS=(
  lark==1.3.1 optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 Mako==1.4.3 SQLAlchemy==2.1.9 greenlet==3.3.1
  fla-core==0.6.0
)
grep -qx '/.whl/' .gitignore || { echo "/.whl/ is not in .gitignore: the wheels would be committed" >&2; exit 1; }
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086  # PIP is a command line
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -1 .whl
echo "$(find .whl -type f -name '*.whl' | wc -l) wheels, $(du -sk .whl | cut -f1) KiB in .whl/ (the device takes 64 MiB in all)"
