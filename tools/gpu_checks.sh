#!/usr/bin/env bash
# Every GPU check in one call, for a machine lent for minutes (see ../shared/gpu/README.md): the GPU
# tests, the benchmark against its peers, the decode step with and without a codec, and torch.compile's
# gain on the stock forward. Each step runs under its own timeout and writes its log and JSON to $OUT as
# it ends, so a step that overruns loses nothing measured before it. Run from the project's root (the bundle's /tmp/proj):
#   OUT=$OUT bash tools/gpu_checks.sh                         # on the GPU machine
#   DEVICE=cpu MINUTES=0.5 COMPILED_MINUTES=0.5 OUT=/tmp/dry bash tools/gpu_checks.sh  # the dry run, on a CPU
set -u
OUT=${OUT:-out/gpu-checks}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-360}
STAND_IN=${STAND_IN:-8000}  # audio s/s: about the model code's speed on an H200 in bf16
COMPILED_MINUTES=${COMPILED_MINUTES:-30}
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: run it, log its exit status and time in steps.log
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - started)) s" | tee -a "$OUT/steps.log"
}

{ git rev-parse HEAD 2>/dev/null || echo "no git"; nvidia-smi 2>&1 | head -15; nproc; } >"$OUT/machine.txt"
if [ "$DEVICE" = cuda ]; then
    step gpu-tests 240 python -m pytest -m gpu -q -p no:cacheprovider
fi
step benchmark 330 python -m jobs.benchmark --device "$DEVICE" --minutes "$MINUTES" --stage-alone \
    --decode-ceiling --stand-in "$STAND_IN" --json "$OUT/benchmark.json"
step decode-split 150 python -m jobs.benchmark --device "$DEVICE" --minutes "$MINUTES" \
    --skip seed hf-pipeline model --decode-ceiling --set decode.function=jobs.stand_in:silent_decode \
    --json "$OUT/decode-split.json"
# Last, as the least needed: what torch.compile gives the stock forward (bare-forward-compiled/bare-forward),
# on a shorter corpus, since its compiles dominate.
step compiled 240 python -m jobs.benchmark --device "$DEVICE" --minutes "$COMPILED_MINUTES" --skip seed hf-pipeline \
    --compiled --json "$OUT/compiled.json"
