#!/usr/bin/env bash
# Issue 10's measurement on a machine with two (or more) GPUs: a slice split over two
# GPUs whose --gpu-mem each holds 60% of it (plus the planner's per-GPU margin), against
# the same slice on one GPU with the same total budget (so the comparison is the layer
# split itself, not the budget); then at 60% flat, where some experts stay on the host.
#
#   scripts/bench-split.sh [SLICE] [bench args...]     (GPU machine; default S8, -p 512,4096 -n 128 -r 3)
#
# The slice is built as scripts/bench-slice.sh builds it ($SLICES, default /tmp/mxr-slices).
set -euo pipefail
cd "$(dirname "$0")/.."
MXR=${MXR:-carry/gpu/mxr}
SLICES=${SLICES:-/tmp/mxr-slices}
slice=${1:-S8}
shift || true
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-p 512,4096 -n 128 -r 3)
n=$(nvidia-smi -L | wc -l)
[ "$n" -ge 2 ] || { echo "bench-split: $n GPU(s) here; this needs two" >&2; exit 2; }
# builds the slice if needed (a zero-length run of the bench)
MXR=$MXR scripts/bench-slice.sh "$slice" -p 0 -n 0 -r 1 >/dev/null 2>&1 || true
gguf="$SLICES/$slice.gguf"
[ -f "$gguf" ] || { echo "bench-split: could not build $gguf" >&2; exit 1; }
gib=$(python3 -c "import os; print(round(os.path.getsize('$gguf') / 2**30, 2))")
# Each GPU's budget: 60% of the slice plus the 2 GiB the planner keeps free per GPU for
# activations and cuBLAS (GPU_MARGIN), so the two together hold the slice and one of them
# alone could not. The single GPU gets the same total.
each=$(python3 -c "print(round(0.6 * $gib + 2, 2))")
total=$(python3 -c "print(round(2 * $each, 2))")
"$MXR" bench --calibrate-devices >/dev/null
echo "== $slice: $gib GiB; two GPUs at --gpu-mem $each each, against one GPU at $total"
"$MXR" bench -m "$gguf" --gpus 0,1 --gpu-mem "$each" "${args[@]}"
"$MXR" bench -m "$gguf" --gpus 0 --gpu-mem "$total" "${args[@]}"
# 60% without the margin: each GPU leaves some experts in host memory (issue 7's offload)
low=$(python3 -c "print(round(0.6 * $gib, 2))")
echo "== $slice: two GPUs at --gpu-mem $low each (some experts in host memory)"
"$MXR" bench -m "$gguf" --gpus 0,1 --gpu-mem "$low" "${args[@]}"
