#!/usr/bin/env bash
# Parses and type-checks every kernel source for NVPTX with clang, as NVRTC would see it
# (common.cuh, plus formats.cuh, mma.cuh or rownorm.cuh where the Rust side prepends them), without the CUDA toolkit
# or a GPU: syntax and type errors in kernels/cuda show up in CI. The GPU tests
# (scripts/gpu-check.sh) remain the check that the kernels compute the right thing.
set -euo pipefail
cd "$(dirname "$0")/.."
CLANG=${CLANG:-clang++}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for f in kernels/cuda/*.cu; do
    name=$(basename "$f" .cu)
    hdr=""
    case "$name" in
    matvec | dequant) hdr=kernels/cuda/formats.cuh ;;
    moe) hdr="kernels/cuda/formats.cuh kernels/cuda/rownorm.cuh" ;;
    norm) hdr=kernels/cuda/rownorm.cuh ;;
    flash | flash_wgmma | lightning) hdr=kernels/cuda/mma.cuh ;;
    esac
    cat scripts/cuda-check-prelude.cuh kernels/cuda/common.cuh $hdr "$f" >"$tmp/$name.cu"
    if ! "$CLANG" -x cuda --cuda-device-only -nocudainc -nocudalib --cuda-gpu-arch=sm_80 -fsyntax-only \
        -Wno-unknown-cuda-version "$tmp/$name.cu" 2>"$tmp/$name.err"; then
        echo "cuda-check: $f:" >&2
        cat "$tmp/$name.err" >&2
        status=1
    fi
done
[ $status -eq 0 ] && echo "cuda-check: $(ls kernels/cuda/*.cu | wc -l) kernel sources parse"
exit $status
