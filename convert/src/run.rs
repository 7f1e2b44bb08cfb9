//! The conversion itself: config, checkpoint, plan and tokenizer are read and checked
//! first (so bad input fails before any output exists), then tensor data streams through
//! a three-stage pipeline:
//!
//!   reader (this thread's helper) --jobs--> N quantizer threads --results--> writer
//!
//! The reader cuts each output tensor into chunks of whole rows (about `chunk_bytes` of
//! input); quantizers turn a chunk into output bytes; the writer puts chunks back in order
//! and streams them into the GGUF writer (temp file, renamed on success). Both channels
//! are bounded, so memory is a few chunks per thread whatever the checkpoint size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use mxr_models::config::hf::from_hf_json;
use mxr_models::Config;
use mxr_quant::gguf::{keys, Builder, Value};
use mxr_quant::reference::quantize;
use mxr_quant::QType;

use crate::plan::{plan, OutTensor};
use crate::policy::TypePlan;
use crate::safetensors::{open_checkpoint, Dtype, TensorRef};
use crate::{tokenizer, ConvertError};

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub types: TypePlan,
    /// Quantizer threads.
    pub threads: usize,
    /// Input bytes per work item (rounded to whole rows).
    pub chunk_bytes: usize,
}

impl ConvertOptions {
    pub fn new(types: TypePlan) -> Self {
        ConvertOptions { types, threads: std::thread::available_parallelism().map_or(1, |n| n.get()), chunk_bytes: 8 << 20 }
    }
}

/// What a finished conversion did.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub output: PathBuf,
    pub config: Config,
    pub tensors: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    /// Checkpoint tensors that were not converted (warnings).
    pub unused: Vec<String>,
    pub suppressed_tokens: usize,
}

/// Progress as the writer sees it.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    pub input_done: u64,
    pub input_total: u64,
    pub tensor: &'a str,
}

/// llama.cpp's `general.file_type` for the dominant (expert) type.
fn file_type(q: QType) -> u32 {
    match q {
        QType::F32 => 0,
        QType::F16 => 1,
        QType::Q4_0 => 2,
        QType::Q8_0 => 7,
        QType::Q4K => 15,
        QType::Q6K => 18,
        QType::BF16 => 32,
        QType::Q8K => 7,
    }
}

/// Converts the checkpoint in `dir` to the GGUF file `out`.
pub fn convert(dir: &Path, out: &Path, opts: &ConvertOptions, progress: &(dyn Fn(Progress) + Sync)) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| ConvertError::io(&config_path, e))?;
    let cfg = from_hf_json(&text, &config_path.display().to_string())?;
    let all = open_checkpoint(dir)?;
    let plan = plan(dir, &cfg, &all, opts.types)?;
    let tok = tokenizer::read(dir, cfg.vocab_size)?;
    let embd = all
        .get("model.embed_tokens.weight")
        .ok_or_else(|| ConvertError::Checkpoint { dir: dir.into(), reason: "has no embeddings".into() })?;
    let suppress = zero_rows(embd, tok.base_vocab as u64)?;

    let mut b = Builder::new();
    cfg.write_gguf(&mut b)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    b.set(keys::GENERAL_NAME, Value::String(name))?;
    b.set(keys::GENERAL_FILE_TYPE, Value::U32(file_type(opts.types.experts)))?;
    b.set(keys::GENERAL_QUANTIZATION_VERSION, Value::U32(2))?;
    tok.write_gguf(&mut b, &suppress)?;
    for t in &plan.tensors {
        b.add_tensor(t.name.clone(), t.qtype.ggml_id(), &t.dims)?;
    }
    let output_bytes = b.file_size();
    let mut writer = b.create(out)?;
    let input_total: u64 = plan.tensors.iter().map(OutTensor::input_bytes).sum();
    stream(&plan.tensors, opts, |seq_tensor, bytes, input_done| {
        writer.write(bytes)?;
        progress(Progress { input_done, input_total, tensor: &plan.tensors[seq_tensor].name });
        Ok(())
    })?;
    let output = writer.finish()?;
    Ok(ConvertReport {
        output,
        config: cfg,
        tensors: plan.tensors.len(),
        input_bytes: input_total,
        output_bytes,
        seconds: started.elapsed().as_secs_f64(),
        unused: plan.unused,
        suppressed_tokens: suppress.len(),
    })
}

/// Ids in [from, rows) whose embedding row is all zero (llama.cpp suppresses them).
fn zero_rows(embd: &TensorRef, from: u64) -> Result<Vec<u32>, ConvertError> {
    let rows = embd.n_rows();
    let mut buf = Vec::new();
    let mut ids = Vec::new();
    for r in from.min(rows)..rows {
        embd.read_rows(r, 1, &mut buf)?;
        // +0.0 and -0.0 are both zero: ignore the sign bits.
        let zero = match embd.dtype {
            Dtype::F32 => buf.chunks_exact(4).all(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff == 0),
            _ => buf.chunks_exact(2).all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7fff == 0),
        };
        if zero {
            ids.push(r as u32);
        }
    }
    Ok(ids)
}

/// One chunk of rows of one output tensor.
struct Job {
    seq: u64,
    tensor: usize,
    qtype: QType,
    row_len: usize,
    dtype: Dtype,
    raw: Vec<u8>,
}

enum Msg {
    Done { seq: u64, tensor: usize, bytes: Vec<u8>, input: u64 },
    Failed(ConvertError),
}

/// Runs the pipeline; `write(tensor index, output bytes, input bytes done so far)` is
/// called in file order.
fn stream(
    tensors: &[OutTensor],
    opts: &ConvertOptions,
    mut write: impl FnMut(usize, &[u8], u64) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let threads = opts.threads.max(1);
    let (job_tx, job_rx) = sync_channel::<Job>(threads);
    let (msg_tx, msg_rx) = sync_channel::<Msg>(threads);
    let job_rx = Mutex::new(job_rx);
    let stop = AtomicBool::new(false);
    let pool = BufferPool::new(4 * threads);
    std::thread::scope(|s| {
        let (reader_tx, stop, reader_pool) = (msg_tx.clone(), &stop, &pool);
        s.spawn(move || {
            if let Err(e) = read_jobs(tensors, opts.chunk_bytes, &job_tx, stop, reader_pool) {
                let _ = reader_tx.send(Msg::Failed(e));
            }
        });
        for _ in 0..threads {
            let (rx, tx, worker_pool) = (&job_rx, msg_tx.clone(), &pool);
            s.spawn(move || quantize_jobs(rx, &tx, worker_pool));
        }
        drop(msg_tx);
        let result = write_in_order(msg_rx, &mut write, &pool);
        if result.is_err() {
            // Stop the reader and unblock it: take whatever it still sends until it hangs up.
            stop.store(true, Ordering::Relaxed);
            while let Ok(guard) = job_rx.lock() {
                if guard.recv().is_err() {
                    break;
                }
            }
        }
        result
    })
}

/// Recycled byte buffers: chunks are megabytes each, and fresh allocations of that size are
/// fresh mmaps whose page faults and unmaps cost more system time than the quantization.
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BufferPool {
    fn new(max: usize) -> Self {
        BufferPool { free: Mutex::new(Vec::with_capacity(max)), max }
    }

    fn take(&self) -> Vec<u8> {
        self.free.lock().ok().and_then(|mut f| f.pop()).unwrap_or_default()
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.max {
                f.push(buf);
            }
        }
    }
}

fn read_jobs(
    tensors: &[OutTensor],
    chunk_bytes: usize,
    tx: &SyncSender<Job>,
    stop: &AtomicBool,
    pool: &BufferPool,
) -> Result<(), ConvertError> {
    let mut seq = 0;
    for (ti, t) in tensors.iter().enumerate() {
        for p in &t.pieces {
            let row_in = p.src.row_len() * p.src.dtype.size() as u64;
            let per_chunk = (chunk_bytes as u64 / row_in.max(1)).max(1);
            let mut row = p.row_start;
            while row < p.row_start + p.n_rows {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let n = per_chunk.min(p.row_start + p.n_rows - row);
                let mut raw = pool.take();
                p.src.read_rows(row, n, &mut raw)?;
                let job = Job { seq, tensor: ti, qtype: t.qtype, row_len: t.row_len() as usize, dtype: p.src.dtype, raw };
                if tx.send(job).is_err() {
                    return Ok(()); // the writer stopped; its error is reported there
                }
                seq += 1;
                row += n;
            }
        }
    }
    Ok(())
}

fn quantize_jobs(rx: &Mutex<Receiver<Job>>, tx: &SyncSender<Msg>, pool: &BufferPool) {
    let mut x = Vec::new();
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        x.clear();
        job.dtype.to_f32(&job.raw, &mut x);
        let row_out = job.qtype.row_bytes(job.row_len).unwrap_or(0);
        let n_rows = x.len() / job.row_len.max(1);
        let mut bytes = pool.take();
        bytes.resize(n_rows * row_out, 0);
        for (xr, or) in x.chunks_exact(job.row_len).zip(bytes.chunks_exact_mut(row_out)) {
            quantize(job.qtype, xr, or);
        }
        let msg = Msg::Done { seq: job.seq, tensor: job.tensor, bytes, input: job.raw.len() as u64 };
        pool.give(job.raw);
        if tx.send(msg).is_err() {
            return;
        }
    }
}

fn write_in_order(
    rx: Receiver<Msg>,
    write: &mut impl FnMut(usize, &[u8], u64) -> Result<(), ConvertError>,
    pool: &BufferPool,
) -> Result<(), ConvertError> {
    let mut pending: BTreeMap<u64, (usize, Vec<u8>, u64)> = BTreeMap::new();
    let (mut next, mut done) = (0u64, 0u64);
    for msg in rx {
        match msg {
            Msg::Failed(e) => return Err(e),
            Msg::Done { seq, tensor, bytes, input } => {
                pending.insert(seq, (tensor, bytes, input));
            }
        }
        while let Some((tensor, bytes, input)) = pending.remove(&next) {
            done += input;
            write(tensor, &bytes, done)?;
            pool.give(bytes);
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(ConvertError::Stopped(format!("{} chunks never arrived in order", pending.len())));
    }
    Ok(())
}
