//! The kernel sources parse and type-check for NVPTX (clang, no CUDA toolkit, no GPU):
//! a syntax or type error in kernels/cuda fails CI instead of the first run on a GPU.

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
