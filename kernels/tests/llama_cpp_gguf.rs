//! GGUF interoperability with llama.cpp's own C implementation (gguf.cpp, linked through
//! llama-cpp-sys-2): it reads the files mxr writes, and mxr reads the files it writes.
//! The raw FFI stays in this test file; the library's FFI is confined to `cpu::ggml`.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use llama_cpp_sys_2 as sys;
use mxr_quant::gguf::{Array, Builder, GgufFile, Value};
use mxr_quant::reference::{quantize_to_vec, stats::Rng};
use mxr_quant::QType;

/// A file in the temp dir for one test (each test removes its file when it passes).
fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mxr-llama-gguf-{}-{name}", std::process::id()))
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// (name, type, dims) of the tensors both tests use.
fn tensors() -> Vec<(&'static str, QType, Vec<u64>)> {
    vec![
        ("a.f32", QType::F32, vec![8, 3]),
        ("b.q8_0", QType::Q8_0, vec![64, 2]),
        ("c.q4_k", QType::Q4K, vec![256]),
        ("d.bf16", QType::BF16, vec![32, 5]),
    ]
}

fn tensor_bytes(q: QType, dims: &[u64], seed: u64) -> Vec<u8> {
    let n: u64 = dims.iter().product();
    quantize_to_vec(q, &Rng::new(seed).normals(n as usize, 1.0)).unwrap()
}

#[test]
fn llama_cpp_reads_what_mxr_writes() {
    let path = tmp("ours.gguf");
    let mut b = Builder::new();
    b.set("general.architecture", Value::String("minimax-01".into())).unwrap();
    b.set("x.u32", Value::U32(123_456)).unwrap();
    b.set("x.f32", Value::F32(-2.5)).unwrap();
    b.set("x.bool", Value::Bool(true)).unwrap();
    b.set("x.tokens", Value::Array(Array::String(vec!["<beginning_of_sentence>".into(), "Ġworld".into()]))).unwrap();
    b.set("x.flags", Value::Array(Array::Bool(vec![true, true, false]))).unwrap();
    for (name, q, dims) in tensors() {
        b.add_tensor(name, q.ggml_id(), &dims).unwrap();
    }
    let mut w = b.create(&path).unwrap();
    for (i, (name, q, dims)) in tensors().into_iter().enumerate() {
        w.write_tensor(name, &tensor_bytes(q, &dims, i as u64)).unwrap();
    }
    w.finish().unwrap();
    let ours = GgufFile::open(&path).unwrap();

    let fname = c(path.to_str().unwrap());
    let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
    // SAFETY: fname is a valid C string; with no_alloc and a null ctx gguf reads only the
    // header. Every later call gets the non-null context and ids it returned; the
    // context is freed once at the end.
    unsafe {
        let ctx = sys::gguf_init_from_file(fname.as_ptr(), params);
        assert!(!ctx.is_null(), "llama.cpp refused a file mxr wrote");
        assert_eq!(sys::gguf_get_n_kv(ctx), 6);
        assert_eq!(sys::gguf_get_data_offset(ctx) as u64, ours.header().data_offset);
        let key = |k: &str| sys::gguf_find_key(ctx, c(k).as_ptr());
        assert_eq!(CStr::from_ptr(sys::gguf_get_val_str(ctx, key("general.architecture"))).to_str().unwrap(), "minimax-01");
        assert_eq!(sys::gguf_get_val_u32(ctx, key("x.u32")), 123_456);
        assert_eq!(sys::gguf_get_val_f32(ctx, key("x.f32")), -2.5);
        assert!(sys::gguf_get_val_bool(ctx, key("x.bool")));
        assert_eq!(sys::gguf_get_arr_n(ctx, key("x.tokens")), 2);
        assert_eq!(CStr::from_ptr(sys::gguf_get_arr_str(ctx, key("x.tokens"), 1)).to_str().unwrap(), "Ġworld");
        assert_eq!(sys::gguf_get_arr_n(ctx, key("x.flags")), 3);
        assert_eq!(sys::gguf_get_n_tensors(ctx), tensors().len() as i64);
        for (name, q, _) in tensors() {
            let id = sys::gguf_find_tensor(ctx, c(name).as_ptr());
            assert!(id >= 0, "{name}");
            let info = ours.header().tensor(name).unwrap();
            assert_eq!(sys::gguf_get_tensor_type(ctx, id), q.ggml_id(), "{name}");
            assert_eq!(sys::gguf_get_tensor_offset(ctx, id) as u64, info.offset, "{name}");
            assert_eq!(sys::gguf_get_tensor_size(ctx, id) as u64, info.n_bytes, "{name}");
        }
        sys::gguf_free(ctx);
    }
    drop(ours);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn mxr_reads_what_llama_cpp_writes() {
    let path = tmp("theirs.gguf");
    let fname = c(path.to_str().unwrap());
    let datas: Vec<Vec<u8>> = tensors().iter().enumerate().map(|(i, (_, q, d))| tensor_bytes(*q, d, 10 + i as u64)).collect();
    let words = [c("alpha"), c(""), c("Ġβ")];
    let word_ptrs: Vec<*const std::os::raw::c_char> = words.iter().map(|w| w.as_ptr()).collect();
    let ints: [i32; 3] = [-1, 0, 7];
    // SAFETY: a ggml context big enough for the tensors is created, each tensor's data
    // buffer is filled with exactly ggml_nbytes bytes, and the gguf context copies what
    // it needs before both are freed. All strings are NUL-terminated CStrings that
    // outlive the calls.
    unsafe {
        let gctx = sys::ggml_init(sys::ggml_init_params { mem_size: 1 << 20, mem_buffer: std::ptr::null_mut(), no_alloc: false });
        assert!(!gctx.is_null());
        let ctx = sys::gguf_init_empty();
        sys::gguf_set_val_str(ctx, c("general.architecture").as_ptr(), c("llama-cpp-test").as_ptr());
        sys::gguf_set_val_u64(ctx, c("y.u64").as_ptr(), u64::MAX);
        sys::gguf_set_val_i8(ctx, c("y.i8").as_ptr(), -3);
        sys::gguf_set_val_f64(ctx, c("y.f64").as_ptr(), 0.125);
        sys::gguf_set_arr_str(ctx, c("y.words").as_ptr(), word_ptrs.as_ptr() as *mut _, 3);
        sys::gguf_set_arr_data(ctx, c("y.ints").as_ptr(), sys::GGUF_TYPE_INT32, ints.as_ptr() as *const _, 3);
        for ((name, q, dims), data) in tensors().iter().zip(&datas) {
            let ne: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
            let t = sys::ggml_new_tensor(gctx, q.ggml_id(), ne.len() as i32, ne.as_ptr());
            sys::ggml_set_name(t, c(name).as_ptr());
            assert_eq!(sys::ggml_nbytes(t), data.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), sys::ggml_get_data(t) as *mut u8, data.len());
            sys::gguf_add_tensor(ctx, t);
        }
        assert!(sys::gguf_write_to_file(ctx, fname.as_ptr(), false), "llama.cpp failed to write");
        sys::gguf_free(ctx);
        sys::ggml_free(gctx);
    }

    let f = GgufFile::open(&path).unwrap();
    let h = f.header();
    assert_eq!(h.get_str("general.architecture").unwrap(), Some("llama-cpp-test"));
    assert_eq!(h.get("y.u64"), Some(&Value::U64(u64::MAX)));
    assert_eq!(h.get("y.i8"), Some(&Value::I8(-3)));
    assert_eq!(h.get("y.f64"), Some(&Value::F64(0.125)));
    assert_eq!(h.get("y.words"), Some(&Value::Array(Array::String(vec!["alpha".into(), String::new(), "Ġβ".into()]))));
    assert_eq!(h.get("y.ints"), Some(&Value::Array(Array::I32(ints.to_vec()))));
    for ((name, q, dims), data) in tensors().iter().zip(&datas) {
        let v = f.tensor(name).unwrap();
        assert_eq!((v.info.qtype(), &v.info.dims), (Some(*q), dims), "{name}");
        assert_eq!(v.data, &data[..], "{name} bytes");
    }
    drop(f);
    std::fs::remove_file(&path).unwrap();
}
