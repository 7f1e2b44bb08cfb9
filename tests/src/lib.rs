//! Shared helpers for mxr's end-to-end tests: temporary directories, the Python side of the
//! interop tests (gguf-py), and the tiny MiniMax-01 fixture file.

pub mod fixture;
pub mod gpu;
pub mod npy;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (tests/ is one level below it), or `$MXR_REPO_ROOT` when a test
/// binary runs on another machine (the GPU machine) from a copy of the tree elsewhere.
pub fn repo_root() -> PathBuf {
    if let Some(p) = std::env::var_os("MXR_REPO_ROOT").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A fresh, empty directory under the system temp dir, unique per call, removed with
/// everything in it when the guard is dropped, unless the test is panicking (then it stays
/// for a look). Tests convert whole checkpoints in these: left behind, a CI run on a
/// development machine used to leave ~1 GB in the temp dir.
pub fn tempdir(tag: &str) -> TempDir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!("mxr-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    TempDir(d)
}

/// See [`tempdir`].
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `name` inside a fresh [`tempdir`] of its own, which lives as long as this does.
pub fn temp_path(tag: &str, name: &str) -> TempPath {
    let dir = tempdir(tag);
    TempPath { path: dir.join(name), _dir: dir }
}

/// See [`temp_path`].
pub struct TempPath {
    path: PathBuf,
    _dir: TempDir,
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
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
    assert!(
        out.status.success(),
        "python3 {} {args:?} failed ({}); `pip install gguf numpy` if the module is missing:\n{stderr}",
        path.display(),
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script} printed invalid JSON: {e}"))
}

/// Lowercase hex of bytes (how the Python side prints tensor data).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

use mxr_quant::gguf::{Array, Value};
use serde_json::Value as Json;

/// One of every metadata value type, arrays of each element type, and nested arrays.
pub fn every_value() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(250)),
        ("t.i8", Value::I8(-7)),
        ("t.u16", Value::U16(65_000)),
        ("t.i16", Value::I16(-30_000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(3.556_558_8)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("naïve — ünïcode ✓".into())),
        ("t.u64", Value::U64(u64::MAX - 1)),
        ("t.i64", Value::I64(i64::MIN + 1)),
        ("t.f64", Value::F64(1e-300)),
        ("t.arr.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("t.arr.i8", Value::Array(Array::I8(vec![-128, 127]))),
        ("t.arr.u16", Value::Array(Array::U16(vec![1, 65535]))),
        ("t.arr.i16", Value::Array(Array::I16(vec![-1, 2]))),
        ("t.arr.u32", Value::Array(Array::U32(vec![7, 8, 9]))),
        ("t.arr.i32", Value::Array(Array::I32(vec![-5, 0, 5]))),
        ("t.arr.f32", Value::Array(Array::F32(vec![0.5, -0.25]))),
        ("t.arr.bool", Value::Array(Array::Bool(vec![true, false, true]))),
        ("t.arr.string", Value::Array(Array::String(vec!["a".into(), String::new(), "ĠHello".into()]))),
        ("t.arr.u64", Value::Array(Array::U64(vec![u64::MAX]))),
        ("t.arr.i64", Value::Array(Array::I64(vec![i64::MIN]))),
        ("t.arr.f64", Value::Array(Array::F64(vec![std::f64::consts::PI]))),
        ("t.arr.nested", Value::Array(Array::Array(vec![Array::U32(vec![1, 2]), Array::U32(vec![3])]))),
    ]
}

/// Scalars of a value in order, nested arrays flattened (how gguf-py's `contents()` gives
/// arrays of arrays).
pub fn flatten(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => (0..a.len()).filter_map(|i| a.get(i)).flat_map(|x| flatten(&x)).collect(),
        _ => vec![v.clone()],
    }
}

/// Whether a JSON value (from Python) holds the same data as a metadata value.
pub fn json_matches(v: &Value, j: &Json) -> bool {
    match v {
        Value::Array(_) => {
            let (ours, theirs) = (flatten(v), j.as_array().map(|a| flatten_json(a)).unwrap_or_default());
            ours.len() == theirs.len() && ours.iter().zip(&theirs).all(|(a, b)| json_matches(a, b))
        }
        Value::String(s) => j.as_str() == Some(s),
        Value::Bool(b) => j.as_bool() == Some(*b),
        Value::F32(x) => j.as_f64() == Some(*x as f64),
        Value::F64(x) => j.as_f64() == Some(*x),
        Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => int_eq(v, j),
        _ => j.as_u64() == v.as_u64(),
    }
}

fn int_eq(v: &Value, j: &Json) -> bool {
    match *v {
        Value::I8(x) => j.as_i64() == Some(x as i64),
        Value::I16(x) => j.as_i64() == Some(x as i64),
        Value::I32(x) => j.as_i64() == Some(x as i64),
        Value::I64(x) => j.as_i64() == Some(x),
        _ => false,
    }
}

fn flatten_json(a: &[Json]) -> Vec<Json> {
    a.iter().flat_map(|x| x.as_array().map_or_else(|| vec![x.clone()], |inner| flatten_json(inner))).collect()
}

/// Token ids of `text` under the HF tokenizer.json at `path` (as transformers would give them).
pub fn tokenize(path: &Path, text: &str) -> Vec<u32> {
    let t = tokenizers::Tokenizer::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.encode(text, false).unwrap_or_else(|e| panic!("tokenizing: {e}")).get_ids().to_vec()
}
