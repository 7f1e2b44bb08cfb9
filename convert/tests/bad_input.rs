//! Bad checkpoints: each gives an error naming the file (and tensor), and leaves nothing
//! behind — no output file, no temporary file.

mod common;

use std::path::Path;

use common::*;
use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_quant::QType;

/// Converts a tiny checkpoint after `damage` was done to it; returns the error text.
fn convert_damaged(tag: &str, shard_bytes: u64, damage: impl FnOnce(&Path)) -> String {
    let tmp = tempdir(tag);
    let dir = tiny_checkpoint(&tmp, "ckpt", tiny(), shard_bytes);
    damage(&dir);
    let out = tmp.join("out.gguf");
    let err = convert(&dir, &out, &ConvertOptions::new(TypePlan::uniform(QType::Q8_0)), &|_| {}).unwrap_err().to_string();
    assert_eq!(files(&tmp), vec!["ckpt"], "{tag}: nothing may be left beside the checkpoint ({err})");
    err
}

fn expect(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
}

fn edit(path: &Path, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, f(text)).unwrap();
}

#[test]
fn missing_shard() {
    let err = convert_damaged("shard", 3_000_000, |d| std::fs::remove_file(d.join("model-00002-of-00004.safetensors")).unwrap());
    expect(&err, &["model-00002-of-00004.safetensors", "is missing"]);
}

#[test]
fn index_names_a_tensor_its_shard_lacks() {
    let err = convert_damaged("index", 3_000_000, |d| {
        edit(&d.join("model.safetensors.index.json"), |t| {
            t.replacen(
                "\"weight_map\": {",
                "\"weight_map\": {\n    \"model.layers.0.extra.weight\": \"model-00001-of-00004.safetensors\",",
                1,
            )
        })
    });
    expect(&err, &["model.layers.0.extra.weight", "model-00001-of-00004.safetensors", "not in this shard"]);
}

#[test]
fn shape_that_disagrees_with_the_config() {
    let err = convert_damaged("shape", u64::MAX, |d| {
        edit(&d.join("config.json"), |t| t.replace("\"intermediate_size\": 512", "\"intermediate_size\": 256"))
    });
    expect(
        &err,
        &["model-00001-of-00001.safetensors", "block_sparse_moe.experts.0.w1.weight", "has shape [512, 256], expected [256, 256]"],
    );
}

#[test]
fn unknown_dtype() {
    let err = convert_damaged("dtype", u64::MAX, |d| {
        let p = d.join("model-00001-of-00001.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
        let at = header.find("\"model.norm.weight\":{").expect("norm entry");
        let rel = header[at..].find("\"dtype\":\"BF16\"").expect("norm dtype");
        let (a, b) = (at + rel, at + rel + "\"dtype\":\"BF16\"".len());
        let fixed = format!("{}\"dtype\":\"I16\" {}", &header[..a], &header[b..]);
        bytes[8..8 + header_len].copy_from_slice(fixed.as_bytes());
        std::fs::write(&p, bytes).unwrap();
    });
    expect(&err, &["model.norm.weight", "model-00001-of-00001.safetensors", "dtype I16 is not supported"]);
}

#[test]
fn config_with_fewer_layers_than_the_weights() {
    let err = convert_damaged("layers", u64::MAX, |d| {
        edit(&d.join("config.json"), |t| {
            t.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1")
                .replace("\"attn_type_list\": [\n    0,\n    1\n  ]", "\"attn_type_list\": [0]")
        })
    });
    expect(&err, &["model.layers.1.", "for layer 1, but config.json says 1 layers"]);
}

#[test]
fn config_with_fewer_experts_than_the_weights() {
    let err = convert_damaged("experts", u64::MAX, |d| {
        edit(&d.join("config.json"), |t| t.replace("\"num_local_experts\": 4", "\"num_local_experts\": 3"))
    });
    expect(&err, &["block_sparse_moe.gate.weight", "has shape [4, 256], expected [3, 256]"]);
}

#[test]
fn missing_or_unreadable_tokenizer() {
    let err = convert_damaged("tok-missing", u64::MAX, |d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    expect(&err, &["tokenizer.json", "No such file"]);
    let err = convert_damaged("tok-bad", u64::MAX, |d| std::fs::write(d.join("tokenizer.json"), "{ \"model\": ").unwrap());
    expect(&err, &["tokenizer.json", "not valid JSON"]);
    let err = convert_damaged("tok-big", u64::MAX, |d| edit(&d.join("tokenizer.json"), |t| t.replacen("\"id\": 400", "\"id\": 5000", 1)));
    expect(&err, &["tokenizer.json", "token id 5000 does not fit the 2048 embedding rows"]);
}

#[test]
fn truncated_shard_and_missing_files() {
    let err = convert_damaged("trunc", u64::MAX, |d| {
        let p = d.join("model-00001-of-00001.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 100).unwrap();
    });
    expect(&err, &["model-00001-of-00001.safetensors", "truncated"]);
    let err = convert_damaged("noconfig", u64::MAX, |d| std::fs::remove_file(d.join("config.json")).unwrap());
    expect(&err, &["config.json", "No such file"]);
    let err = convert_damaged("noweights", u64::MAX, |d| {
        std::fs::remove_file(d.join("model.safetensors.index.json")).unwrap();
        std::fs::remove_file(d.join("model-00001-of-00001.safetensors")).unwrap();
    });
    expect(&err, &["neither model.safetensors.index.json nor model.safetensors"]);
}

/// Data offsets near 2^64: the end of the tensor's data must not wrap around (it once did in
/// release builds, where it passed the size check and pointed the tensor at the header).
#[test]
fn data_offsets_that_would_overflow() {
    let tmp = tempdir("st-overflow");
    let begin = u64::MAX - 9;
    let header = format!(r#"{{"w":{{"dtype":"F16","shape":[1],"data_offsets":[{begin},{}]}}}}"#, begin + 2);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let path = tmp.join("model.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let err = mxr_convert::safetensors::open_shard(&path).unwrap_err().to_string();
    expect(&err, &["model.safetensors", "`w`", "2^64 or more"]);
}
