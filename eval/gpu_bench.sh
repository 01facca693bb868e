#!/usr/bin/env bash
# Run on a GPU machine with the wheels from eval/gpu_wheels.sh in .whl/. Each step fits the device
# tool's 10-minute command limit, so run them as separate calls on the same warm machine, e.g.
#   run(command="bash eval/gpu_bench.sh tests", carry=[".whl"])
#   run(command="bash eval/gpu_bench.sh bf16", carry=[".whl"])     (then fp32, then rest)
# Steps:
#   tests   the decoding and JPEG tests on CUDA (fast paths against the plain ones; CUDA graphs, nvjpeg)
#   bf16    eval/bench.py decoding table in bf16: batch 1/32/256/1024, ours/compiled/HF/reference
#   fp32    the same in fp32 (each compiled batch size compiles once: 8 compiles a step)
#   rest    eval/bench.py end to end over 4,096 JPEGs and training (bf16 and fp32)
# Logs and the JSON lines go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
case "${1:-tests}" in
  tests) CAPTIONER_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_jpeg.py \
           2>&1 | tee "$out/check.log" ;;
  bf16|fp32) python3 eval/bench.py --precisions "$1" --batch-sizes 1,32,256,1024 --hf-max-batch 256 --skip-folder \
            --skip-train 2>&1 | tee "$out/decode_$1.log" ;;
  rest) python3 eval/bench.py --batch-sizes 1024 --precisions bf16 --skip-decode 2>&1 | tee "$out/rest.log" ;;
  *) echo "unknown step $1 (tests, bf16, fp32 or rest)" >&2; exit 2 ;;
esac
