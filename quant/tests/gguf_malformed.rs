//! Malformed files: every one must give an error that names the problem, never a panic.

use mxr_quant::gguf::{Array, Builder, FormatError, Header, Value};
use mxr_quant::reference::stats::Rng;

/// A small valid file: strings, arrays, nested arrays and three tensors.
fn valid_file() -> Vec<u8> {
    let mut b = Builder::new();
    b.set("general.architecture", Value::String("minimax-01".into())).unwrap();
    b.set("tok", Value::Array(Array::String(vec!["a".into(), "bc".into()]))).unwrap();
    b.set("nest", Value::Array(Array::Array(vec![Array::U16(vec![1, 2]), Array::Bool(vec![true])]))).unwrap();
    b.set("flag", Value::Bool(false)).unwrap();
    b.add_tensor("a", 0, &[3, 2]).unwrap();
    b.add_tensor("q", 8, &[64]).unwrap();
    b.add_tensor("k", 12, &[256]).unwrap();
    let sizes: Vec<u64> = b.tensors().iter().map(|t| t.n_bytes).collect();
    let mut w = b.write_to(Vec::new()).unwrap();
    for n in sizes {
        w.write(&vec![1u8; n as usize]).unwrap();
    }
    w.finish().unwrap()
}

/// Hand-encoded header pieces for files the writer refuses to make.
struct Raw(Vec<u8>);

impl Raw {
    fn new(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&n_tensors.to_le_bytes());
        v.extend_from_slice(&n_kv.to_le_bytes());
        Raw(v)
    }
    fn u32(mut self, x: u32) -> Raw {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Raw {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A tensor info entry.
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    fn pad_data(mut self, data_len: usize) -> Vec<u8> {
        let aligned = self.0.len().div_ceil(32) * 32;
        self.0.resize(aligned + data_len, 0);
        self.0
    }
}

fn err(bytes: &[u8]) -> String {
    match Header::parse(bytes) {
        Ok(_) => panic!("parse accepted a malformed file"),
        Err(e) => e.to_string(),
    }
}

fn expect(bytes: &[u8], needle: &str) {
    let e = err(bytes);
    assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
}

#[test]
fn truncation_at_every_byte_is_an_error_until_the_last_tensor_ends() {
    let f = valid_file();
    let h = Header::parse(&f).unwrap();
    let data_end = h.tensors().iter().map(|t| h.data_offset + t.offset + t.n_bytes).max().unwrap();
    for cut in 0..f.len() {
        let r = Header::parse(&f[..cut]);
        if (cut as u64) < data_end {
            let e = r.err().unwrap_or_else(|| panic!("cut at {cut} accepted"));
            let msg = e.to_string();
            assert!(matches!(e, FormatError::Truncated { .. } | FormatError::OutOfBounds { .. }), "cut {cut}: {msg}");
        } else {
            assert!(r.is_ok(), "cut at {cut} is only trailing padding");
        }
    }
}

#[test]
fn wrong_magic_and_versions() {
    let mut f = valid_file();
    f[0] = b'X';
    expect(&f, "not a gguf file");
    let mut f = valid_file();
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    expect(&f, "unsupported gguf version 1");
    f[4..8].copy_from_slice(&4u32.to_le_bytes());
    expect(&f, "unsupported gguf version 4");
    f[4..8].copy_from_slice(&3u32.to_be_bytes());
    expect(&f, "big-endian");
    expect(b"GGU", "magic");
    expect(b"", "magic");
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    expect(&Raw::new(3, u64::MAX, 0).pad_data(0), "tensor count");
    expect(&Raw::new(3, 0, 1 << 40).pad_data(0), "metadata key/value count");
    expect(&Raw::new(3, 0, 1).u64(u64::MAX).pad_data(64), "length of key of metadata entry 0");
    let long_string = Raw::new(3, 0, 1).str("k").u32(8).u64(1 << 50).pad_data(64);
    expect(&long_string, "length of value of key `k`");
    let long_array = Raw::new(3, 0, 1).str("k").u32(9).u32(4).u64(1 << 40).pad_data(64);
    expect(&long_array, "array length of value of key `k`");
    let array_beyond_file = Raw::new(3, 0, 1).str("k").u32(9).u32(10).u64(1000).pad_data(64);
    expect(&array_beyond_file, "1000 items declared by array length of value of key `k`");
}

#[test]
fn deep_nesting_is_refused() {
    let mut r = Raw::new(3, 0, 1).str("k").u32(9);
    for _ in 0..20 {
        r = r.u32(9).u64(1);
    }
    expect(&r.u32(0).u64(0).pad_data(0), "array nesting");
}

#[test]
fn bad_values() {
    expect(&Raw::new(3, 0, 1).str("k").u32(13).pad_data(0), "unknown value type id 13");
    expect(&Raw::new(3, 0, 1).str("k").u32(7).bytes(&[2]).pad_data(0), "bool value of key `k`");
    let bad_utf8 = Raw::new(3, 0, 1).u64(2).bytes(&[0xc3, 0x28]).u32(0).bytes(&[0]).pad_data(0);
    expect(&bad_utf8, "not valid utf-8");
    let dup = Raw::new(3, 0, 2).str("k").u32(0).bytes(&[1]).str("k").u32(0).bytes(&[2]).pad_data(0);
    expect(&dup, "`k` appears twice");
    let align = Raw::new(3, 0, 1).str("general.alignment").u32(4).u32(48).pad_data(0);
    expect(&align, "power of two");
    let align_type = Raw::new(3, 0, 1).str("general.alignment").u32(8).str("32").pad_data(0);
    expect(&align_type, "general.alignment");
}

#[test]
fn bad_tensor_infos() {
    let one = |name: &str, dims: &[u64], ty: u32, off: u64, data: usize| Raw::new(3, 1, 0).tensor(name, dims, ty, off).pad_data(data);
    expect(&one("t", &[4], 0, 0, 8), "tensor `t` data [0, 16) lies outside the data section of 8 bytes");
    expect(&one("t", &[4], 0, 64, 64), "lies outside");
    expect(&one("t", &[4], 0, u64::MAX - 31, 64), "lies outside");
    expect(&one("t", &[4], 0, 8, 64), "not a multiple of the alignment 32");
    expect(&one("t", &[4], 4, 0, 64), "unknown ggml type id 4");
    expect(&one("t", &[4], 99, 0, 64), "unknown ggml type id 99");
    expect(&one("t", &[48], 8, 0, 64), "not a multiple of the q8_0 block size 32");
    expect(&one("t", &[1 << 40, 1 << 40], 0, 0, 64), "element count overflows");
    expect(&one("t", &[1 << 30, 1 << 30], 0, 0, 64), "lies outside");
    expect(&Raw::new(3, 1, 0).str("t").u32(5).pad_data(64), "dimension count of tensor `t`");
    expect(&one("t", &[1 << 31, 1 << 31], 0, 0, 64), "byte size overflows");
    let dup = Raw::new(3, 2, 0).tensor("t", &[8], 0, 0).tensor("t", &[8], 0, 32).pad_data(64);
    expect(&dup, "tensor `t` appears twice");
    let overlap = Raw::new(3, 2, 0).tensor("a", &[16], 0, 0).tensor("b", &[8], 0, 32).pad_data(128);
    expect(&overlap, "overlap");
}

#[test]
fn random_corruption_never_panics() {
    let f = valid_file();
    let mut rng = Rng::new(42);
    let mut errors = 0;
    for _ in 0..20_000 {
        let mut g = f.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() % g.len() as u64) as usize;
            g[i] = rng.next_u64() as u8;
        }
        errors += Header::parse(&g).is_err() as usize;
    }
    assert!(errors > 1000, "corruptions should mostly be caught, got {errors}");
}
