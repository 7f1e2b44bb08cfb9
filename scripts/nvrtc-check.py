#!/usr/bin/env python3
"""Compiles every kernel source with NVRTC as the runtime does (kernels/src/cuda/nvrtc.rs:
common.cuh, then formats.cuh, mma.cuh or rownorm.cuh, then the source; --std=c++17 -lineinfo; matvec's
ROWS/WARPS defines), down to SASS for sm_90 (sm_90a for the wgmma source), so ptxas checks the inline PTX too. No GPU
is needed, only NVRTC (pip: nvidia-cuda-nvrtc and cuda-bindings). Exits non-zero, with
NVRTC's log, if a source does not compile.

    python3 scripts/nvrtc-check.py [--arch sm_90] [--only flash_wgmma] [-v] [--cubin-dir DIR]

-v prints ptxas's registers, spills and shared memory per kernel; --cubin-dir writes each
cubin there (for nvdisasm / cuobjdump -sass).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
K = ROOT / "kernels" / "cuda"
# (source, headers prepended after common.cuh, -D defines, target) as nvrtc.rs and
# Gpu::module give them (None: the --arch given)
SOURCES = [
    ("matvec", ["formats.cuh"], ["ROWS=2", "WARPS=4", "UNROLL=2", "PIPELINE=" + __import__("os").environ.get("PIPELINE", "7"), "STAGE=" + __import__("os").environ.get("STAGE", "2"), "STAGED=" + __import__("os").environ.get("STAGED", "8"), "EARLY=" + __import__("os").environ.get("EARLY", "0")], None),
    ("dequant", ["formats.cuh"], [], None),
    ("norm", ["rownorm.cuh"], [], None),
    ("elementwise", [], [], None),
    ("moe", ["formats.cuh", "rownorm.cuh"], [], None),
    ("lightning", ["mma.cuh"], [], None),
    ("attention", [], [], None),
    ("flash", ["mma.cuh"], [], None),
    # wgmma: the architecture-specific Hopper target (Source::target)
    ("flash_wgmma", ["mma.cuh"], [], "sm_90a"),
    ("check", [], [], None),
    ("host_exchange", [], [], None),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--only", help="one source (e.g. flash_wgmma)")
    ap.add_argument("-v", action="store_true", help="ptxas -v: registers, spills, shared memory")
    ap.add_argument("--cubin-dir", type=Path)
    a = ap.parse_args()
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        print(f"nvrtc-check: NVRTC's Python bindings are missing ({e}); pip install cuda-bindings nvidia-cuda-nvrtc", file=sys.stderr)
        return 2
    failed = 0
    for name, headers, defines, target in SOURCES:
        if a.only and name != a.only:
            continue
        arch = target or a.arch
        text = "".join((K / f).read_text() for f in ["common.cuh", *headers, f"{name}.cu"]).encode()
        err, prog = nvrtc.nvrtcCreateProgram(text, f"{name}.cu".encode(), 0, [], [])
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            print(f"nvrtc-check: {name}: creating the program: {err}", file=sys.stderr)
            return 2
        # TIMELINE=1 in the environment: every source as `MXR_TIMELINE=1` builds it
        defines = defines + (["TIMELINE=1"] if __import__("os").environ.get("TIMELINE") == "1" else [])
        opts = [b"--std=c++17", b"-lineinfo", f"--gpu-architecture={arch}".encode()] + [f"-D{d}".encode() for d in defines]
        if a.v:
            opts.append(b"--ptxas-options=-v")
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.decode(errors="replace").strip("\x00 \n")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            print(f"nvrtc-check: {name}.cu does not compile for {arch}:\n{log}", file=sys.stderr)
            failed += 1
            continue
        _, cubin_size = nvrtc.nvrtcGetCUBINSize(prog)
        if a.cubin_dir:
            cubin = b" " * cubin_size
            nvrtc.nvrtcGetCUBIN(prog, cubin)
            a.cubin_dir.mkdir(parents=True, exist_ok=True)
            (a.cubin_dir / f"{name}.cubin").write_bytes(cubin)
        print(f"nvrtc-check: {name}.cu: {cubin_size} bytes of {arch} code" + (f"\n{log}" if log else ""))
        nvrtc.nvrtcDestroyProgram(prog)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
