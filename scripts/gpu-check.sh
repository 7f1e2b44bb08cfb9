#!/usr/bin/env bash
# GPU checks in two halves, since the GPU machine has no Rust toolchain:
#
#   scripts/gpu-check.sh build   (here)  build mxr and the GPU test binaries in release
#                                        and stage them in carry/gpu/ (git-ignored)
#   scripts/gpu-check.sh run     (there) run every staged GPU test with --ignored,
#                                        full logs to $OUT (or /tmp/gpu-check), and print
#                                        a table of every check last
#
# The tracked tree is ~39 MB of the device tool's 64 MiB carry limit and the staged binaries
# ~28 MB, so build also packs them into $STAGE.tar.xz (~6 MB): carry that one and `run`
# unpacks it: run(command="scripts/gpu-check.sh run", carry=["carry/gpu.tar.xz"]).
# A branch beside main: STAGE=carry/branch scripts/gpu-check.sh build (here, on the branch),
# then OUT=$OUT/branch STAGE=carry/branch scripts/gpu-check.sh run there, carrying both folders (the tracked
# tree is ~38 MB of the 64 MiB, so leave out what a run does not need).
set -euo pipefail
cd "$(dirname "$0")/.."
# STAGE=carry/other to stage and run a second build (a branch) beside carry/gpu.
STAGE=${STAGE:-carry/gpu}
# Test targets that hold GPU tests (each marked #[ignore = "needs a GPU"]).
TARGETS=(gpu_kernels gpu_matvec gpu_memory gpu_fused gpu_forward gpu_offload gpu_run)

build() {
    cargo build --release -p mxr
    mkdir -p "$STAGE"
    rm -f "$STAGE"/*
    cp target/release/mxr "$STAGE/mxr"
    for t in "${TARGETS[@]}"; do
        exe=$(cargo test --release --workspace --test "$t" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
        [ -n "$exe" ] || { echo "gpu-check: no test binary for $t" >&2; exit 1; }
        cp "$exe" "$STAGE/$t"
    done
    strip "$STAGE"/* 2>/dev/null || true
    tar -C "$(dirname "$STAGE")" -cJf "$STAGE.tar.xz" "$(basename "$STAGE")"
    ls -la "$STAGE" "$STAGE.tar.xz"
}

# the staged binaries come as $STAGE.tar.xz (python's lzma: the GPU machine may lack xz)
unpack() {
    [ ! -f "$STAGE.tar.xz" ] || [ -x "$STAGE/mxr" ] ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$STAGE.tar.xz" "$(dirname "$STAGE")"
}

run() {
    unpack
    local out=${OUT:-/tmp/gpu-check}
    mkdir -p "$out"
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export MXR_CACHE_DIR=${MXR_CACHE_DIR:-/tmp/mxr-cache}
    # the CLI's GPU tests (gpu_run) run the staged binary
    MXR_BIN=$(realpath "$STAGE/mxr")
    export MXR_BIN
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
    local status=0
    for t in "${TARGETS[@]}"; do
        [ -x "$STAGE/$t" ] || continue
        # Tests run from the repository root so fixture paths resolve.
        # a kernel that never finishes would hold the device call to its limit: stop a test
        # binary after MXR_TEST_TIMEOUT seconds (default 300) and say so
        local rc=0
        timeout "${MXR_TEST_TIMEOUT:-300}" "$STAGE/$t" --ignored --nocapture --test-threads 1 >"$out/$t.log" 2>&1 || rc=$?
        if [ $rc -ne 0 ]; then
            [ $rc -ne 124 ] || echo "FAILED: stopped after ${MXR_TEST_TIMEOUT:-300} s (a hung kernel?)" >>"$out/$t.log"
            status=1
        fi
        grep -E "^test result|FAILED|panicked" "$out/$t.log" | sed "s/^/$t: /" || true
    done
    echo
    printf '%-28s | %-44s | %-28s | %-7s | %s\n' check case error budget result
    grep -ho 'CHECK .*' "$out"/*.log | sed 's/^CHECK //' |
        awk -F' [|] ' '{ printf "%-28s | %-44s | %-28s | %-7s | %s\n", $1, $2, $3, $4, $5 }'
    return $status
}

case "${1:-}" in
build) build ;;
run) run ;;
unpack) unpack ;;
*) echo "usage: $0 build|run|unpack" >&2; exit 2 ;;
esac
