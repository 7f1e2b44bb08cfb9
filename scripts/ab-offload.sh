#!/usr/bin/env bash
# Issue 7: decode of S2x32 with experts in host memory, one build against others, runs
# interleaved in one device call (the host's rates differ from machine to machine, so
# only runs of one call compare). Build here with `scripts/gpu-check.sh build`; stage each
# other build as carry/NAME/mxr.xz (xz of a stripped binary); carry carry/gpu.tar.xz,
# carry/data/prompt.txt and those.
#
#   [CHECK_ONLY="gpu_memory gpu_offload"] [REPS=2] [AB_SET=...] [TL_SET=...] scripts/ab-offload.sh
#
# CHECK_ONLY: run only these GPU test targets of carry/gpu first (unset: all of them,
#   scripts/gpu-session.sh check; SKIP_CHECK=1: none).
# AB_SET: comma-separated runs "GiB BUILD [NAME=value...] [bench args...]": `mxr bench -p 0 -n 32 -r $REPS`
#   with --gpu-mem GiB and the slice's routing statistics (8.375 GiB holds 25% of the
#   experts, 9.875 50%, 11.375 75%). Default: 25% and 75%, carry/gpu against carry/alt.
# TL_SET: comma-separated "GiB WAY [BUILD]": the same with --cold-experts WAY --timeline
#   (each decode kernel's share of a step). The logs end up in $OUT/logs.tar.xz.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export MXR_CACHE_DIR=${MXR_CACHE_DIR:-/tmp/mxr-cache}
o=${OUT:-/tmp/ab-offload}
mkdir -p "$o"
t0=$(date +%s)
since() { echo "$(($(date +%s) - t0)) s"; }
AB=("8.375 gpu" "8.375 alt" "8.375 gpu" "8.375 alt" "11.375 gpu" "11.375 alt")
[ -z "${AB_SET:-}" ] || IFS=, read -ra AB <<<"$AB_SET"
TL=()
[ -z "${TL_SET:-}" ] || IFS=, read -ra TL <<<"$TL_SET"
if [ -n "${CHECK_ONLY:-}" ]; then
    scripts/gpu-check.sh unpack
    for t in carry/gpu/gpu_*; do [[ " $CHECK_ONLY " == *" $(basename "$t") "* ]] || rm -f "$t"; done
    OUT=$o/check scripts/gpu-check.sh run 2>&1 | grep -E "result|FAIL|panicked" | head -40
elif [ "${SKIP_CHECK:-0}" != 1 ]; then
    OUT=$o scripts/gpu-session.sh check >"$o/session.log" 2>&1
    tail -20 "$o/session.log"
else
    scripts/gpu-check.sh unpack
fi
echo "checked at $(since)"
for f in carry/*/mxr.xz; do
    [ -f "$f" ] || continue
    m=$(dirname "$f")
    [ -x "$m/mxr" ] || { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$m/mxr" && chmod +x "$m/mxr"; }
done
scripts/bench-slice.sh S2x32 --help >/dev/null 2>&1
g=/tmp/mxr-slices/S2x32.gguf st=/tmp/mxr-slices/S2x32-stats.json
[ -f "$st" ] || carry/gpu/mxr calibrate -m "$g" -f carry/data/prompt.txt -o "$st" --max-tokens 1024 >"$o/calibrate.log" 2>&1
# one set of rates (in the shared cache) for every build
carry/gpu/mxr bench --calibrate-devices >"$o/rates.log" 2>&1
grep -E "CPU expert|in place|both at once|host" "$o/rates.log" | head
echo "slice and rates at $(since)"
i=0
for v in "${AB[@]}"; do
    set -- $v
    i=$((i + 1)) b=$1 m=$2
    shift 2
    # leading NAME=value words: the run's environment
    envs=()
    while [ $# -gt 0 ] && [[ $1 == [A-Z_]*=* ]]; do envs+=("$1"); shift; done
    echo "== --gpu-mem $b ${envs[*]} carry/$m/mxr $* ($(since))"
    timeout 150 env "${envs[@]}" "carry/$m/mxr" bench -m "$g" --gpu-mem "$b" --expert-stats "$st" -p 0 -n 32 -r "${REPS:-2}" "$@" >"$o/ab-$i-$b-$m.log" 2>&1
    grep -hE "tg32|^host|cold experts|placement" "$o/ab-$i-$b-$m.log" | tail -5
done
for v in "${TL[@]}"; do
    set -- $v
    i=$((i + 1)) m=${3:-gpu}
    echo "== timeline --gpu-mem $1 --cold-experts $2 carry/$m/mxr ($(since))"
    timeout 120 "carry/$m/mxr" bench -m "$g" --gpu-mem "$1" --expert-stats "$st" --cold-experts "$2" -p 0 -n 32 -r 1 --timeline >"$o/tl-$i-$1-$2-$m.log" 2>&1
    grep -E "^timeline|^host tg|^\| .*(tg32|host_|flagged|split|combine|norm)" "$o/tl-$i-$1-$2-$m.log" | head -"${TL_LINES:-50}"
done
# one file back (the device tool returns a limited number of files)
tar -C "$o" -cJf /tmp/ab-offload-logs.tar.xz . && rm -rf "${o:?}"/* && mv /tmp/ab-offload-logs.tar.xz "$o/logs.tar.xz"
echo "done at $(since)"
