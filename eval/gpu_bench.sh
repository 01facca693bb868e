#!/usr/bin/env bash
# Run on a GPU machine with the wheels from eval/gpu_wheels.sh in .whl/ (the device tool:
# run(command="bash eval/gpu_bench.sh", carry=[".whl"])). Installs them beside the image's torch, runs
# the correctness tests that touch the GPU paths, then the benchmark at GPU sizes; the log and the JSON
# line go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# The fast paths against the straightforward ones, now on the GPU (the tests pick CUDA when it is there).
CAPTIONER_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_jpeg.py 2>&1 | tee "$out/check.log"
python3 eval/bench.py --batch-sizes 1,32,256,1024 --hf-max-batch 256 "$@" 2>&1 | tee "$out/bench.log"
