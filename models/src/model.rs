//! [`Model`]: a MiniMax-01 GGUF file opened for computing — the validated [`Config`], the
//! mapped file, and per-layer handles to its tensors, every shape checked against the
//! config at load so the forward pass never meets a surprise.

use std::path::Path;

use mxr_quant::gguf::{GgufFile, TensorInfo};
use mxr_quant::reference::dequantize;
use mxr_quant::{QMatrix, QType};

use crate::names::{self, blk};
use crate::{Config, LayerKind, ModelError};

/// A tensor of the file: its header entry (the bytes stay in the mapping).
#[derive(Clone, Debug)]
pub struct Tensor(TensorInfo);

impl Tensor {
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

/// The attention tensors of one layer.
#[derive(Clone, Debug)]
pub enum Attention {
    Lightning { qkv: Tensor, gate: Tensor, norm: Vec<f32>, out: Tensor },
    Softmax { q: Tensor, k: Tensor, v: Tensor, out: Tensor },
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attn: Attention,
    pub ffn_norm: Vec<f32>,
    /// Router [n_experts, dim].
    pub router: Tensor,
    /// Stacked experts: gate and up [n_experts * hidden_dim, dim], down [n_experts * dim, hidden_dim].
    pub gate_exps: Tensor,
    pub up_exps: Tensor,
    pub down_exps: Tensor,
}

pub struct Model {
    pub config: Config,
    pub file: GgufFile,
    pub token_embd: Tensor,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// lm_head [vocab, dim] (the embedding when tied).
    pub output: Tensor,
}

impl Model {
    /// Opens and validates a MiniMax-01 GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        let file = GgufFile::open(path)?;
        let config = Config::from_gguf(file.header())?;
        let c = &config;
        let (d, a, kv, h, e, v) =
            (c.dim as u64, c.attn_dim() as u64, c.kv_dim() as u64, c.hidden_dim as u64, c.n_experts as u64, c.vocab_size as u64);
        let t = |name: String, dims: &[u64]| tensor(&file, &name, dims);
        let vec = |name: String, n: u64| -> Result<Vec<f32>, ModelError> { to_f32(&file, &t(name, &[n])?) };
        let token_embd = t(names::TOKEN_EMBD.into(), &[d, v])?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for (i, kind) in c.layers.iter().enumerate() {
            let attn = match kind {
                LayerKind::Lightning => Attention::Lightning {
                    qkv: t(names::blk(i, blk::ATTN_QKV), &[d, 3 * a])?,
                    gate: t(names::blk(i, blk::ATTN_GATE), &[d, a])?,
                    norm: vec(names::blk(i, blk::ATTN_NORM_2), a)?,
                    out: t(names::blk(i, blk::ATTN_OUTPUT), &[a, d])?,
                },
                LayerKind::Softmax => Attention::Softmax {
                    q: t(names::blk(i, blk::ATTN_Q), &[d, a])?,
                    k: t(names::blk(i, blk::ATTN_K), &[d, kv])?,
                    v: t(names::blk(i, blk::ATTN_V), &[d, kv])?,
                    out: t(names::blk(i, blk::ATTN_OUTPUT), &[a, d])?,
                },
            };
            layers.push(Layer {
                attn_norm: vec(names::blk(i, blk::ATTN_NORM), d)?,
                attn,
                ffn_norm: vec(names::blk(i, blk::FFN_NORM), d)?,
                router: t(names::blk(i, blk::FFN_GATE_INP), &[d, e])?,
                gate_exps: t(names::blk(i, blk::FFN_GATE_EXPS), &[d, h, e])?,
                up_exps: t(names::blk(i, blk::FFN_UP_EXPS), &[d, h, e])?,
                down_exps: t(names::blk(i, blk::FFN_DOWN_EXPS), &[h, d, e])?,
            });
        }
        let output_norm = vec(names::OUTPUT_NORM.into(), d)?;
        let output = match file.header().tensor(names::OUTPUT) {
            Some(_) => t(names::OUTPUT.into(), &[d, v])?,
            None => token_embd.clone(),
        };
        Ok(Model { config, file, token_embd, layers, output_norm, output })
    }

    /// The whole tensor as a matrix [product of dims 1.., dims 0].
    pub fn matrix(&self, t: &Tensor) -> QMatrix<'_> {
        self.rows(t, 0, t.0.n_rows() as usize)
    }

    /// Rows [first, first + n) of a tensor as a matrix (an expert of a stacked tensor).
    pub fn rows(&self, t: &Tensor, first: usize, n: usize) -> QMatrix<'_> {
        let info = &t.0;
        let q = info.qtype().unwrap_or(QType::F32); // checked at load: every tensor has a compute type
        let cols = info.dims[0] as usize;
        let row_bytes = q.row_bytes(cols).unwrap_or(0);
        let data = &self.file.bytes()[self.file.header().data_range(info)];
        QMatrix { qtype: q, rows: n, cols, data: &data[first * row_bytes..(first + n) * row_bytes] }
    }

    /// The types of every layer's expert matrices (gate, up and down).
    pub fn expert_types(&self) -> impl Iterator<Item = QType> + '_ {
        self.layers.iter().flat_map(|l| [&l.gate_exps, &l.up_exps, &l.down_exps]).map(|t| self.matrix(t).qtype)
    }

    /// A tensor as a matrix that keeps the mapping itself ([`HostMatrix`]), for work that
    /// outlives a borrow of the model.
    pub fn host_matrix(&self, t: &Tensor) -> HostMatrix {
        let m = self.matrix(t);
        let start = m.data.as_ptr() as usize - self.file.bytes().as_ptr() as usize;
        HostMatrix { file: self.file.shared_bytes(), start, qtype: m.qtype, rows: m.rows, cols: m.cols }
    }

    /// The embedding of token `id` into `out` (dim values).
    pub fn embed(&self, id: u32, out: &mut [f32]) {
        let m = self.rows(&self.token_embd, id as usize, 1);
        dequantize(m.qtype, m.data, out);
    }
}

/// The tensor `name`, which must have ggml dims `dims` and a type mxr computes with.
fn tensor(file: &GgufFile, name: &str, dims: &[u64]) -> Result<Tensor, ModelError> {
    let info = file.header().tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if info.dims != dims {
        return Err(ModelError::TensorShape { name: name.to_string(), expected: dims.to_vec(), actual: info.dims.clone() });
    }
    if info.qtype().is_none() {
        return Err(ModelError::TensorType { name: name.to_string(), found: info.type_info.name.to_string() });
    }
    Ok(Tensor(info.clone()))
}

fn to_f32(file: &GgufFile, t: &Tensor) -> Result<Vec<f32>, ModelError> {
    let info = &t.0;
    let q = info.qtype().unwrap_or(QType::F32);
    let mut out = vec![0f32; info.n_elements as usize];
    dequantize(q, &file.bytes()[file.header().data_range(info)], &mut out);
    Ok(out)
}

/// A tensor of the mapped file as an owned handle: the mapping lasts while it does.
#[derive(Clone)]
pub struct HostMatrix {
    file: mxr_quant::gguf::SharedBytes,
    /// byte offset of the tensor's data in the file
    start: usize,
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
}

impl HostMatrix {
    /// Rows [first, first + n) (an expert of a stacked tensor), None outside the tensor.
    pub fn rows(&self, first: usize, n: usize) -> Option<QMatrix<'_>> {
        let rb = self.qtype.row_bytes(self.cols)?;
        if first.checked_add(n)? > self.rows {
            return None;
        }
        let data = self.file.bytes().get(self.start + first * rb..self.start + (first + n) * rb)?;
        Some(QMatrix { qtype: self.qtype, rows: n, cols: self.cols, data })
    }
}
