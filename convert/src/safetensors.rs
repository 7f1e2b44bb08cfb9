//! safetensors files and sharded checkpoints, read with positioned reads (no mmap, no
//! unsafe; the page cache does the buffering).
//!
//! Format: u64 little-endian header length N, N bytes of JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the
//! data; offsets are relative to the end of the header. A sharded checkpoint lists
//! `weight_map: {name: shard file}` in `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

use crate::ConvertError;

/// Largest JSON header accepted (the real checkpoint's shards have a few KB each).
const MAX_HEADER: u64 = 100 << 20;

/// Element types the converter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    BF16,
    F16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    fn parse(s: &str) -> Option<Dtype> {
        match s {
            "BF16" => Some(Dtype::BF16),
            "F16" => Some(Dtype::F16),
            "F32" => Some(Dtype::F32),
            _ => None,
        }
    }

    /// Appends `bytes` (little-endian elements of this dtype) to `out` as f32.
    pub fn to_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Dtype::BF16 => out.extend(bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))),
            Dtype::F16 => out.extend(bytes.chunks_exact(2).map(|b| mxr_quant::convert::f16_to_f32(u16::from_le_bytes([b[0], b[1]])))),
            Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        }
    }
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub name: String,
    pub dtype: Dtype,
    /// Row-major shape (outermost first), as PyTorch has it.
    pub shape: Vec<u64>,
    pub file: Arc<Shard>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorRef {
    /// Elements of the innermost dimension (one "row").
    pub fn row_len(&self) -> u64 {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn n_rows(&self) -> u64 {
        self.shape.iter().rev().skip(1).product()
    }

    /// Reads rows `[row, row + n)` as raw bytes into `buf` (resized).
    pub fn read_rows(&self, row: u64, n: u64, buf: &mut Vec<u8>) -> Result<(), ConvertError> {
        let row_bytes = self.row_len() * self.dtype.size() as u64;
        let (start, len) = (row * row_bytes, n * row_bytes);
        if start + len > self.n_bytes {
            return Err(ConvertError::BadTensor {
                path: self.file.path.clone(),
                tensor: self.name.clone(),
                reason: format!("rows {row}..{} past the end", row + n),
            });
        }
        buf.resize(len as usize, 0);
        self.file.file.read_exact_at(buf, self.offset + start).map_err(|e| ConvertError::BadTensor {
            path: self.file.path.clone(),
            tensor: self.name.clone(),
            reason: format!("read failed: {e}"),
        })
    }
}

/// An open safetensors file.
#[derive(Debug)]
pub struct Shard {
    pub path: PathBuf,
    file: File,
}

/// Opens and validates one safetensors file; returns its tensors by name.
pub fn open_shard(path: &Path) -> Result<BTreeMap<String, TensorRef>, ConvertError> {
    let bad = |reason: String| ConvertError::BadFile { path: path.to_path_buf(), reason };
    let file = File::open(path).map_err(|e| ConvertError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| ConvertError::io(path, e))?.len();
    let mut len8 = [0u8; 8];
    file.read_exact_at(&mut len8, 0).map_err(|_| bad(format!("too short for a safetensors header ({file_len} bytes)")))?;
    let header_len = u64::from_le_bytes(len8);
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        return Err(bad(format!("header length {header_len} does not fit the file of {file_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| ConvertError::io(path, e))?;
    let json: Json = serde_json::from_slice(&header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let entries = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + header_len;
    let shard = Arc::new(Shard { path: path.to_path_buf(), file });
    let mut tensors = BTreeMap::new();
    for (name, e) in entries {
        if name == "__metadata__" {
            continue;
        }
        let t = parse_entry(name, e, &shard, data_start, file_len)?;
        tensors.insert(name.clone(), t);
    }
    Ok(tensors)
}

fn parse_entry(name: &str, e: &Json, shard: &Arc<Shard>, data_start: u64, file_len: u64) -> Result<TensorRef, ConvertError> {
    let bad = |reason: String| ConvertError::BadTensor { path: shard.path.clone(), tensor: name.to_string(), reason };
    let dtype_name = e.get("dtype").and_then(Json::as_str).ok_or_else(|| bad("no dtype".into()))?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| bad(format!("dtype {dtype_name} is not supported (BF16, F16 or F32 expected)")))?;
    let shape: Vec<u64> = e
        .get("shape")
        .and_then(Json::as_array)
        .and_then(|a| a.iter().map(Json::as_u64).collect())
        .ok_or_else(|| bad("shape is not a list of non-negative integers".into()))?;
    let offs: Vec<u64> = e
        .get("data_offsets")
        .and_then(Json::as_array)
        .and_then(|a| a.iter().map(Json::as_u64).collect())
        .filter(|v: &Vec<u64>| v.len() == 2)
        .ok_or_else(|| bad("data_offsets is not [begin, end]".into()))?;
    let n_bytes =
        shape.iter().try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if offs[1] < offs[0] || offs[1] - offs[0] != n_bytes {
        return Err(bad(format!(
            "data_offsets {offs:?} hold {} bytes, shape {shape:?} of {dtype_name} needs {n_bytes}",
            offs[1].saturating_sub(offs[0])
        )));
    }
    match data_start.checked_add(offs[1]) {
        Some(end) if end <= file_len => {}
        end => {
            return Err(bad(format!(
                "data ends at byte {} but the file has {file_len} (truncated?)",
                end.map_or("2^64 or more".to_string(), |e| e.to_string())
            )))
        }
    }
    Ok(TensorRef { name: name.to_string(), dtype, shape, file: shard.clone(), offset: data_start + offs[0], n_bytes })
}

/// All tensors of a checkpoint directory: `model.safetensors.index.json` and its shards, or
/// a single `model.safetensors`.
pub fn open_checkpoint(dir: &Path) -> Result<HashMap<String, TensorRef>, ConvertError> {
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    if index.exists() {
        let bad = |reason: String| ConvertError::BadFile { path: index.clone(), reason };
        let text = std::fs::read_to_string(&index).map_err(|e| ConvertError::io(&index, e))?;
        let json: Json = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map = json.get("weight_map").and_then(Json::as_object).ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| bad(format!("weight_map entry `{name}` is not a file name")))?;
            if file.contains('/') || file.contains("..") {
                return Err(bad(format!("weight_map entry `{name}` names `{file}` outside the checkpoint directory")));
            }
            by_shard.entry(file).or_default().push(name);
        }
        let mut all = HashMap::new();
        for (file, names) in by_shard {
            let path = dir.join(file);
            if !path.exists() {
                return Err(ConvertError::Checkpoint {
                    dir: dir.to_path_buf(),
                    reason: format!("shard {file} (listed in model.safetensors.index.json for `{}`) is missing", names[0]),
                });
            }
            let mut tensors = open_shard(&path)?;
            for name in names {
                let t = tensors.remove(name).ok_or_else(|| ConvertError::BadTensor {
                    path: path.clone(),
                    tensor: name.to_string(),
                    reason: "named by model.safetensors.index.json but not in this shard".into(),
                })?;
                all.insert(name.to_string(), t);
            }
        }
        Ok(all)
    } else if single.exists() {
        Ok(open_shard(&single)?.into_iter().collect())
    } else {
        Err(ConvertError::Checkpoint {
            dir: dir.to_path_buf(),
            reason: "has neither model.safetensors.index.json nor model.safetensors".into(),
        })
    }
}
