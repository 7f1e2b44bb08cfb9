//! Parallel quantized matrix products over ggml's CPU `vec_dot`.
//!
//! y = x · Wᵀ with W: [rows, cols] in any [`QType`] (row-major, ggml's layout), x: [n_tokens,
//! cols] f32, y: [n_tokens, rows] f32. As ggml does: each activation row is quantized once
//! to the weight type's `vec_dot_type`, then every (weight row, token) pair is one
//! `vec_dot`. Work is split into tiles of weight rows shared out among the kernels' worker
//! threads ([`super::pool`]); a tile covers all tokens, so its weight rows are read from
//! memory once and stay in cache while the tokens go by.

use mxr_quant::QMatrix;

use super::ggml::{AlignedBytes, DotKernel};
use super::pool::{by_row_tiles, BYTES_PER_THREAD, PREFETCH_ABOVE};
use crate::KernelError;

type Result<T> = std::result::Result<T, KernelError>;

/// How many threads a CPU op may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threads(pub usize);

impl Threads {
    /// All cores the process may run on.
    pub fn all() -> Threads {
        Threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// The byte offset and length, within each of W's rows, of its columns `cols` (whole
/// blocks of its type).
pub(super) fn column_bytes(w: &QMatrix, cols: &std::ops::Range<usize>) -> Result<(usize, usize)> {
    let blocks = |c: usize| {
        w.qtype.row_bytes(c).ok_or_else(|| {
            KernelError::Shape(format!(
                "matmul columns {}..{}: not whole {} blocks of {}",
                cols.start,
                cols.end,
                w.qtype,
                w.qtype.block_size()
            ))
        })
    };
    if cols.end > w.cols || cols.start > cols.end {
        return Err(KernelError::Shape(format!("matmul columns {}..{} of a {}-column matrix", cols.start, cols.end, w.cols)));
    }
    Ok((blocks(cols.start)?, blocks(cols.len())?))
}

/// y[r] = Σ_c W[r, c] · x[c].
pub fn matvec(w: &QMatrix, x: &[f32], y: &mut [f32], threads: Threads) -> Result<()> {
    matmul(w, x, 1, y, threads)
}

/// y[t, r] = Σ_c W[r, c] · x[t, c] for t < n_tokens.
pub fn matmul(w: &QMatrix, x: &[f32], n_tokens: usize, y: &mut [f32], threads: Threads) -> Result<()> {
    matmul_cols(w, 0..w.cols, x, n_tokens, y, threads)
}

/// [`matmul`] over the columns `cols` of W only (whole blocks of its type): y[t, r] =
/// Σ_{c in cols} W[r, c] · x[t, c - cols.start], x: [n_tokens, cols.len()]. A product
/// split by columns between devices (the hidden units of a cold expert) sums the parts.
pub fn matmul_cols(w: &QMatrix, cols: std::ops::Range<usize>, x: &[f32], n_tokens: usize, y: &mut [f32], threads: Threads) -> Result<()> {
    let rows = w.rows;
    let (first, width) = column_bytes(w, &cols)?;
    let cols = cols.len();
    exact_len("matmul", "x", n_tokens * cols, x.len())?;
    exact_len("matmul", "y", n_tokens * rows, y.len())?;
    if rows == 0 || n_tokens == 0 {
        return Ok(());
    }
    let kernel = DotKernel::new(w.qtype)?;
    let a_row = kernel.activation_bytes(cols)?;
    let mut acts = AlignedBytes::zeroed(a_row * n_tokens);
    for (xt, at) in x.chunks_exact(cols).zip(acts.as_bytes_mut().chunks_exact_mut(a_row)) {
        kernel.quantize_activation(xt, at)?;
    }
    let acts = acts.as_bytes();
    let useful = (w.data.len().saturating_mul(n_tokens) / BYTES_PER_THREAD).max(1);
    let prefetch = |r: usize| super::ggml::prefetch(&w.row(r)[first..first + width]);
    let prefetch = (w.data.len() >= PREFETCH_ABOVE).then_some(&prefetch as &(dyn Fn(usize) + Sync));
    by_row_tiles(
        rows,
        n_tokens,
        threads,
        useful,
        prefetch,
        |r, t| kernel.dot(cols, &w.row(r)[first..first + width], &acts[t * a_row..(t + 1) * a_row]),
        y,
    )
}

pub(super) fn exact_len(op: &'static str, what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::Length { op, what, expected, actual })
    }
}
