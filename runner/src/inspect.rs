//! `mxr inspect`: a GGUF file's metadata and tensor table, as a human table or JSON.
//! Works on any GGUF (types mxr does not compute with are still listed); for MiniMax-01
//! files it also prints the layer pattern.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context, Result};
use mxr_models::layers::PatternSummary;
use mxr_models::{layer_pattern, names, Config};
use mxr_quant::gguf::{keys, Array, GgufFile, Header, Value};
use serde_json::{json, Value as Json};

pub fn run(path: &Path, as_json: bool, check: bool) -> Result<()> {
    let file = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    if check {
        return run_check(path, &file);
    }
    let out = io::stdout().lock();
    if as_json { write_json(out, &file) } else { write_table(out, &file) }.or_else(ignore_broken_pipe)
}

/// `--check`: NaN and infinity in any tensor is an error listing the tensors; a
/// MiniMax-01 file must also load as a model (every tensor present, shapes as the
/// config says).
fn run_check(path: &Path, file: &GgufFile) -> Result<()> {
    let started = std::time::Instant::now();
    let arch = file.header().get(keys::GENERAL_ARCHITECTURE).and_then(Value::as_str).unwrap_or_default();
    if arch == mxr_models::names::ARCH {
        mxr_models::Model::open(path).with_context(|| format!("{} does not load as a {arch} model", path.display()))?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (found, skipped) = crate::check::check(file, threads);
    let values: u64 = file.header().tensors().iter().map(|t| t.n_elements).sum();
    for name in &skipped {
        eprintln!("not checked (a type mxr does not decode): {name}");
    }
    if found.is_empty() {
        println!(
            "{}: {} tensors, {:.3} G values, all finite ({:.1} s)",
            path.display(),
            file.header().tensors().len() - skipped.len(),
            values as f64 / 1e9,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let lines: Vec<String> =
        found.iter().map(|f| format!("{}: {} NaN, {} infinite (first at element {})", f.tensor, f.nan, f.inf, f.first)).collect();
    anyhow::bail!("{}: {} tensors hold non-finite values:\n{}", path.display(), found.len(), lines.join("\n"))
}

/// `mxr inspect f.gguf | head` must not fail.
fn ignore_broken_pipe(e: anyhow::Error) -> Result<()> {
    match e.downcast_ref::<io::Error>() {
        Some(io) if io.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        _ => Err(e),
    }
}

/// Parameter count, data bytes and per-type totals of a file.
struct Totals {
    params: u64,
    bytes: u64,
    by_type: BTreeMap<&'static str, (usize, u64)>,
}

fn totals(h: &Header) -> Totals {
    let mut t = Totals { params: 0, bytes: 0, by_type: BTreeMap::new() };
    for info in h.tensors() {
        t.params += info.n_elements;
        t.bytes += info.n_bytes;
        let e = t.by_type.entry(info.type_info.name).or_default();
        e.0 += 1;
        e.1 += info.n_bytes;
    }
    t
}

fn bits_per_weight(t: &Totals) -> f64 {
    if t.params == 0 {
        0.0
    } else {
        t.bytes as f64 * 8.0 / t.params as f64
    }
}

/// "arch: 80 layers (LLLLLLLS)x10" for MiniMax-01 files; None for other architectures.
fn model_line(h: &Header) -> Option<String> {
    (h.get_str(keys::GENERAL_ARCHITECTURE).ok()?? == names::ARCH).then(|| match (layer_pattern(h), Config::from_gguf(h)) {
        (Ok(p), Ok(c)) => format!(
            "{}: {} layers {}, dim {}, {} heads x {} (rotary {}), {} kv heads, {} experts x {} (top {}), vocab {}",
            names::ARCH,
            p.len(),
            PatternSummary(&p),
            c.dim,
            c.n_heads,
            c.head_dim,
            c.rotary_dim,
            c.n_kv_heads,
            c.n_experts,
            c.hidden_dim,
            c.n_experts_used,
            c.vocab_size
        ),
        (Ok(p), Err(e)) => format!("{}: {} layers {}; config incomplete: {e}", names::ARCH, p.len(), PatternSummary(&p)),
        (Err(e), _) => format!("{}: layer pattern unreadable: {e}", names::ARCH),
    })
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

fn type_label(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}]", a.elem_type().name()),
        _ => v.value_type().name().to_string(),
    }
}

fn write_table(mut w: impl Write, f: &GgufFile) -> Result<()> {
    let h = f.header();
    let t = totals(h);
    writeln!(
        w,
        "{}: GGUF v{}, {}, alignment {}, {} metadata keys, {} tensors, data at byte {}",
        f.path().display(),
        h.version,
        human_bytes(f.bytes().len() as u64),
        h.alignment,
        h.metadata().len(),
        h.tensors().len(),
        h.data_offset
    )?;
    if let Some(line) = model_line(h) {
        writeln!(w, "{line}")?;
    }
    writeln!(w, "\nmetadata:")?;
    let key_width = h.metadata().iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in h.metadata() {
        writeln!(w, "  {k:<key_width$}  {:<10} {v}", type_label(v))?;
    }
    writeln!(w, "\ntensors:")?;
    let name_width = h.tensors().iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    writeln!(
        w,
        "  {:>5}  {:<name_width$}  {:<7} {:<24} {:>14} {:>12} {:>14}",
        "#", "name", "type", "shape", "elements", "bytes", "offset"
    )?;
    for (i, info) in h.tensors().iter().enumerate() {
        let shape = format!("{:?}", info.dims);
        writeln!(
            w,
            "  {i:>5}  {:<name_width$}  {:<7} {shape:<24} {:>14} {:>12} {:>14}",
            info.name,
            info.type_info.name,
            info.n_elements,
            human_bytes(info.n_bytes),
            info.offset
        )?;
    }
    writeln!(
        w,
        "\n{} tensors, {} parameters, {} of tensor data, {:.2} bits per weight",
        h.tensors().len(),
        t.params,
        human_bytes(t.bytes),
        bits_per_weight(&t)
    )?;
    for (name, (n, bytes)) in &t.by_type {
        writeln!(w, "  {name:<7} {n:>5} tensors  {:>12}", human_bytes(*bytes))?;
    }
    Ok(())
}

fn write_json(mut w: impl Write, f: &GgufFile) -> Result<()> {
    let h = f.header();
    let t = totals(h);
    let metadata: Vec<Json> = h
        .metadata()
        .iter()
        .map(|(k, v)| {
            let mut entry = json!({ "key": k, "type": v.value_type().name(), "value": value_json(v) });
            if let Value::Array(a) = v {
                entry["element_type"] = json!(a.elem_type().name());
            }
            entry
        })
        .collect();
    let tensors: Vec<Json> = h
        .tensors()
        .iter()
        .map(|i| {
            json!({
                "name": i.name, "type": i.type_info.name, "type_id": i.type_info.id, "shape": i.dims,
                "n_elements": i.n_elements, "n_bytes": i.n_bytes, "offset": i.offset,
                "file_offset": h.data_offset + i.offset,
            })
        })
        .collect();
    let by_type: BTreeMap<_, _> = t.by_type.iter().map(|(k, (n, b))| (*k, json!({ "tensors": n, "bytes": b }))).collect();
    let mut doc = json!({
        "path": f.path().display().to_string(),
        "file_size": f.bytes().len(),
        "version": h.version,
        "alignment": h.alignment,
        "data_offset": h.data_offset,
        "metadata": metadata,
        "tensors": tensors,
        "summary": { "tensors": h.tensors().len(), "parameters": t.params, "data_bytes": t.bytes,
                     "bits_per_weight": bits_per_weight(&t), "by_type": by_type },
    });
    if h.get_str(keys::GENERAL_ARCHITECTURE).ok().flatten() == Some(names::ARCH) {
        if let Ok(p) = layer_pattern(h) {
            doc["model"] = json!({ "architecture": names::ARCH, "layers": p.iter().map(|k| k.code()).collect::<String>() });
        }
    }
    serde_json::to_writer_pretty(&mut w, &doc)?;
    writeln!(w)?;
    Ok(())
}

/// A metadata value as JSON; arrays in full (nested arrays as nested lists). Non-finite
/// floats become null (JSON has no NaN).
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Array(a) => array_json(a),
    }
}

fn array_json(a: &Array) -> Json {
    match a {
        Array::U8(v) => json!(v),
        Array::I8(v) => json!(v),
        Array::U16(v) => json!(v),
        Array::I16(v) => json!(v),
        Array::U32(v) => json!(v),
        Array::I32(v) => json!(v),
        Array::F32(v) => json!(v),
        Array::Bool(v) => json!(v),
        Array::String(v) => json!(v),
        Array::U64(v) => json!(v),
        Array::I64(v) => json!(v),
        Array::F64(v) => json!(v),
        Array::Array(v) => Json::Array(v.iter().map(array_json).collect()),
    }
}
