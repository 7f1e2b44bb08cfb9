#!/usr/bin/env bash
# Builds a benchmark slice of design.md (if not there yet) and runs `mxr bench` on it.
#   scripts/bench-slice.sh S8 [bench args...]      (mxr from $MXR, default carry/gpu/mxr)
# S8: 8 layers (7 lightning + 1 softmax), 8 experts, real shapes, q8_0 (lm_head bf16).
# S8q4: the same, q4_k. S2x32: lightning + softmax, 32 experts, Zipf routing, q4_k.
# Slices live in $SLICES (default /tmp/mxr-slices); the bf16 checkpoint is deleted after
# conversion to save disk.
set -euo pipefail
MXR=${MXR:-carry/gpu/mxr}
SLICES=${SLICES:-/tmp/mxr-slices}
name=$1
shift
mkdir -p "$SLICES"
gguf="$SLICES/$name.gguf"
if [ ! -f "$gguf" ]; then
    case "$name" in
    S8) synth=(--preset minimax-text-01 --layers 8 --experts 8) conv=(--type q8_0) ;;
    S8q4) synth=(--preset minimax-text-01 --layers 8 --experts 8) conv=(--type q4_k) ;;
    S2x32) synth=(--preset minimax-text-01 --pattern LS --experts 32 --router zipf:1.1) conv=(--type q4_k) ;;
    *) echo "unknown slice $name (S8, S8q4, S2x32)" >&2; exit 2 ;;
    esac
    # The bf16 checkpoint and the GGUF need ~40 GB together; the GPU machine's disk (64 GiB)
    # holds one such pair, so other slices (caches, rebuilt on demand) make room first.
    need_gb=45
    free_gb=$(df -P -BG "$SLICES" | awk 'NR == 2 { sub("G", "", $4); print $4 }')
    if [ "${free_gb:-0}" -lt "$need_gb" ]; then
        for old in "$SLICES"/*.gguf "$SLICES"/*-hf; do
            [ -e "$old" ] || continue
            echo "bench-slice: ${free_gb} GB free, removing the cached $old to build $name" >&2
            rm -rf "$old"
        done
    fi
    rm -rf "$SLICES/$name-hf"  # left by a run that stopped before converting
    "$MXR" synth -o "$SLICES/$name-hf" "${synth[@]}"
    "$MXR" convert "$SLICES/$name-hf" -o "$gguf" "${conv[@]}"
    rm -rf "$SLICES/$name-hf"
fi
"$MXR" bench -m "$gguf" "$@"
