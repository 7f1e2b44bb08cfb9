//! Saving and loading a [`Session`]: the lightning states (constant size) and the KV caches,
//! so a long document read once can be resumed instantly.
//!
//! Format (little-endian): b"MXRS", version u32 (1), model fingerprint u64, position u64,
//! the `position` token ids (u32 each), layer count u32, then per layer three f32 arrays
//! (lightning state, K cache, V cache), each a u64 element count and the values, and last
//! the caller's extra bytes (u64 length + bytes; the chat REPL keeps its messages there).
//! The fingerprint hashes the model file's size and header, so a session never loads into
//! a different model.

use std::io::{BufWriter, Read, Write};
use std::path::Path;

use super::attention::KvCache;
use super::Session;
use crate::{Model, ModelError};

const MAGIC: &[u8; 4] = b"MXRS";
const VERSION: u32 = 1;

/// FNV-1a over the file size and the header bytes of the model.
pub fn fingerprint(model: &Model) -> u64 {
    let bytes = model.file.bytes();
    let header = &bytes[..(model.file.header().data_offset as usize).min(bytes.len())];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in (bytes.len() as u64).to_le_bytes().iter().chain(header) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn io(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Input(format!("{}: {e}", path.display()))
}

impl Session {
    /// Writes the session to `path` (through a temporary file renamed on success).
    pub fn save(&self, model: &Model, path: &Path, extra: &[u8]) -> Result<(), ModelError> {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let result = (|| -> std::io::Result<()> {
            let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
            w.write_all(MAGIC)?;
            w.write_all(&VERSION.to_le_bytes())?;
            w.write_all(&fingerprint(model).to_le_bytes())?;
            w.write_all(&(self.pos as u64).to_le_bytes())?;
            for t in &self.tokens {
                w.write_all(&t.to_le_bytes())?;
            }
            w.write_all(&(self.lightning.len() as u32).to_le_bytes())?;
            for (state, kv) in self.lightning.iter().zip(&self.kv) {
                for a in [state, &kv.k, &kv.v] {
                    w.write_all(&(a.len() as u64).to_le_bytes())?;
                    for v in a {
                        w.write_all(&v.to_le_bytes())?;
                    }
                }
            }
            w.write_all(&(extra.len() as u64).to_le_bytes())?;
            w.write_all(extra)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(path, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    }

    /// Reads a session saved for `model` and its extra bytes; refuses one saved for another
    /// model.
    pub fn load(model: &Model, path: &Path) -> Result<(Session, Vec<u8>), ModelError> {
        let mut bytes = Vec::new();
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| io(path, e))?;
        let bad = |why: &str| ModelError::Input(format!("{}: not a session of this model ({why})", path.display()));
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], ModelError> {
            let s = bytes.get(at..at + n).ok_or_else(|| bad("truncated"))?;
            at += n;
            Ok(s)
        };
        if take(4)? != MAGIC {
            return Err(bad("wrong magic"));
        }
        let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let u64_of = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        if u32_of(take(4)?) != VERSION {
            return Err(bad("unknown version"));
        }
        if u64_of(take(8)?) != fingerprint(model) {
            return Err(bad("saved for a different model file"));
        }
        let pos = u64_of(take(8)?) as usize;
        let tokens: Vec<u32> = take(pos.checked_mul(4).ok_or_else(|| bad("size"))?)?.chunks_exact(4).map(u32_of).collect();
        let fresh = Session::new(&model.config);
        if u32_of(take(4)?) as usize != fresh.lightning.len() {
            return Err(bad("layer count"));
        }
        let c = &model.config;
        let mut s = Session { pos, tokens, lightning: Vec::new(), kv: Vec::new(), expert_counts: fresh.expert_counts.clone() };
        for l in 0..c.n_layers {
            let mut arrays = Vec::with_capacity(3);
            for (which, expected) in [("state", Some(fresh.lightning[l].len())), ("keys", None), ("values", None)] {
                let n = u64_of(take(8)?) as usize;
                let want = expected.unwrap_or(if fresh.lightning[l].is_empty() { pos * c.kv_dim() } else { 0 });
                if n != want {
                    return Err(bad(&format!("layer {l} {which}: {n} values, expected {want}")));
                }
                let raw = take(n.checked_mul(4).ok_or_else(|| bad("size"))?)?;
                arrays.push(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<f32>>());
            }
            let v = arrays.pop().unwrap_or_default();
            let k = arrays.pop().unwrap_or_default();
            s.lightning.push(arrays.pop().unwrap_or_default());
            s.kv.push(KvCache { k, v });
        }
        let n_extra = u64_of(take(8)?) as usize;
        let extra = take(n_extra)?.to_vec();
        if at != bytes.len() {
            return Err(bad("trailing bytes"));
        }
        Ok((s, extra))
    }
}
