//! The kernel sources parse and type-check for NVPTX (clang, no CUDA toolkit, no GPU), and
//! NVRTC compiles them as the runtime does, down to sm_90 code (ptxas checks the inline
//! PTX): an error in kernels/cuda fails CI instead of the first run on a GPU.

#[test]
fn kernel_sources_parse_for_nvptx() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/cuda-check.sh"))
        .output()
        .expect("running scripts/cuda-check.sh (needs bash and clang++: apt install clang)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("kernel sources parse"), "{stdout}");
}

#[test]
fn kernel_sources_compile_with_nvrtc_for_sm90() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("python3")
        .arg(root.join("scripts/nvrtc-check.py"))
        .output()
        .expect("running scripts/nvrtc-check.py (needs python3 with cuda-bindings and nvidia-cuda-nvrtc: bash .ci/deps)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    // every source: matvec, dequant, norm, elementwise, moe, lightning, attention, flash,
    // check and host_exchange for sm_90, and flash_wgmma for sm_90a
    assert_eq!(stdout.matches("bytes of sm_90 code").count(), 10, "{stdout}");
    assert_eq!(stdout.matches("bytes of sm_90a code").count(), 1, "{stdout}");
}
