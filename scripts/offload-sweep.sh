#!/usr/bin/env bash
# Issue 7's offload measurement: decode speed of a slice (default S2x32) with GPU budgets
# that hold 25%, 50% and 75% of its experts, against the issue's bound
# max(GPU time, cold-expert bytes per token / host read bandwidth), where GPU time is all
# experts on the GPU with as many sequences, and against all experts on the CPU
# (--cpu-moe). Budgets come from `mxr plan --parallel P` (the runner's own planner, with
# room for P sequences' KV caches and states), so each row holds the stated share of
# experts. PARALLEL lists the sequence counts (default "1 8": one sequence, and eight side
# by side with `mxr bench --parallel 8`). COLD=cpu|in-place|mixed passes --cold-experts to
# every row (default: auto). The last lines are a markdown table of every row.
#   [PARALLEL="1 8"] scripts/offload-sweep.sh [SLICE] [bench args...]   (GPU machine; mxr from $MXR)
set -euo pipefail
cd "$(dirname "$0")/.."
MXR=${MXR:-carry/gpu/mxr}
SLICES=${SLICES:-/tmp/mxr-slices}
name=${1:-S2x32}
shift || true
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-p 0 -n 32 -r 3)
[ -z "${COLD:-}" ] || args+=(--cold-experts "$COLD")
scripts/bench-slice.sh "$name" --help >/dev/null # builds the slice if needed
gguf="$SLICES/$name.gguf"
out=${OUT:-/tmp/offload-sweep}
mkdir -p "$out"
# the smallest budget (GiB, in 1/8 steps) at which the plan for P sequences holds at least
# `want` experts (planned as the runs will place them: experts read in place take pages)
budget_for() {
    python3 - "$MXR" "$gguf" "$stats" "$1" "${COLD:-auto}" "$2" <<'PY'
import json, subprocess, sys
mxr, gguf, stats, want, cold, p = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
def held(gib):
    r = subprocess.run([mxr, "plan", "-m", gguf, "--gpu-mem", str(gib), "--expert-stats", stats, "--json",
                        "--cold-experts", cold, "--parallel", p], capture_output=True, text=True)
    return json.loads(r.stdout)["experts_on_gpu"] if r.returncode == 0 else -1
lo, hi = 1, 8 * 1024
while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if held(mid / 8) >= want else (mid, hi)
print(hi / 8)
PY
}
# one bench: its decode record (JSON) to $out/NAME.json, its report to $out/NAME.log
bench() {
    local tag=$1
    shift
    "$MXR" bench -m "$gguf" "$@" "${args[@]}" --json >"$out/$tag.json" 2>"$out/$tag.log" || {
        echo "bench $tag failed:" >&2
        tail -5 "$out/$tag.log" >&2
        return 1
    }
    grep -E "^placement|^cold experts (read|shared)" "$out/$tag.log" | head -2 || true
    python3 - "$out/$tag.json" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.strip() and json.loads(l)["test"].startswith("tg")][-1]
print("%s: %.2f ± %.2f tokens/s" % (r["test"], r["avg_ts"], r["stddev_ts"]))
PY
}
# this machine's rates for the cold-expert cost model (docs/offload.md)
"$MXR" bench --calibrate-devices | tee "$out/rates.log" | grep -E "host memory read|both at once"
# routing statistics, so that the budgets keep the popular experts on the GPU
stats="$SLICES/$name-stats.json"
[ -f "$stats" ] || "$MXR" calibrate -m "$gguf" -f "${PROMPT:-carry/data/prompt.txt}" -o "$stats" --max-tokens 1024
total=$("$MXR" plan -m "$gguf" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["experts"])')
rows=()
for p in ${PARALLEL:-1 8}; do
    echo "== all experts on the GPU, $p sequence(s)"
    bench "all-x$p" --parallel "$p"
    for pct in 25 50 75; do
        gib=$(budget_for $((total * pct / 100)) "$p")
        echo "== $pct% of $total experts, $p sequence(s): --gpu-mem $gib"
        bench "$pct-x$p" --gpu-mem "$gib" --expert-stats "$stats" --parallel "$p"
        rows+=("$pct $p $gib")
    done
done
echo "== --cpu-moe"
bench cpu-moe --cpu-moe
# the table: each row against max(all on the GPU at as many sequences, cold bytes / host read)
python3 - "$out" "${rows[@]}" <<'PY'
import json, sys
out, rows = sys.argv[1], [r.split() for r in sys.argv[2:]]
def rec(tag):
    return [r for r in (json.loads(l) for l in open(f"{out}/{tag}.json") if l.strip()) if r["test"].startswith("tg")][-1]
cpu, half = rec("cpu-moe"), None
print("| experts on the GPU | sequences | --gpu-mem | tokens/s | ms/token | GPU time | cold bytes / host read | % of the bound |")
print("|---|---|---|---|---|---|---|---|")
for pct, p, gib in rows:
    r, gpu = rec(f"{pct}-x{p}"), rec(f"all-x{p}")
    gpu_s = 1.0 / gpu["avg_ts"]
    c = r.get("cold_experts") or {}
    cold_s = c.get("host_bound_seconds_per_token", 0.0)
    bound = max(gpu_s, cold_s)
    print(f"| {pct}% | {p} | {gib} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} | {1e3 / r['avg_ts']:.3f} | "
          f"{gpu_s * 1e3:.3f} ms | {c.get('bytes_per_token', 0) / 1e6:.1f} MB, {cold_s * 1e3:.3f} ms | {100 * r['avg_ts'] * bound:.1f}% |")
    if pct == "50" and p == "1":
        half = r["avg_ts"]
print(f"--cpu-moe: {cpu['avg_ts']:.2f} ± {cpu['stddev_ts']:.2f} tokens/s" +
      (f"; 50% of the experts on the GPU decodes {half / cpu['avg_ts']:.1f}x as fast" if half else ""))
PY
