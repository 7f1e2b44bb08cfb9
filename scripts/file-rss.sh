#!/usr/bin/env bash
# Issue 7: how much of a model file a command keeps mapped in while it runs (the Rss of the
# file's entries in /proc/PID/smaps, sampled every half second): the samples' maximum and
# the last one. For runs of builds that do not print it themselves ("host memory after
# the runs" in mxr bench).
#   FILE=/tmp/mxr-slices/S2x32.gguf scripts/file-rss.sh carry/alt/mxr bench -m "$FILE" ...
set -u
g=$(readlink -f "${FILE:-/tmp/mxr-slices/S2x32.gguf}")
log=${LOG:-/tmp/file-rss-run.log}
"$@" >"$log" 2>&1 &
pid=$!
max=0 last=0 n=0
while kill -0 $pid 2>/dev/null; do
    r=$(awk -v f="$g" '/^[0-9a-f]+-[0-9a-f]+ / {inside = ($6 == f)} inside && $1 == "Rss:" {s += $2} END {print s + 0}' /proc/$pid/smaps 2>/dev/null)
    if [ -n "$r" ] && [ "$r" -gt 0 ]; then
        last=$r n=$((n + 1))
        [ "$r" -gt "$max" ] && max=$r
    fi
    sleep 0.5
done
wait $pid
rc=$?
echo "file mapping Rss: max $((max / 1024)) MiB, last $((last / 1024)) MiB ($n samples); exit $rc"
grep -E "tg[0-9]|host memory" "$log" | tail -2
exit $rc
