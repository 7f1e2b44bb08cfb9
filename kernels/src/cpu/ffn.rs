//! An expert's SwiGLU feed-forward on the CPU: y = W2[:, hidden] (silu(W1 x) * (W3 x)), the
//! values that two [`matmul`](super::matmul) calls, SiLU and one
//! [`matmul_cols`](super::matmul_cols) give, bit for bit. W1 and W3 go through the
//! workers together, tile by tile, and x is quantized once for both (when they share an
//! activation type). Decode on the CPU (and the cold experts of an offloaded model) runs
//! one such call per expert.

use std::ops::Range;

use mxr_quant::QMatrix;

use super::ggml::{prefetch, AlignedBytes, DotKernel};
use super::matmul::{column_bytes, exact_len, Threads};
use super::pool::{by_row_tiles, BYTES_PER_THREAD, PREFETCH_ABOVE};
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

    // the hidden activations [n_tokens, h], quantized once for the down product
    let useful = ((gate.data.len() + up.data.len() + down.data.len()).saturating_mul(n_tokens) / BYTES_PER_THREAD).max(1);
    let mut hid = vec![0f32; n_tokens * h];
    let large = gate.data.len() + up.data.len() + down.data.len() >= PREFETCH_ABOVE;
    let pair = |r: usize| {
        prefetch(gate.row(r));
        prefetch(up.row(r));
    };
    let pair = large.then_some(&pair as &(dyn Fn(usize) + Sync));
    by_row_tiles(
        h,
        n_tokens,
        threads,
        useful,
        pair,
        |r, t| {
            let g = kg.dot(d_in, gate.row(r), &xg.as_bytes()[t * rg..(t + 1) * rg])?;
            let u = ku.dot(d_in, up.row(r), &xu.as_bytes()[t * ru..(t + 1) * ru])?;
            Ok(swiglu(g, u))
        },
        &mut hid,
    )?;
    let (a, ra) = quantize_rows(&kd, &hid, n_tokens, h)?;
    let a = a.as_bytes();
    let down_row = |r: usize| prefetch(&down.row(r)[first..first + width]);
    let down_row = large.then_some(&down_row as &(dyn Fn(usize) + Sync));
    by_row_tiles(
        d_out,
        n_tokens,
        threads,
        useful,
        down_row,
        |r, t| kd.dot(h, &down.row(r)[first..first + width], &a[t * ra..(t + 1) * ra]),
        y,
    )?;
    Ok(())
}
