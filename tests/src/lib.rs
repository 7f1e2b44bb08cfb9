//! Shared helpers for mxr's end-to-end tests: temporary directories, the Python side of the
//! interop tests (gguf-py), and the tiny MiniMax-01 fixture file.

pub mod fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (tests/ is one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A fresh, empty directory under the system temp dir, unique per call.
pub fn tempdir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!("mxr-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    d
}

/// Runs `python3 tests/py/<script> args...` and returns its stdout parsed as JSON.
/// Panics with an install hint when python3 or the `gguf` package is missing: these
/// tests are part of CI (.ci/run installs the package), so they must not skip silently.
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let path = repo_root().join("tests/py").join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running python3 {}: {e} (install python3 and `pip install gguf numpy`)", path.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python3 {} {args:?} failed ({}); `pip install gguf numpy` if the module is missing:\n{stderr}", path.display(), out.status);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script} printed invalid JSON: {e}"))
}

/// Lowercase hex of bytes (how the Python side prints tensor data).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
