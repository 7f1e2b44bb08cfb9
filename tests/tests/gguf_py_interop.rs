//! GGUF interoperability with gguf-py, the reference Python implementation (PyPI `gguf`):
//! it reads what mxr writes, mxr reads what it writes, and for the types gguf-py can
//! quantize our quantizer produces the same bytes.

use mxr_e2e::{every_value, hex, json_matches, python_json, temp_path};
use mxr_quant::gguf::{Builder, GgufFile};
use mxr_quant::qtype::type_info;
use mxr_quant::reference::{quantize_to_vec, stats::Rng};
use mxr_quant::QType;
use serde_json::Value as Json;

/// Tensor types written for gguf-py to read: mxr's seven plus two it only stores.
const TYPES: &[(&str, u32)] =
    &[("f32", 0), ("f16", 1), ("bf16", 30), ("q8_0", 8), ("q4_0", 2), ("q4_K", 12), ("q6_K", 14), ("q5_K", 13), ("iq4_xs", 23)];

#[test]
fn gguf_py_reads_what_mxr_writes() {
    let path = temp_path("interop", "ours.gguf");
    let mut b = Builder::new();
    for (k, v) in every_value() {
        b.set(k, v).unwrap();
    }
    let mut rng = Rng::new(11);
    let mut datas = Vec::new();
    for (i, &(name, id)) in TYPES.iter().enumerate() {
        let block = type_info(id).unwrap().block_size as u64;
        let dims = if i % 2 == 0 { vec![block * 2, 3] } else { vec![block * 3] };
        let p = b.add_tensor(format!("t.{name}"), id, &dims).unwrap();
        datas.push((0..p.n_bytes).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>());
    }
    let planned = b.tensors().to_vec();
    let mut w = b.create(&path).unwrap();
    for (p, d) in planned.iter().zip(&datas) {
        w.write_tensor(&p.name, d).unwrap();
    }
    w.finish().unwrap();
    let ours = GgufFile::open(&path).unwrap();

    let theirs = python_json("gguf_interop.py", &["read", path.to_str().unwrap()]);
    let fields = theirs["fields"].as_object().unwrap();
    assert_eq!(fields.len(), every_value().len(), "gguf-py sees exactly our keys");
    for (k, v) in every_value() {
        let f = &fields[k];
        let types: Vec<&str> = f["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(types[0], v.value_type().name().to_uppercase(), "{k} type");
        if let Some(a) = v.as_array() {
            assert_eq!(types[1], a.elem_type().name().to_uppercase(), "{k} element type");
        }
        assert!(json_matches(&v, &f["value"]), "{k}: ours {v:?}, gguf-py {}", f["value"]);
    }
    let tensors = theirs["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), planned.len());
    for ((t, p), d) in tensors.iter().zip(&planned).zip(&datas) {
        assert_eq!(t["name"], p.name.as_str());
        assert_eq!(t["type"], p.type_info.id);
        assert_eq!(t["shape"], Json::from(p.dims.clone()), "{} shape", p.name);
        assert_eq!(t["n_bytes"], p.n_bytes);
        assert_eq!(t["data_offset"], ours.header().data_offset + p.offset, "{} offset", p.name);
        assert_eq!(t["hex"], hex(d), "{} data", p.name);
    }
}

#[test]
fn mxr_reads_what_gguf_py_writes_and_quantizes_identically() {
    let path = temp_path("interop", "py.gguf");
    let manifest = python_json("gguf_interop.py", &["write", path.to_str().unwrap()]);
    let described = python_json("gguf_interop.py", &["read", path.to_str().unwrap()]);
    let f = GgufFile::open(&path).unwrap();
    let h = f.header();
    assert_eq!(h.version, 3);

    // Every key gguf-py reports, with the same type and value.
    let fields = described["fields"].as_object().unwrap();
    assert_eq!(h.metadata().len(), fields.len());
    for (k, v) in h.metadata() {
        let d = &fields[k.as_str()];
        assert_eq!(d["types"][0], v.value_type().name().to_uppercase(), "{k}");
        assert!(json_matches(v, &d["value"]), "{k}: ours {v:?}, gguf-py {}", d["value"]);
    }

    let tensors = manifest["tensors"].as_array().unwrap();
    assert_eq!(h.tensors().len(), tensors.len());
    let mut compared = 0;
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let view = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(view.info.type_info.id as u64, t["type"].as_u64().unwrap(), "{name}");
        assert_eq!(Json::from(view.info.dims.clone()), t["shape"], "{name}");
        assert_eq!(hex(view.data), t["hex"].as_str().unwrap(), "{name} bytes");
        // Same floats in, same bytes out (gguf-py's numpy quantizers are reference ports).
        if let (Some(src), Some(q)) = (t["source_hex"].as_str(), view.info.qtype()) {
            let x: Vec<f32> = unhex(src).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            assert_eq!(hex(&quantize_to_vec(q, &x).unwrap()), t["hex"].as_str().unwrap(), "{name}: our {q} quantizer");
            compared += 1;
        }
    }
    assert_eq!(compared, 5, "f32, f16, bf16, q8_0 and q4_0 compared against gguf-py's quantizers");
    assert!(QType::WEIGHT_TYPES.len() == 7);
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}
