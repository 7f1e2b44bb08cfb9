//! Helpers for the converter tests: tiny synthetic checkpoints and a plain safetensors writer.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use mxr_convert::synth::{synth, tiny_config, Router, SynthOptions};
use mxr_models::Config;
use serde_json::json;

pub use mxr_e2e::tempdir;

/// A tiny synthetic checkpoint in `parent/name`, with shards of at most `shard_bytes`.
pub fn tiny_checkpoint(parent: &Path, name: &str, cfg: Config, shard_bytes: u64) -> PathBuf {
    let dir = parent.join(name);
    let opts = SynthOptions { config: cfg, seed: 7, shard_bytes, router: Router::Uniform, tokenizer_vocab: 400, threads: 2 };
    synth(&dir, &opts, &|_, _| {}).unwrap();
    dir
}

pub fn tiny() -> Config {
    tiny_config()
}

/// Writes a safetensors file of (name, dtype, shape, raw bytes).
pub fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<u64>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(name.clone(), json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes.len() as u64]}));
        off += bytes.len() as u64;
    }
    let text = serde_json::to_string(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// Files in `dir` (names), sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}
