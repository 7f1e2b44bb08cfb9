#!/usr/bin/env bash
# Issue 7's offload measurement: decode speed of a slice (default S2x32) with GPU budgets
# that hold about 25%, 50% and 75% of its experts, against all experts on the GPU and all
# on the CPU (--cpu-moe). Budgets come from `mxr plan` (the runner's own planner), so each
# row holds the stated share of experts. COLD=cpu|in-place|mixed passes --cold-experts to
# every row (default: auto, which reads cold experts in place or shares them with the CPU
# as the calibrated rates say, and computes them on the CPU with --cpu-moe).
#   scripts/offload-sweep.sh [SLICE] [bench args...]     (GPU machine; mxr from $MXR)
set -euo pipefail
cd "$(dirname "$0")/.."
MXR=${MXR:-carry/gpu/mxr}
SLICES=${SLICES:-/tmp/mxr-slices}
name=${1:-S2x32}
shift || true
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-p 0 -n 64 -r 3)
[ -z "${COLD:-}" ] || args+=(--cold-experts "$COLD")
scripts/bench-slice.sh "$name" --help >/dev/null  # builds the slice if needed
gguf="$SLICES/$name.gguf"
# the smallest budget (GiB, in 1/8 steps) at which the plan holds at least `want` experts
# (planned as the runs will place them: experts read in place take whole pages)
budget_for() {
    python3 - "$MXR" "$gguf" "$stats" "$1" "${COLD:-auto}" <<'PY'
import json, subprocess, sys
mxr, gguf, stats, want, cold = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def held(gib):
    r = subprocess.run([mxr, "plan", "-m", gguf, "--gpu-mem", str(gib), "--expert-stats", stats, "--json",
                        "--cold-experts", cold], capture_output=True, text=True)
    return json.loads(r.stdout)["experts_on_gpu"] if r.returncode == 0 else -1
lo, hi = 1, 8 * 1024
while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if held(mid / 8) >= want else (mid, hi)
print(hi / 8)
PY
}
# this machine's rates for the cold-expert cost model (docs/offload.md)
"$MXR" bench --calibrate-devices
# routing statistics, so that the budgets keep the popular experts on the GPU
stats="$SLICES/$name-stats.json"
[ -f "$stats" ] || "$MXR" calibrate -m "$gguf" -f "${PROMPT:-carry/data/prompt.txt}" -o "$stats" --max-tokens 1024
total=$("$MXR" plan -m "$gguf" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["experts"])')
for pct in 25 50 75; do
    gib=$(budget_for $((total * pct / 100)))
    echo "== $pct% of $total experts: --gpu-mem $gib"
    "$MXR" bench -m "$gguf" --gpu-mem "$gib" --expert-stats "$stats" "${args[@]}"
done
echo "== all experts on the GPU"
"$MXR" bench -m "$gguf" "${args[@]}"
echo "== --cpu-moe"
"$MXR" bench -m "$gguf" --cpu-moe "${args[@]}"
