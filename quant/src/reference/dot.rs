//! Reference dot products and matrix-vector products, accumulated in f64.
//!
//! Two references, for two questions:
//! - [`vec_dot`]: the product ggml's CPU `vec_dot` computes — weights against activations
//!   already quantized to the weight type's `vec_dot_type`. Both sides are dequantized
//!   (exact for integer blocks up to f32 rounding of the scales) and summed in f64, so a
//!   fast kernel must match it to f32 rounding.
//! - [`matvec_f64`]: the ideal product of the dequantized weights with the unquantized f32
//!   activations; the distance to it measures activation-quantization error.

use super::dequantize::dequantize;
use super::quantize::quantize;
use crate::matrix::QMatrix;
use crate::qtype::QType;

/// Sum of `w[i] * a[i]` for one weight row (`wtype`) and one activation row (`atype`),
/// both `n` elements, in f64.
pub fn vec_dot(n: usize, wtype: QType, w: &[u8], atype: QType, a: &[u8]) -> f64 {
    let (mut wf, mut af) = (vec![0f32; n], vec![0f32; n]);
    dequantize(wtype, w, &mut wf);
    dequantize(atype, a, &mut af);
    wf.iter().zip(&af).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// y[r] = sum_c W[r, c] * x[c] as ggml computes it: x (`w.cols` values) quantized to the
/// weight type's `vec_dot_type` by the reference quantizer, then [`vec_dot`] per row.
/// Panics if `x.len() != w.cols` (a caller bug: this is a test reference).
pub fn matvec_quantized(w: &QMatrix, x: &[f32]) -> Vec<f64> {
    assert_eq!(x.len(), w.cols, "matvec_quantized: x length");
    let atype = w.qtype.vec_dot_type();
    let mut a = vec![0u8; atype.row_bytes(w.cols).unwrap_or(0)];
    quantize(atype, x, &mut a);
    (0..w.rows).map(|r| vec_dot(w.cols, w.qtype, w.row(r), atype, &a)).collect()
}

/// y[r] = sum_c dequant(W)[r, c] * x[c] in f64, activations unquantized.
/// Panics if `x.len() != w.cols`.
pub fn matvec_f64(w: &QMatrix, x: &[f32]) -> Vec<f64> {
    assert_eq!(x.len(), w.cols, "matvec_f64: x length");
    let mut wf = vec![0f32; w.cols];
    (0..w.rows)
        .map(|r| {
            dequantize(w.qtype, w.row(r), &mut wf);
            wf.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
        })
        .collect()
}
