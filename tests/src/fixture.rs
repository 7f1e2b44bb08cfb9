//! The tiny MiniMax-01 test file: the real architecture's tensor set and metadata at toy
//! size (dim 64, 2 layers: lightning then softmax, 4 experts of width 128, vocab 256) with
//! deterministic random weights, typed by mxr-convert's precision policy. It is committed
//! as tests/fixtures/tiny-minimax-q8_0.gguf (the README's first command inspects it), and a
//! test checks the committed bytes still equal what this code writes.

use std::path::Path;

use mxr_convert::{tensor_type, TypePlan};
use mxr_models::names::{self, arch_key, arch_keys, blk};
use mxr_quant::gguf::{keys, Array, Builder, FormatError, Value};
use mxr_quant::reference::{quantize, stats::Rng};
use mxr_quant::QType;

pub const FIXTURE: &str = "tests/fixtures/tiny-minimax-q8_0.gguf";

const DIM: u64 = 64;
const N_HEADS: u64 = 2;
const HEAD_DIM: u64 = 32;
const N_KV_HEADS: u64 = 1;
const HIDDEN_DIM: u64 = 128;
const N_EXPERTS: u64 = 4;
const VOCAB: u64 = 256;

/// (GGUF name, ggml dims) of every tensor, in file order.
pub fn tensor_list() -> Vec<(String, Vec<u64>)> {
    let mut t = vec![(names::TOKEN_EMBD.to_string(), vec![DIM, VOCAB])];
    let attn = N_HEADS * HEAD_DIM;
    for (i, lightning) in [(0, true), (1, false)] {
        let mut add = |suffix: &str, dims: Vec<u64>| t.push((names::blk(i, suffix), dims));
        add(blk::ATTN_NORM, vec![DIM]);
        if lightning {
            add(blk::ATTN_QKV, vec![DIM, 3 * attn]);
            add(blk::ATTN_GATE, vec![DIM, attn]);
            add(blk::ATTN_NORM_2, vec![attn]);
        } else {
            add(blk::ATTN_Q, vec![DIM, attn]);
            add(blk::ATTN_K, vec![DIM, N_KV_HEADS * HEAD_DIM]);
            add(blk::ATTN_V, vec![DIM, N_KV_HEADS * HEAD_DIM]);
        }
        add(blk::ATTN_OUTPUT, vec![attn, DIM]);
        add(blk::FFN_NORM, vec![DIM]);
        add(blk::FFN_GATE_INP, vec![DIM, N_EXPERTS]);
        add(blk::FFN_GATE_EXPS, vec![DIM, HIDDEN_DIM, N_EXPERTS]);
        add(blk::FFN_UP_EXPS, vec![DIM, HIDDEN_DIM, N_EXPERTS]);
        add(blk::FFN_DOWN_EXPS, vec![HIDDEN_DIM, DIM, N_EXPERTS]);
    }
    t.push((names::OUTPUT_NORM.to_string(), vec![DIM]));
    t.push((names::OUTPUT.to_string(), vec![DIM, VOCAB]));
    t
}

fn metadata(b: &mut Builder) -> Result<(), FormatError> {
    let u32v = |v: u64| Value::U32(v as u32);
    b.set(keys::GENERAL_ARCHITECTURE, Value::String(names::ARCH.into()))?;
    b.set(keys::GENERAL_NAME, Value::String("tiny-minimax (random weights, test fixture)".into()))?;
    for (k, v) in [
        (arch_keys::CONTEXT_LENGTH, u32v(4096)),
        (arch_keys::EMBEDDING_LENGTH, u32v(DIM)),
        (arch_keys::BLOCK_COUNT, u32v(2)),
        (arch_keys::FEED_FORWARD_LENGTH, u32v(HIDDEN_DIM)),
        (arch_keys::HEAD_COUNT, u32v(N_HEADS)),
        (arch_keys::HEAD_COUNT_KV, u32v(N_KV_HEADS)),
        (arch_keys::KEY_LENGTH, u32v(HEAD_DIM)),
        (arch_keys::VALUE_LENGTH, u32v(HEAD_DIM)),
        (arch_keys::ROPE_DIMENSION_COUNT, u32v(HEAD_DIM / 2)),
        (arch_keys::ROPE_FREQ_BASE, Value::F32(1e7)),
        (arch_keys::RMS_EPS, Value::F32(1e-5)),
        (arch_keys::EXPERT_COUNT, u32v(N_EXPERTS)),
        (arch_keys::EXPERT_USED_COUNT, u32v(2)),
        (arch_keys::RESIDUAL_SCALE, Value::F32((2.0f32 * 2.0).powf(0.25))),
        (arch_keys::RECURRENT_LAYERS, Value::Array(Array::Bool(vec![true, false]))),
    ] {
        b.set(arch_key(k), v)?;
    }
    Ok(())
}

/// Writes the fixture to `path` (through a temp file, renamed on success).
pub fn write_fixture(path: &Path) -> Result<(), FormatError> {
    let plan = TypePlan::uniform(QType::Q8_0);
    let mut b = Builder::new();
    metadata(&mut b)?;
    let list = tensor_list();
    for (name, dims) in &list {
        b.add_tensor(name.clone(), tensor_type(name, dims, &plan).ggml_id(), dims)?;
    }
    let types: Vec<QType> = list.iter().map(|(n, d)| tensor_type(n, d, &plan)).collect();
    let mut w = b.create(path)?;
    let mut rng = Rng::new(0x006d_7872);
    for ((name, dims), q) in list.iter().zip(types) {
        let n: u64 = dims.iter().product();
        let x: Vec<f32> = if dims.len() == 1 { vec![1.0; n as usize] } else { rng.normals(n as usize, 0.05) };
        let mut bytes = vec![0u8; q.row_bytes(x.len()).unwrap_or(0)];
        quantize(q, &x, &mut bytes);
        w.write_tensor(name, &bytes)?;
    }
    w.finish().map(|_| ())
}
