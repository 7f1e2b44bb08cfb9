#!/usr/bin/env bash
# Everything a GPU session measures, in one device call (build here first with
# `scripts/gpu-check.sh build`; carry carry/gpu.tar.xz and carry/data/prompt.txt):
#
#   scripts/gpu-session.sh [STEP...]      (GPU machine; full logs under $OUT or /tmp/gpu-session)
#
# Steps, in order (default: all but depth1m):
#   check      the GPU tests (scripts/gpu-check.sh run)                       ~1 min
#   kernels    mxr bench --kernels (the host group too: the round trip to the host
#              worker)                                                        ~20 s
#   ncu        Nsight Compute on kernels of --kernels --kernel-group $MXR_NCU_GROUP
#              (default attention) whose names match $MXR_NCU_KERNELS (a regex; default
#              the prefill attention kernels): speed of light, occupancy, stalls  ~1 min
#   s8         S8 q8_0: pp512, pp4096, tg128, 5 reps (synth + convert ~75 s)  ~3 min
#   s8q4       S8 q4_k: pp4096, tg128                                         ~3 min
#   depth      S8: prefill to 131,072 tokens, decode 128 there, 1 rep         ~1 min
#   offload    S2x32 offload sweep with --calibrate-devices (--cold-experts auto) ~3 min
#   offload-cpu  the same sweep with the CPU computing cold experts (--cold-experts cpu;
#              its bench lines count the cold experts each token used)         ~3 min
#   offload-mixed  the same sweep with each cold expert shared between in-place reads and
#              the CPU (--cold-experts mixed, --cpu-moe too), decode only ~3 min
#   in-place   the same sweep with cold experts read in place by the GPU from host
#              pages mapped into the expert stacks, --cpu-moe too (--cold-experts
#              in-place)                                                      ~3 min
#   depth1m    S8: prefill to 1,048,576 tokens and decode there (issue 8)     minutes
#   depth1m-q8 the same with --kv-type q8_0                                   minutes
#   tune       S8 and S8q4 tg128 over the matrix-vector launch shape (MXR_MATVEC_ROWS x
#              MXR_MATVEC_WARPS; default 2 x 4)                                 ~6 min
#   tune-kernels  mxr bench --kernels --kernel-group matvec over MXR_MATVEC_ROWS x
#              MXR_MATVEC_WARPS x MXR_MATVEC_UNROLL (each type's
#              matrix-vector products alone)                                     ~2 min
#   matvec-check  the matrix-vector GPU tests under those variants              ~1 min
#   pair       S8 and S8q4 tg128 with MXR_MATVEC_PAIR=0 against the default, interleaved
#   stage      matrix-vector products from shared memory: mxr bench --kernels
#              --kernel-group matvec over "STAGE ROWS WARPS" (MXR_MATVEC_*, Q8_0's shape
#              too; a ;-separated list in $MXR_STAGE_SET), then S8 and S8q4 tg128 with
#              MXR_MATVEC_STAGE=$MXR_STAGE (default 3; EARLY 1 and 0) against 0,
#              interleaved                                                    ~9 min
#   timeline   $MXR_TIMELINE_SLICES (default S8 and S8q4): mxr bench -n 32 --timeline
#              (each decode kernel's share of a step inside the graph, kernels built
#              with time stamps), and with MXR_TIMELINE_EARLY=1 S8q4 again with
#              MXR_MATVEC_EARLY=1                                             ~4 min
#   timeline-offload  S2x32 --timeline with host experts: mixed at 25% and 75% of the
#              experts on the GPU (share $MXR_MIXED_GPU_SHARE, default 0.42), and in place
#              at 75%; compare each step's kernel span with the host's blocked-on-GPU time
#              (issue 7: a mixed step's ~85 us outside its kernels)           ~4 min
#   split      S8 and S8q4 tg128 ($MXR_SPLIT_SLICES) with the decode step's lm_head in two
#              launches, the first half's logits copied out meanwhile (MXR_LOGITS_SPLIT=1),
#              against one launch, interleaved                             ~5 min
#   fuse       S8 tg128 over MXR_FUSE (decode's fusions, a bit set: 1 router + top-k,
#              4 combine in the norm, 8 the MoE norm in the router; default 13), over
#              $MXR_FUSE_SET (default 13 5 13 5), interleaved              ~4 min
#   ab         tg128 with carry/gpu/mxr against carry/alt/mxr (another build staged by
#              hand, e.g. the last commit; or carry/alt/mxr.xz, compressed), interleaved
#              twice, on each slice of $MXR_AB_SLICES (default S8q4)       ~3 min a slice
#   ab-cpu     the CPU's work, carry/alt/mxr against carry/gpu/mxr, interleaved twice:
#              the CPU expert rate (--calibrate-devices; carry/gpu/mxr's rates are the ones
#              saved), S2x32 tg64 with --cpu-moe computed on the CPU (--cold-experts cpu),
#              S2x32 tg8 on the CPU alone (--device cpu), and the nano model's pp128 and
#              tg64 on the CPU                                                   ~5 min
# Each step prints its table last; a failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export MXR_CACHE_DIR=${MXR_CACHE_DIR:-/tmp/mxr-cache}
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
scripts/gpu-check.sh unpack
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(check kernels s8 s8q4 depth offload)
status=0
# carry/alt/mxr (the build an A/B step compares against) may come xz-compressed
# (carry/alt/mxr.xz) to fit the carry limit
unpack_alt() {
    [ -x carry/alt/mxr ] || [ ! -f carry/alt/mxr.xz ] || { python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open("carry/alt/mxr.xz"), open("carry/alt/mxr", "wb"))' && chmod +x carry/alt/mxr; }
}
for s in "${steps[@]}"; do
    echo "== $s ($(date -u +%H:%M:%S))"
    case "$s" in
    check) OUT="$out" scripts/gpu-check.sh run >"$out/check.log" 2>&1 ;;
    kernels) timeout 300 carry/gpu/mxr bench --kernels >"$out/kernels.log" 2>&1 ;;
    ncu)
        ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
        "$ncu" --clock-control none -k "regex:${MXR_NCU_KERNELS:-flash_(wg2?_)?bf16_128}" -c "${MXR_NCU_COUNT:-6}" \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis \
            --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
            carry/gpu/mxr bench --kernels --kernel-group "${MXR_NCU_GROUP:-attention}" >"$out/ncu.log" 2>&1
        ;;
    s8) scripts/bench-slice.sh S8 -p 512,4096 -n 128 -r 5 >"$out/s8.log" 2>&1 ;;
    s8q4) scripts/bench-slice.sh S8q4 -p 4096 -n 128 -r 5 >"$out/s8q4.log" 2>&1 ;;
    depth) scripts/bench-slice.sh S8 -p 0 -n 128 -d 131072 -r 1 -b 8192 >"$out/depth.log" 2>&1 ;;
    depth1m) scripts/bench-slice.sh S8 -p 0 -n 128 -d 1048576 -r 1 -b 8192 >"$out/depth1m.log" 2>&1 ;;
    depth1m-q8) scripts/bench-slice.sh S8 -p 0 -n 128 -d 1048576 -r 1 -b 8192 --kv-type q8_0 >"$out/depth1m-q8.log" 2>&1 ;;
    offload) scripts/offload-sweep.sh S2x32 -p 512 -n 64 -r 3 >"$out/offload.log" 2>&1 ;;
    offload-cpu) COLD=cpu scripts/offload-sweep.sh S2x32 -p 512 -n 64 -r 3 >"$out/offload-cpu.log" 2>&1 ;;
    offload-mixed) COLD=mixed scripts/offload-sweep.sh S2x32 -p 0 -n 64 -r 3 >"$out/offload-mixed.log" 2>&1 ;;
    in-place) COLD=in-place scripts/offload-sweep.sh S2x32 -p 512 -n 64 -r 3 >"$out/in-place.log" 2>&1 ;;
    tune)
        for slice in S8 S8q4; do
            for rows in 1 2 4; do
                for warps in 4 8 16; do
                    echo "== $slice rows $rows warps $warps"
                    MXR_MATVEC_ROWS=$rows MXR_MATVEC_WARPS=$warps scripts/bench-slice.sh "$slice" -p 0 -n 128 -r 3
                done
            done
        done >"$out/tune.log" 2>&1
        ;;
    tune-kernels)
        for rows in 1 2 4; do
            for warps in 4 8; do
                for unroll in 1 2; do
                    echo "== rows $rows warps $warps unroll $unroll"
                    MXR_MATVEC_ROWS=$rows MXR_MATVEC_WARPS=$warps MXR_MATVEC_UNROLL=$unroll \
                        carry/gpu/mxr bench --kernels --kernel-group matvec
                done
            done
        done >"$out/tune-kernels.log" 2>&1
        ;;
    matvec-check)
        export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} MXR_CACHE_DIR=${MXR_CACHE_DIR:-/tmp/mxr-cache}
        for v in "2 4 2" "2 4 1" "1 4 1" "4 4 2" "2 8 1"; do
            set -- $v
            echo "== rows $1 warps $2 unroll $3"
            MXR_MATVEC_ROWS=$1 MXR_MATVEC_WARPS=$2 MXR_MATVEC_UNROLL=$3 \
                carry/gpu/gpu_matvec --ignored --nocapture --test-threads 1 matvec
        done >"$out/matvec-check.log" 2>&1
        ;;
    pair)
        for slice in S8 S8q4; do
            for p in 1 0 1 0; do
                echo "== $slice MXR_MATVEC_PAIR=$p"
                MXR_MATVEC_PAIR=$p scripts/bench-slice.sh "$slice" -p 0 -n 128 -r 3
            done
        done >"$out/pair.log" 2>&1
        ;;
    stage)
        IFS=';' read -ra variants <<<"${MXR_STAGE_SET:-0 2 4;2 2 4;3 2 4;4 2 4;3 2 8}"
        for v in "${variants[@]}"; do
            set -- $v
            echo "== STAGE=$1 ROWS=$2 WARPS=$3"
            export MXR_MATVEC_STAGE=$1 MXR_MATVEC_ROWS=$2 MXR_MATVEC_WARPS=$3 MXR_MATVEC_Q8_ROWS=$2 MXR_MATVEC_Q8_WARPS=$3
            carry/gpu/mxr bench --kernels --kernel-group matvec
            unset MXR_MATVEC_STAGE MXR_MATVEC_ROWS MXR_MATVEC_WARPS MXR_MATVEC_Q8_ROWS MXR_MATVEC_Q8_WARPS
        done >"$out/stage.log" 2>&1
        st=${MXR_STAGE:-3}
        for slice in ${MXR_STAGE_SLICES:-S8 S8q4}; do
            for v in "$st 1" "0 1" "$st 0" "$st 1" "0 1" "$st 0"; do
                set -- $v
                echo "== $slice MXR_MATVEC_STAGE=$1 MXR_MATVEC_EARLY=$2"
                MXR_MATVEC_STAGE=$1 MXR_MATVEC_EARLY=$2 scripts/bench-slice.sh "$slice" -p 0 -n 128 -r 3
            done
        done >>"$out/stage.log" 2>&1
        ;;
    timeline)
        {
            for slice in ${MXR_TIMELINE_SLICES:-S8 S8q4}; do
                echo "== $slice --timeline"
                scripts/bench-slice.sh "$slice" -p 0 -n 32 -r 1 --timeline
            done
            # and, with MXR_TIMELINE_EARLY=1, the early-chunk variant that measured slower
            # (tenth session), to see where
            if [ "${MXR_TIMELINE_EARLY:-0}" = 1 ]; then
                echo "== S8q4 --timeline MXR_MATVEC_EARLY=1"
                MXR_MATVEC_EARLY=1 scripts/bench-slice.sh S8q4 -p 0 -n 32 -r 1 --timeline
            fi
        } >"$out/timeline.log" 2>&1
        ;;
    timeline-offload)
        {
            scripts/bench-slice.sh S2x32 --help >/dev/null
            g=/tmp/mxr-slices/S2x32.gguf st=/tmp/mxr-slices/S2x32-stats.json
            [ -f "$st" ] || carry/gpu/mxr calibrate -m "$g" -f carry/data/prompt.txt -o "$st" --max-tokens 1024
            # the budgets that hold 25% and 75% of S2x32's experts in pages (offload-sweep.sh)
            for v in "8.375 mixed" "11.375 mixed" "11.375 in-place"; do
                set -- $v
                echo "== S2x32 --gpu-mem $1 --cold-experts $2 --timeline"
                MXR_MIXED_GPU_SHARE=${MXR_MIXED_GPU_SHARE:-0.42} timeout 120 carry/gpu/mxr bench -m "$g" --gpu-mem "$1" \
                    --expert-stats "$st" --cold-experts "$2" -p 0 -n 32 -r 1 --timeline
            done
        } >"$out/timeline-offload.log" 2>&1
        ;;
    split)
        for slice in ${MXR_SPLIT_SLICES:-S8 S8q4}; do
            for v in 1 0 1 0; do
                echo "== $slice MXR_LOGITS_SPLIT=$v"
                MXR_LOGITS_SPLIT=$v scripts/bench-slice.sh "$slice" -p 0 -n 128 -r 3
            done
        done >"$out/split.log" 2>&1
        ;;
    fuse)
        for f in ${MXR_FUSE_SET:-13 5 13 5}; do
            echo "== S8 MXR_FUSE=$f"
            MXR_FUSE=$f scripts/bench-slice.sh S8 -p 0 -n 128 -r 3
        done >"$out/fuse.log" 2>&1
        ;;
    ab)
        unpack_alt
        for slice in ${MXR_AB_SLICES:-S8q4}; do
            for m in gpu alt gpu alt; do
                echo "== $slice carry/$m/mxr"
                MXR=carry/$m/mxr scripts/bench-slice.sh "$slice" -p 0 -n 128 -r 5
            done
        done >"$out/ab.log" 2>&1
        ;;
    ab-cpu)
        unpack_alt
        for m in alt gpu alt gpu; do
            echo "== carry/$m/mxr"
            carry/$m/mxr bench --calibrate-devices
            MXR=carry/$m/mxr scripts/bench-slice.sh S2x32 -p 0 -n 64 -r 3 --cpu-moe --cold-experts cpu
            MXR=carry/$m/mxr scripts/bench-slice.sh S2x32 -p 0 -n 8 -r 2 --device cpu
            carry/$m/mxr bench --device cpu -p 128 -n 64 -r 3
        done >"$out/ab-cpu.log" 2>&1
        ;;
    *) echo "unknown step $s" >&2; status=2; continue ;;
    esac
    rc=$?
    [ $rc -eq 0 ] || { echo "step $s failed ($rc)"; status=1; }
    case "$s" in
    check) grep -E "FAIL|panicked|test result" "$out/check.log" ;;
    offload | offload-cpu | offload-mixed | in-place) grep -E "^==|placement|cost model|cold experts|host memory|host to GPU|CPU expert|GPU expert|both at once|pp512|tg64" "$out/$s.log" ;;
    ab) grep -E "^==|tg128|commit" "$out/ab.log" ;;
    ab-cpu) grep -E "^==|CPU expert|tg64|tg8|pp128" "$out/ab-cpu.log" ;;
    fuse) grep -E "^==|tg128" "$out/fuse.log" ;;
    split) grep -E "^==|tg128" "$out/split.log" ;;
    stage) grep -E "^==|tg128|^\| matvec.*(Q4_K|Q8_0)" "$out/stage.log" ;;
    timeline) grep -E "^==|^timeline|^\| " "$out/timeline.log" | head -90 ;;
    timeline-offload) grep -E "^==|^timeline|^host tg|^\| " "$out/timeline-offload.log" | head -110 ;;
    ncu) grep -E "^  [a-z_0-9]+\(|Duration|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|L2 Hit|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|pipe_tensor|bank_conflicts|Issue Slots|Stall|Warp Cycles Per Issued" "$out/ncu.log" | head -120 ;;
    tune) grep -E "^==|tg128" "$out/tune.log" ;;
    pair) grep -E "^==|tg128" "$out/pair.log" ;;
    tune-kernels) grep -E "^==|^\| matvec" "$out/tune-kernels.log" ;;
    matvec-check) grep -E "^==|test result|FAIL|panicked" "$out/matvec-check.log" ;;
    *) grep -E "^\| (minimax|matvec|attention|lightning|host)|^host |mxr 0|copy bandwidth" "$out/$s.log" ;;
    esac
done
exit $status
