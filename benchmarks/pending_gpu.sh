#!/usr/bin/env bash
# The H200 checks and measurements that session 20 left pending (closing note of stop 20), as one device call of
# at most ~9 minutes on a cold machine (fla compiles ~2-5 min). Logs and tables go to $OUT (default ./out).
# Usage (repository root, fla wheels in .whl/): bash benchmarks/pending_gpu.sh [part]   part: tests | bench | all
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
part=${1:-all}
if [ "$part" = tests ] || [ "$part" = all ]; then
  # the softmax kernels after the helper refactor, the generation path (two captured steps, fla's fused decode
  # step, the split-KV read), the fused modules (pending since stop 19)
  NATSL_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore \
    tests/gpu/test_softmax_gpu.py -k "triton" 2>&1 | tail -n 5 | tee "$OUT/tests_softmax.txt"
  NATSL_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore \
    tests/gpu/test_generation_gpu.py tests/gpu/test_fused_gpu.py -k "not torchrun" 2>&1 | tail -n 15 | tee "$OUT/tests_gen_fused.txt"
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  timeout 150 python3 benchmarks/probe_triton_configs.py 2>&1 | grep -E "BEST|DQ_ATOMIC" | tee "$OUT/probe.txt"
  timeout 120 python3 benchmarks/bench_decode_read.py --out "$OUT/decode_read.md" 2>&1 | tail -n 10
  timeout 200 python3 benchmarks/profile_layer.py --shape 8x4096 --fla-hopper-bypass --out "$OUT/profile_layer.md" \
    2>&1 | tail -n 80
fi
