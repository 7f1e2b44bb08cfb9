//! Writing synthetic bf16 tensors into safetensors shards, generated in parallel chunks.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use mxr_quant::convert::f32_to_bf16;
use mxr_quant::reference::stats::Rng;
use serde_json::json;

use super::SynthOptions;
use crate::ConvertError;

/// Elements per generated chunk (8 MiB of bf16).
const CHUNK: u64 = 1 << 22;
/// Uniform noise half-width for std 0.02: 0.02 * sqrt(3).
const NOISE: f32 = 0.034_641_016;

/// How a tensor's values are made.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// Uniform noise with std 0.02.
    Uniform,
    /// 1 +- 0.05 (norm weights).
    NearOne,
    /// Noise for rows below `live_rows`, zero rows after; optionally plus a shared direction.
    Embedding { live_rows: u64, shared_direction: bool },
    /// Router rows leaning along the shared direction by Zipf rank.
    ZipfRouter { s: f64, layer: u64, dim: u64 },
}

pub struct SynthTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub fill: Fill,
    pub seed: u64,
}

impl SynthTensor {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        2 * self.n_elements()
    }

    fn row_len(&self) -> u64 {
        self.shape.last().copied().unwrap_or(1)
    }
}

/// Groups tensors (indices) into shards of at most `max_bytes` (a larger tensor gets a shard
/// of its own).
pub fn plan_shards(tensors: &[SynthTensor], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for (i, t) in tensors.iter().enumerate() {
        if size + t.n_bytes() > max_bytes && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.n_bytes();
        if let Some(s) = shards.last_mut() {
            s.push(i)
        }
    }
    shards
}

/// The shared direction u (unit vector of length `dim`), the same for every tensor.
fn shared_direction(dim: u64) -> Vec<f32> {
    let mut rng = Rng::new(0x5eed_0001);
    let v: Vec<f32> = (0..dim).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-30);
    v.into_iter().map(|x| x / norm).collect()
}

/// bf16 bytes of elements [start, end) of `t`.
fn chunk(t: &SynthTensor, u: &[f32], start: u64, end: u64) -> Vec<u8> {
    let mut rng = Rng::new(t.seed ^ start.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let row_len = t.row_len();
    let mut out = Vec::with_capacity(2 * (end - start) as usize);
    for idx in start..end {
        let noise = (rng.uniform() * 2.0 - 1.0) * NOISE;
        let (row, col) = (idx / row_len, (idx % row_len) as usize);
        let v = match t.fill {
            Fill::Uniform => noise,
            Fill::NearOne => 1.0 + noise * (0.05 / NOISE),
            Fill::Embedding { live_rows, .. } if row >= live_rows => 0.0,
            // DC of half the noise row's norm: cos(row, u) ~ 0.45.
            Fill::Embedding { shared_direction: true, .. } => noise + 0.5 * 0.02 * (row_len as f32).sqrt() * u[col],
            Fill::Embedding { .. } => noise,
            Fill::ZipfRouter { s, layer, dim } => {
                let n_experts = t.shape[0];
                let rank = (row + layer * 5) % n_experts;
                let beta = -s * (1.0 + rank as f64).ln() / (0.45 * (dim as f64).sqrt());
                // Per-token spread of about one logit (a row of std 1/sqrt(dim) against a
                // hidden state of norm sqrt(dim)), so top-k choices vary by token and the
                // popularity follows the bias gradually instead of always picking rank 0.
                let spread = noise * (1.0 / (dim as f32).sqrt()) / 0.02;
                spread + beta as f32 * u[col]
            }
        };
        out.extend_from_slice(&f32_to_bf16(v).to_le_bytes());
    }
    out
}

/// Writes one shard: header, then each tensor's data generated `opts.threads` chunks at a time.
pub fn write_shard<'a>(
    path: &Path,
    tensors: impl Iterator<Item = &'a SynthTensor> + Clone,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ConvertError> {
    let io = |e| ConvertError::io(path, e);
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in tensors.clone() {
        header.insert(t.name.clone(), json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + t.n_bytes()]}));
        offset += t.n_bytes();
    }
    let mut text = serde_json::to_string(&header).map_err(|e| ConvertError::BadFile { path: path.into(), reason: e.to_string() })?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut w = BufWriter::with_capacity(16 << 20, File::create(path).map_err(io)?);
    w.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(text.as_bytes()).map_err(io)?;
    let threads = opts.threads.max(1) as u64;
    for t in tensors {
        let u = match t.fill {
            Fill::Embedding { shared_direction: true, .. } | Fill::ZipfRouter { .. } => shared_direction(t.row_len()),
            _ => Vec::new(),
        };
        let n = t.n_elements();
        let mut start = 0;
        while start < n {
            let batch: Vec<(u64, u64)> =
                (0..threads).map(|k| (start + k * CHUNK, (start + (k + 1) * CHUNK).min(n))).filter(|(a, b)| a < b).collect();
            let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
                let u = &u;
                let handles: Vec<_> = batch.iter().map(|&(a, b)| s.spawn(move || chunk(t, u, a, b))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().map_err(|_| ConvertError::Stopped(format!("generating `{}` failed", t.name))))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            for p in &parts {
                w.write_all(p).map_err(io)?;
                progress(p.len() as u64);
            }
            start = batch.last().map_or(n, |b| b.1);
        }
    }
    w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
}
