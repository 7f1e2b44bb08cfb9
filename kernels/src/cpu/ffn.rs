//! An expert's SwiGLU feed-forward on the CPU in one parallel region:
//! y = W2[:, hidden] (silu(W1 x) * (W3 x)), the values that two [`matmul`](super::matmul)
//! calls, SiLU and one [`matmul_cols`](super::matmul_cols) give, bit for bit. The threads
//! start once instead of three times, x is quantized once for W1 and W3 (when they share
//! an activation type), and one thread quantizes the hidden activations for W2 between the
//! two phases. Decode on the CPU (and the cold experts of an offloaded model) runs one
//! such call per expert, so the two thread starts saved are a large part of a small
//! product.

use std::ops::Range;
use std::sync::atomic::AtomicUsize;
use std::sync::{Barrier, Mutex, OnceLock};

use mxr_quant::QMatrix;

use super::ggml::{AlignedBytes, DotKernel};
use super::matmul::{column_bytes, exact_len, place_tiles, tile_worker, Threads, BYTES_PER_THREAD, TILE_ROWS};
use crate::KernelError;

type Result<T> = std::result::Result<T, KernelError>;

/// silu(g) * u, as mxr's CPU forward computes it.
fn swiglu(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// Quantized activation rows for `kernel`: x [n, cols] -> n rows of its activation type.
fn quantize_rows(kernel: &DotKernel, x: &[f32], n: usize, cols: usize) -> Result<(AlignedBytes, usize)> {
    let row = kernel.activation_bytes(cols)?;
    let mut a = AlignedBytes::zeroed(row * n);
    for (xt, at) in x.chunks_exact(cols).zip(a.as_bytes_mut().chunks_exact_mut(row)) {
        kernel.quantize_activation(xt, at)?;
    }
    Ok((a, row))
}

/// y [n_tokens, down.rows] = down[:, hidden] · (silu(gate · x) * (up · x)) for x
/// [n_tokens, gate.cols]; gate and up hold the hidden units `hidden` of the expert (rows
/// hidden.len()), down all its columns (the part `hidden` is used: whole blocks of its type).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_ffn(
    gate: &QMatrix,
    up: &QMatrix,
    down: &QMatrix,
    hidden: Range<usize>,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    threads: Threads,
) -> Result<()> {
    let (h, d_in, d_out) = (hidden.len(), gate.cols, down.rows);
    if up.rows != h || gate.rows != h || up.cols != d_in {
        return Err(KernelError::Shape(format!(
            "swiglu_ffn: gate {}x{} and up {}x{} for {h} hidden units",
            gate.rows, gate.cols, up.rows, up.cols
        )));
    }
    let (first, width) = column_bytes(down, &hidden)?;
    exact_len("swiglu_ffn", "x", n_tokens * d_in, x.len())?;
    exact_len("swiglu_ffn", "y", n_tokens * d_out, y.len())?;
    if n_tokens == 0 || d_out == 0 {
        return Ok(());
    }
    let (kg, ku, kd) = (DotKernel::new(gate.qtype)?, DotKernel::new(up.qtype)?, DotKernel::new(down.qtype)?);
    let (xg, rg) = quantize_rows(&kg, x, n_tokens, d_in)?;
    let xu = if ku.atype == kg.atype { None } else { Some(quantize_rows(&ku, x, n_tokens, d_in)?) };
    let (xu, ru) = xu.as_ref().map_or((&xg, rg), |(a, r)| (a, *r));

    let (tiles1, tiles2) = (h.div_ceil(TILE_ROWS), d_out.div_ceil(TILE_ROWS));
    let bytes = (gate.data.len() + up.data.len() + down.data.len()).saturating_mul(n_tokens);
    let n_threads = threads.0.clamp(1, tiles1.max(tiles2).max(1)).min((bytes / BYTES_PER_THREAD).max(1));
    let (next1, next2) = (AtomicUsize::new(0), AtomicUsize::new(0));
    // finished tiles: (first row, [n_tokens, tile rows]) of the hidden activations, then of y
    let hidden_done: Mutex<Vec<(usize, Vec<f32>)>> = Mutex::new(Vec::with_capacity(tiles1));
    let out_done: Mutex<Vec<(usize, Vec<f32>)>> = Mutex::new(Vec::with_capacity(tiles2));
    let act: OnceLock<(AlignedBytes, usize)> = OnceLock::new();
    let failed: Mutex<Option<KernelError>> = Mutex::new(None);
    let barrier = Barrier::new(n_threads);
    let fail = |e: KernelError| {
        if let Ok(mut f) = failed.lock() {
            f.get_or_insert(e);
        }
    };
    let lock_err = || KernelError::Threads("a worker panicked".into());

    let phase1 = || {
        tile_worker(&next1, h, n_tokens, &hidden_done, |r, t| {
            let g = kg.dot(d_in, gate.row(r), &xg.as_bytes()[t * rg..(t + 1) * rg])?;
            let u = ku.dot(d_in, up.row(r), &xu.as_bytes()[t * ru..(t + 1) * ru])?;
            Ok(swiglu(g, u))
        })
    };
    // the hidden activations [n_tokens, h], quantized for the down product (one thread)
    let between = || -> Result<(AlignedBytes, usize)> {
        let mut a = vec![0f32; n_tokens * h];
        place_tiles(&hidden_done.lock().map_err(|_| lock_err())?, n_tokens, h, &mut a);
        quantize_rows(&kd, &a, n_tokens, h)
    };
    let phase2 = |(a, ra): &(AlignedBytes, usize)| {
        tile_worker(&next2, d_out, n_tokens, &out_done, |r, t| {
            kd.dot(h, &down.row(r)[first..first + width], &a.as_bytes()[t * ra..(t + 1) * ra])
        })
    };
    // Every worker reaches both barriers whatever happens, so an error cannot strand the
    // others: errors are recorded and the later work skipped.
    let work = || {
        if let Err(e) = phase1() {
            fail(e);
        }
        if barrier.wait().is_leader() {
            let ok = failed.lock().map(|f| f.is_none()).unwrap_or(false);
            if ok {
                match between() {
                    Ok(a) => _ = act.set(a),
                    Err(e) => fail(e),
                }
            }
        }
        barrier.wait();
        if let Some(a) = act.get() {
            if let Err(e) = phase2(a) {
                fail(e);
            }
        }
    };
    if n_threads == 1 {
        work();
    } else {
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (1..n_threads).map(|_| s.spawn(work)).collect();
            work();
            for handle in handles {
                handle.join().map_err(|_| lock_err())?;
            }
            Ok(())
        })?;
    }
    if let Some(e) = failed.into_inner().map_err(|_| lock_err())? {
        return Err(e);
    }
    if act.get().is_none() {
        return Err(KernelError::Threads("swiglu_ffn: the hidden activations were not made".into()));
    }
    place_tiles(&out_done.into_inner().map_err(|_| lock_err())?, n_tokens, d_out, y);
    Ok(())
}
