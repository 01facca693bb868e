#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels the lent GPU machine's image lacks (open_clip and
# ftfy; it has torch, transformers, timm, accelerate) into .whl/ (git-ignored), for eval/gpu_bench.sh.
# The GPU image runs Python 3.12; these are pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
ls -la .whl
