#!/usr/bin/env bash
# The H200 checks and measurements left pending at the end of session 25 (closing note of stop 32) and run in session 26, as device calls
# of at most ~9.5 minutes each. Logs and tables go to $OUT (default ./out). Parts given together run one after the
# other (never side by side: GPU tests beside a timed benchmark spoil it); a part's timeout is sized for it alone and
# cold, so give several parts to one call only where their timeouts add up to less than the call's limit.
# Usage (repository root, fla wheels in .whl/): NATSL_GIT_SHA=<commit> bash benchmarks/pending_gpu.sh PART [PART ...]
# (the device's .git copy is the session's first commit; parts run in turn, in one call, reusing earlier compiles).
# Session 26 ran flaconfigs, coldstep, linbranchtests, eager, precompile; session 27 mamba2host, tuningtest, mqar4k,
# eager, linbranchtests; session 28 mamba2prof, eager, linbranchtests (and the first, side-by-side mqar4kh, which did
# not finish); session 29 mqar4kh (seeds 0-2); session 30 text4k, text4kh; session 31 launchhost, linbranchtests
# launchhost, eager (twice). Next: `TEXT_MODELS="hybrid linear softmax" text4k`; `autotune` (the SwiGLU
# choices exported, then the cold first step without their 58 unchosen candidates; commit $OUT/fla_configs'
# triton_autotune.json and $OUT/kernels.json).
#   prefill  the 128k and 32k prefill of the 340M models with the routers forced to 12.5% (issue 22's 5.4x: 5.40x in
#            session 24's one run); fla's autotuner tunes at 128k in each process (FLA_CACHE_RESULTS=0)
#   gentests the generation GPU tests session 24's call did not reach: greedy generate(), decode with no host sync,
#            GraphDecoder replays against eager decoding, the split-KV read (issue 22: exact on the GPU)
#   layer64k the NAtS-L layer (triton softmax backend) against the softmax layer at 1 x 65536, fwd+bwd (issue 21's
#            2.5x; the backward kernels read through tensor descriptors from 32k since session 24; session 24's
#            220 s limit ended in fla's cold compile)
#   orders   the three softmax kernels with block-major vs (batch, head)-major program order (`HEAD_MAJOR`; the
#            tiles a head's programs share stay in L2) and the dq kernel's in-kernel Delta (session 24, not yet run)
#   flaconfigs tune fla's kernels at the paper's training shape (8 x 4096) for the Hybrid and fla's GDN model and
#            export the choices (natsl.tuning) to $OUT/fla_configs: commit them as natsl/configs/fla/NVIDIA_H200/
#   coldstep the Hybrid's cold first training step at 8 x 4096 (fresh Triton and Inductor caches) reading natsl's
#            committed fla configurations instead of autotuning (issue 21: <= 90 s); `coldbase`: the same without them
#   precompile the cold first step with the Triton kernels compiled by parallel workers from a manifest the same call
#            records first (natsl.tuning.record_triton_compiles / precompile_triton_kernels)
#   autotune the choices of fla's plain-triton.autotune kernels exported, then the cold first step with them read
#            and the manifest's other kernels precompiled
#   tuningtest the GPU test of the Triton kernel manifest (recorded, precompiled by workers, loaded from the cache)
#   mamba2host the host time and CPU profile of mamba2's eager branch against plain fla (issue 19's last gap)
#   mqar4k   issue 23's MQAR at 4k with random pairs, natsl beside the layer hybrid, 1500 steps
#   mqar4kh  natsl with the budget on each head's mean (issue 23's best setting) at seeds $MQAR_SEEDS (default 1 2),
#            one after the other, and the router-margin split of each checkpoint
#   launchhost the host time of one launch: natsl's masked-chunk kernels, an fla kernel, an aten op; mamba2's eager
#            fwd+bwd at 1 x 16k taken apart on the host, function by function (issue 19)
#   text4k / text4kh issue 23's text run at 4k on the H200 (the four models; natsl with the head-scope budget)
#   mamba2prof the GPU kernels of mamba2's branch and of plain fla at 8 x 4096 and 1 x 65536
#   linbranchtests the linear branch's GPU tests (five backends in bf16 against float64, the no-host-sync layer step)
#   proftrain the kernels of the NAtS-L and GDN layers' training fwd+bwd at 1 x 65536 (what is left above the GDN
#            layer + softmax branch: issue 21's 64k layer needs <= 30.1 ms)
#   gaps     profile_layer.py --models: the 340M Hybrid's and fla GDN's 128k prefill kernels, idle gaps, host time
#   tests    every GPU test of the softmax kernels, the generation path and the fused modules (~10 min or more)
#   gputests the triton softmax-backend GPU tests (descriptor paths included) and all generation GPU tests
#            (gentests included)
#   decode   the decode read alone, then decode of the 340M models at 128k and 32k with both reads
#   eager    the linear branch's eager fwd+bwd against plain fla, call by call alternated (issue 19: gdn and mamba2
#            at 16k, 8 x 4k, 64k)
#   profile  the kernels of the NAtS-L and GDN layers' prefill at 128k
# Every command prints its rows as they come (no `| tail`: a timeout keeps what was printed).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
# compile caches inside the checkout (git-ignored): kept between back-to-back calls while the machine stays warm
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
# the 340M Hybrid's cold training step at 8 x 4096: fresh Triton and Inductor caches (nothing an earlier call of the
# session compiled is reused); args: time limit (s), timed steps, then more bench_model.py options
cold_hybrid() {
  local limit=$1 steps=$2
  shift 2
  TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) FLA_CACHE_RESULTS=0 timeout "$limit" python3 \
    benchmarks/bench_model.py --shapes 8x4096 --models hybrid --steps "$steps" --fla-hopper-bypass "$@" 2>&1 \
    | grep -v Warning
}
# `python3 -c "$NATSL_TRAIN" ARGS`: `natsl train` with fla's #640 guard bypassed (Triton 3.6 on Hopper; the CLI
# itself never does this)
NATSL_TRAIN="import sys; import fla.ops.common.chunk_o as m; m.TRITON_ABOVE_3_7_1=True; \
from natsl.train.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
# $OUT/fla_configs as one file (a call returns at most 8 files)
tar_configs() { tar -C "$OUT" -czf "$OUT/fla_configs.tgz" fla_configs && rm -r "$OUT/fla_configs"; }
# issue 23's best setting: the budget on each router head's mean (word-split where used)
HEAD_BUDGET="--router-budget 0.125 --router-budget-scope head --router-budget-weight 0.1"
# `natsl train` on the standard library's sources at 4k tokens, 2 layers of the 340M width, one model in its own process
# and run folder /tmp/NAME (the summary comes at the end of a process); args: NAME, time limit (s), model, then more
# train options; $OUT/NAME_summary.txt and $OUT/NAME.tgz (curves, routing maps; no checkpoints)
text4k_run() {
  local name=$1 limit=$2 model=$3
  shift 3
  FLA_CACHE_MODE=strict timeout "$limit" python3 -c "$NATSL_TRAIN" \
    --task text --data stdlib --seq-len 4096 --size 340m --layers 2 --models "$model" \
    --steps 1000 --batch-size 8 --lr 2e-3 --eval-every 100 --eval-examples 64 --device cuda --fla-configs auto \
    "$@" --out "/tmp/$name" --no-progress 2>&1 | grep -v Warning
  cp "/tmp/$name/summary.txt" "$OUT/${name}_summary.txt"
  tar -C /tmp -czf "$OUT/$name.tgz" --exclude=checkpoint "$name"
}
[ $# -ge 1 ] || { echo "part: prefill | gentests | layer64k | orders | flaconfigs | coldstep | proftrain | gaps | tests | gputests | decode | eager | profile | coldbase | linbranchtests | precompile | autotune | tuningtest | mamba2host | mqar4k | mamba2prof | mqar4kh | text4k | text4kh | launchhost"; exit 2; }
for part in "$@"; do
case "$part" in
gaps)
  FLA_CACHE_RESULTS=0 timeout 500 python3 benchmarks/profile_layer.py --prefill --shape 1x131072 --models hybrid,fla_gdn --rows 30 \
    --fla-hopper-bypass --out "$OUT/profile_models.md" 2>&1 | grep -v Warning
  ;;
prefill)
  FLA_CACHE_RESULTS=0 timeout 400 python3 benchmarks/bench_model.py --prefill --shapes 1x131072,1x32768 --models hybrid,fla_gdn,softmax \
    --steps 5 --out "$OUT/prefill.md" 2>&1 | grep -v Warning
  ;;
gentests)
  NATSL_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore -rfE --durations=0 \
    tests/gpu/test_generation_gpu.py -k "generate or no_host_sync or graph_decoder or split_kv" 2>&1 \
    | tee "$OUT/gentests.txt"
  ;;
layer64k)
  timeout 480 python3 benchmarks/bench_layer.py --T 65536 --providers natsl-gdn@triton,softmax \
    --fla-hopper-bypass 2>&1 | grep -v Warning | tee "$OUT/layer64k.txt"
  ;;
orders)
  timeout 420 python3 benchmarks/probe_triton_configs.py --shapes 1x131072,1x65536,8x4096 --kinds fwd,dq,dkdv \
    --stages 1,2 --warps 4 --orders 2>&1 | tee "$OUT/probe_orders.txt"
  ;;
flaconfigs)
  # the training shape only: the first step runs at 8 x 4096, so fla's autotuners choose there (their keys omit the
  # length; a prefill run at 128k would overwrite the forward kernels' entries with its own choice)
  FLA_CACHE_RESULTS=0 timeout 420 python3 benchmarks/bench_model.py --shapes 8x4096 --models hybrid,fla_gdn --steps 3 \
    --fla-hopper-bypass --export-fla-configs "$OUT/fla_configs" 2>&1 | grep -v Warning
  tar_configs
  ;;
coldstep)
  # the shipped entries read; the export adds whatever this run still autotuned (a kernel the committed set lacks)
  cold_hybrid 270 3 --fla-configs auto --export-fla-configs "$OUT/fla_configs"
  tar_configs
  ;;
coldbase)
  cold_hybrid 400 3
  ;;
precompile)
  # 1: fla configurations read, the Triton kernels the first step compiles recorded into a manifest;
  # 2: fresh caches again, the manifest's kernels compiled by parallel workers inside the first step's timing
  cold_hybrid 270 3 --fla-configs auto --record-triton "$OUT/kernels.json"
  cold_hybrid 270 3 --fla-configs auto --precompile "$OUT/kernels.json" --record-triton "$OUT/kernels_after.json"
  ;;
autotune)
  # (a) the shipped manifest precompiled, the Hybrid's first step, every autotuner's choice exported: fla's files and
  #     natsl's triton_autotune.json for fla's kernels under plain triton.autotune (SwiGLU: 30 candidates each)
  cold_hybrid 200 1 --fla-configs auto --precompile auto --export-fla-configs "$OUT/fla_configs"
  cp "$OUT/fla_configs/triton_autotune.json" natsl/configs/fla/NVIDIA_H200/
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['kernels']=[k for k in d['kernels'] if not \
k['name'].startswith('swiglu')]; json.dump(d, open(sys.argv[2], 'w'))" natsl/configs/triton/NVIDIA_H200/kernels.json \
    "$OUT/kernels_noswiglu.json"
  # (b) cold: every choice read, the manifest without the SwiGLU candidates precompiled, recorded anew
  cold_hybrid 200 3 --fla-configs auto --precompile "$OUT/kernels_noswiglu.json" --record-triton "$OUT/kernels.json"
  tar_configs
  ;;
tuningtest)
  NATSL_TEST_DEVICE=cuda timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore -rfE \
    tests/gpu/test_tuning_gpu.py 2>&1 | tee "$OUT/tuningtest.txt"
  ;;
mamba2host)
  timeout 400 python3 benchmarks/bench_linear_branch.py --backends mamba2 --cases 1x16384,8x4096 --fractions 0.125 \
    --host --out "$OUT/linear_branch_mamba2_host.md" 2>&1 | grep -v Warning
  ;;
launchhost)
  # issue 19: the host issue time of one launch of natsl's masked-chunk kernels against one fla kernel and one aten op,
  # then mamba2's eager fwd+bwd at 1 x 16k taken apart on the host (plain fla vs the branch, function by function)
  timeout 400 python3 benchmarks/bench_launch_host.py --breakdown mamba2:1x16384 --out "$OUT/launch_host.md" 2>&1 \
    | grep -v Warning
  ;;
mamba2prof)
  # issue 19's last gap: mamba2's branch kernel by kernel against plain fla where the call is GPU-bound
  timeout 400 python3 benchmarks/bench_linear_branch.py --backends mamba2 --cases 8x4096,1x65536 --fractions 0.125 \
    --profile --out "$OUT/linear_branch_mamba2_profile.md" 2>&1 | grep -v Warning
  ;;
mqar4kh)
  # issue 23: the budget on each router head's mean (--router-budget-scope head, weight 0.1; seed 0 in session 28)
  # at the seeds in $MQAR_SEEDS (default "1 2"; models $MQAR_MODELS, default natsl: `natsl,layer_hybrid` adds the
  # comparator, which has no router), one run after the other (session 28's four side by side did not
  # finish in 480 s), each followed by the router-margin split of its checkpoint (fla's shipped configurations, no
  # autotuning: session 28's 60 s limit ended in it). The first run on a fresh machine compiles fla's kernels cold:
  # 230 s did not suffice (session 29); 420 s leaves room for a second model
  for seed in ${MQAR_SEEDS:-1 2}; do
    # shellcheck disable=SC2086
    FLA_CACHE_MODE=strict timeout 420 python3 -c "$NATSL_TRAIN" \
      --task mqar --seq-len 4096 --num-kv-pairs 8 --vocab 64 --kv-at random --size 340m --layers 2 \
      --models "${MQAR_MODELS:-natsl}" --steps 1500 --batch-size 16 --lr 2e-3 --eval-every 150 --eval-examples 128 \
      --device cuda --fla-configs auto $HEAD_BUDGET --seed "$seed" --out "/tmp/mqar4kh$seed" --no-progress 2>&1 \
      | grep -v Warning
    for f in summary.txt history.csv; do cp "/tmp/mqar4kh$seed/$f" "$OUT/mqar4kh${seed}_$f"; done
    FLA_CONFIG_DIR=$PWD/natsl/configs/fla/NVIDIA_H200 FLA_CACHE_MODE=full timeout 150 python3 \
      benchmarks/router_logits.py "/tmp/mqar4kh$seed" --device cuda --examples 16 2>&1 | grep -v Warning \
      | tee "$OUT/router_logits_head_seed$seed.md"
  done
  ;;
text4k)
  # issue 23 item 3 on the H200: the Python standard library's sources (python3 3.12 there), the models in
  # $TEXT_MODELS (default: the four) at equal steps, one process each (session 30's one process for four wrote nothing
  # before its 540 s limit); the paper's routers (no budget)
  for model in ${TEXT_MODELS:-natsl hybrid linear softmax}; do
    text4k_run "text4k_$model" "${TEXT_TIMEOUT:-240}" "$model"
  done
  ;;
text4kh)
  # the same text run for natsl with issue 23's best MQAR setting
  # shellcheck disable=SC2086
  text4k_run text4kh 220 natsl $HEAD_BUDGET
  ;;
mqar4k)
  # issue 23: MQAR at T = 4096 with the pairs at random positions, 2 layers of the 340M width, natsl (the paper's
  # setting: no budget) beside the layer hybrid, three times session 21's 500 steps (where only the Transformer left
  # chance); per-head routing in the summary, curves and routing maps in $OUT/mqar4k.tgz
  FLA_CACHE_MODE=strict timeout 560 python3 -c "$NATSL_TRAIN" \
    --task mqar --seq-len 4096 --num-kv-pairs 8 --vocab 64 --kv-at random --size 340m --layers 2 \
    --models natsl,layer_hybrid --steps 1500 --batch-size 16 --lr 2e-3 --eval-every 150 --eval-examples 128 \
    --device cuda --fla-configs auto --out /tmp/mqar4k --no-progress 2>&1 | grep -v Warning
  # the run folder without its checkpoints (a call returns at most 8 files)
  cp /tmp/mqar4k/summary.txt "$OUT/mqar4k_summary.txt"; tar -C /tmp -czf "$OUT/mqar4k.tgz" --exclude=checkpoint mqar4k
  ;;
linbranchtests)
  NATSL_TEST_DEVICE=cuda timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore -rfE --durations=0 \
    tests/gpu/test_linear_branch_gpu.py 2>&1 | tee "$OUT/linbranchtests.txt"
  ;;
proftrain)
  timeout 400 python3 benchmarks/profile_layer.py --shape 1x65536 --rows 40 --fla-hopper-bypass \
    --out "$OUT/profile_train_1x65536.md" 2>&1 | grep -v Warning
  ;;
gputests)
  # four pytest processes side by side (correctness only, nothing timed): their cold compiles overlap
  i=0
  for sel in "tests/gpu/test_softmax_gpu.py -k triton" \
             "tests/gpu/test_generation_gpu.py -k layer_cache" \
             "tests/gpu/test_generation_gpu.py -k graph_decoder" \
             "tests/gpu/test_generation_gpu.py -k generate_greedy or no_host_sync or split_kv"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    NATSL_TEST_DEVICE=cuda timeout 520 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore -rfE --durations=0 \
      ${sel%% -k *} -k "${sel#* -k }" > "$OUT/gputests_$i.txt" 2>&1 &
  done
  wait
  for f in "$OUT"/gputests_*.txt; do echo "== $f"; cat "$f"; done
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
eager)
  timeout 420 python3 benchmarks/bench_linear_branch.py --backends gdn,mamba2 --cases 1x16384,8x4096,1x65536 \
    --interleaved 200 \
    --out "$OUT/linear_branch_eager.md" 2>&1 | grep -v Warning
  ;;
profile)
  timeout 300 python3 benchmarks/profile_layer.py --prefill --shape 1x131072 --rows 25 --fla-hopper-bypass \
    --out "$OUT/profile_prefill.md"
  ;;
*) echo "unknown part $part"; exit 2 ;;
esac
done
