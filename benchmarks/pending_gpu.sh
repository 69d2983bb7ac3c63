#!/usr/bin/env bash
# The H200 checks and measurements left pending at the end of session 22 (closing note of stop 23), as device calls
# of at most ~9.5 minutes each. Logs and tables go to $OUT (default ./out). Run the parts back to back (the next call
# within the device's idle limit) so that the Triton disk cache of the first call's compiles is reused.
# Usage (repository root, fla wheels in .whl/): bash benchmarks/pending_gpu.sh PART
#   prefill the 128k and 32k prefill of the 340M models with the routers forced to 12.5%, alone in the process and on
#           the GPU (session 22's run had the GPU tests beside it), after session 22's prefill changes (a chunk
#           writes only its softmax blocks, router sums without index_add, block counts scanned along the last dim)
#   decode  the decode read alone (sdpa vs the split-KV kernel, whose range merge is one kernel since session 22
#           instead of ~12 torch ops), then decode of the 340M models at 128k and 32k with both reads, after the
#           dtype-grouped state copy of GraphDecoder (not measured in session 22)
#   tests   the GPU tests of the softmax kernels, the generation path (decode step trimmed in session 22) and the
#           fused modules
#   profile the kernels of the NAtS-L and GDN layers' prefill at 128k
# Every command prints its rows as they come (no `| tail`: a timeout keeps what was printed).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
part=${1:?part: prefill | decode | tests | profile}
case "$part" in
prefill)
  timeout 400 python3 benchmarks/bench_model.py --prefill --shapes 1x131072,1x32768 --models hybrid,fla_gdn,softmax \
    --steps 5 --out "$OUT/prefill.md" 2>&1 | grep -v Warning
  ;;
decode)
  timeout 100 python3 benchmarks/bench_decode_read.py --out "$OUT/decode_read.md"
  OUT=$OUT timeout 440 python3 benchmarks/bench_generation.py --models --no-layers --contexts 131072 32768 --batch 1 \
    --decode-attention sdpa triton --linear-impl auto 2>&1 | grep -v Warning
  ;;
tests)
  NATSL_TEST_DEVICE=cuda timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore -rfE \
    tests/gpu/test_softmax_gpu.py tests/gpu/test_generation_gpu.py tests/gpu/test_fused_gpu.py 2>&1 | tee "$OUT/tests.txt"
  ;;
profile)
  timeout 300 python3 benchmarks/profile_layer.py --prefill --shape 1x131072 --rows 25 --fla-hopper-bypass \
    --out "$OUT/profile_prefill.md"
  ;;
*) echo "unknown part $part"; exit 2 ;;
esac
