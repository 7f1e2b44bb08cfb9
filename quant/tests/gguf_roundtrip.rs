//! Writer -> reader round trips: every metadata value type (nested arrays included) and
//! every tensor type come back with the same names, types, shapes, offsets and bytes.

use mxr_quant::gguf::{Array, Builder, GgufFile, Header, Value};
use mxr_quant::qtype::GGML_TYPES;
use mxr_quant::reference::stats::Rng;

fn every_value() -> Vec<(&'static str, Value)> {
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
        ("t.empty_string", Value::String(String::new())),
        ("t.arr.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("t.arr.i8", Value::Array(Array::I8(vec![-128, 127]))),
        ("t.arr.u16", Value::Array(Array::U16(vec![1, 65535]))),
        ("t.arr.i16", Value::Array(Array::I16(vec![-1, 2]))),
        ("t.arr.u32", Value::Array(Array::U32(vec![7; 33]))),
        ("t.arr.i32", Value::Array(Array::I32(vec![-5, 0, 5]))),
        ("t.arr.f32", Value::Array(Array::F32(vec![0.5, -0.25, f32::MAX]))),
        ("t.arr.bool", Value::Array(Array::Bool(vec![true, false, true]))),
        ("t.arr.string", Value::Array(Array::String(vec!["a".into(), String::new(), "ĠHello".into()]))),
        ("t.arr.u64", Value::Array(Array::U64(vec![u64::MAX]))),
        ("t.arr.i64", Value::Array(Array::I64(vec![i64::MIN]))),
        ("t.arr.f64", Value::Array(Array::F64(vec![std::f64::consts::PI]))),
        ("t.arr.empty", Value::Array(Array::F32(vec![]))),
        (
            "t.arr.nested",
            Value::Array(Array::Array(vec![
                Array::U32(vec![1, 2]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::Bool(vec![false]), Array::I8(vec![])]),
            ])),
        ),
    ]
}

/// Element count of the smallest ugly shape for each type: 3 blocks plus odd outer dims.
fn shape_for(block: usize, i: usize) -> Vec<u64> {
    match i % 3 {
        0 => vec![block as u64 * 3],
        1 => vec![block as u64, 5],
        _ => vec![block as u64 * 2, 3, 1, 2],
    }
}

fn build(alignment: Option<u32>) -> (Builder, Vec<Vec<u8>>) {
    let mut b = Builder::new();
    if let Some(a) = alignment {
        b.set("general.alignment", Value::U32(a)).unwrap();
    }
    for (k, v) in every_value() {
        b.set(k, v).unwrap();
    }
    let mut rng = Rng::new(7);
    let mut datas = Vec::new();
    for (i, t) in GGML_TYPES.iter().enumerate() {
        let p = b.add_tensor(format!("blk.{i}.{}", t.name), t.id, &shape_for(t.block_size, i)).unwrap().clone();
        datas.push((0..p.n_bytes).map(|_| rng.next_u64() as u8).collect());
    }
    (b, datas)
}

fn check(bytes: &[u8], b: &Builder, datas: &[Vec<u8>]) {
    let h = Header::parse(bytes).unwrap();
    assert_eq!(h.version, 3);
    for (k, v) in every_value() {
        assert_eq!(h.get(k), Some(&v), "key {k}");
    }
    let keys: Vec<&str> = h.metadata().iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<&str> = b.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, want, "metadata order is preserved");
    assert_eq!(h.tensors().len(), GGML_TYPES.len());
    for ((t, p), data) in h.tensors().iter().zip(b.tensors()).zip(datas) {
        assert_eq!((&t.name, &t.dims, t.type_info, t.offset, t.n_bytes), (&p.name, &p.dims, p.type_info, p.offset, p.n_bytes));
        assert_eq!(t.offset % h.alignment, 0);
        assert_eq!(&bytes[h.data_range(t)], &data[..], "data of {}", t.name);
    }
}

#[test]
fn every_value_and_tensor_type_round_trips_in_memory() {
    for alignment in [None, Some(64), Some(1)] {
        let (b, datas) = build(alignment);
        let expected_size = b.file_size();
        let mut w = b.clone().write_to(Vec::new()).unwrap();
        // Stream in uneven chunks to exercise tensor-boundary handling.
        for d in &datas {
            for chunk in d.chunks(7) {
                w.write(chunk).unwrap();
            }
        }
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() as u64, expected_size);
        check(&bytes, &b, &datas);
        assert_eq!(Header::parse(&bytes).unwrap().alignment, alignment.unwrap_or(32) as u64);
    }
}

#[test]
fn file_writer_renames_on_finish_and_mmap_reader_sees_the_same() {
    let dir = tempdir();
    let path = dir.join("rt.gguf");
    let (b, datas) = build(None);
    let mut w = b.clone().create(&path).unwrap();
    assert!(!path.exists(), "target must not exist before finish");
    for (p, d) in b.tensors().iter().zip(&datas) {
        w.write_tensor(&p.name, d).unwrap();
    }
    w.finish().unwrap();
    let f = GgufFile::open(&path).unwrap();
    check(f.bytes(), &b, &datas);
    let v = f.tensor("blk.0.f32").unwrap();
    assert_eq!(v.data, &datas[0][..]);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temp file left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dropped_writer_leaves_no_file() {
    let dir = tempdir();
    let path = dir.join("partial.gguf");
    let (b, datas) = build(None);
    let mut w = b.create(&path).unwrap();
    w.write(&datas[0][..1]).unwrap();
    drop(w);
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "temp file removed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn temp_files_of_dead_writers_are_removed_by_the_next_write() {
    let dir = tempdir();
    let path = dir.join("model.gguf");
    // pid 4194305 is above Linux's pid_max (2^22): no such process can exist.
    let stale = dir.join("model.gguf.tmp-4194305");
    let other = dir.join("other.gguf.tmp-4194305");
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&other, b"not ours").unwrap();
    let (b, datas) = build(None);
    let planned = b.tensors().to_vec();
    let mut w = b.create(&path).unwrap();
    for (p, d) in planned.iter().zip(&datas) {
        w.write_tensor(&p.name, d).unwrap();
    }
    w.finish().unwrap();
    assert!(!stale.exists(), "stale temp of the same target removed");
    assert!(other.exists(), "temps of other targets untouched");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn finishing_with_missing_tensors_fails_and_cleans_up() {
    let dir = tempdir();
    let path = dir.join("short.gguf");
    let (b, datas) = build(None);
    let mut w = b.create(&path).unwrap();
    w.write(&datas[0]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("incomplete"), "{err}");
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_rejects_wrong_order_wrong_size_and_bad_declarations() {
    let (b, datas) = build(None);
    let mut w = b.clone().write_to(Vec::new()).unwrap();
    assert!(w.write_tensor(&b.tensors()[1].name, &datas[1]).is_err(), "out of order");
    assert!(w.write_tensor(&b.tensors()[0].name, &datas[0][1..]).is_err(), "short");
    let too_long = vec![0u8; datas[0].len() + 1];
    assert!(w.write(&too_long).is_err(), "too long");

    let mut b = Builder::new();
    assert!(b.add_tensor("x", 12, &[100]).is_err(), "q4_K needs multiples of 256");
    assert!(b.add_tensor("x", 4, &[32]).is_err(), "removed type id");
    assert!(b.add_tensor("x", 0, &[1, 1, 1, 1, 1]).is_err(), "5 dims");
    assert!(b.add_tensor("y".repeat(64), 0, &[1]).is_err(), "name too long for llama.cpp");
    b.add_tensor("x", 0, &[4]).unwrap();
    assert!(b.add_tensor("x", 0, &[4]).is_err(), "duplicate");
    assert!(b.set("general.alignment", Value::U32(64)).is_err(), "alignment after tensors");
    assert!(Builder::new().set("general.alignment", Value::U32(48)).is_err(), "not a power of two");
}

/// A fresh directory for one test; each test removes it when it passes.
fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!("mxr-quant-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
