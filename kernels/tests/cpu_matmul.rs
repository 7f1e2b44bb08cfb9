//! ggml's CPU matrix products against mxr-quant's f64 references, with named budgets.
//!
//! Budgets (NMSE = Σ(a-b)² / Σb²):
//! - KERNEL_VS_SAME_INPUTS: the kernel against the f64 reference fed the very activation
//!   bytes ggml produced. Only accumulation order and f32 rounding differ: ~1e-7 relative
//!   per dot, so NMSE ~1e-14; 1e-10 leaves room for cancellation in long rows.
//! - ACT_QUANT_*: the kernel against the unquantized-activation product (dequantized
//!   weights · f32 x in f64). Q8_0/Q8_K activations carry ~0.4% relative error per element
//!   (ggml test_mul_mat budget 5e-4); f16 activations 2^-11 relative (NMSE ~1e-7, budget
//!   1e-6); bf16 2^-8 (NMSE ~1e-5, budget 1e-4); f32 none (budget 1e-10).

use mxr_kernels::cpu::{ggml::DotKernel, matmul, matvec, Threads};
use mxr_quant::reference::{self, stats::diff, stats::Rng};
use mxr_quant::{QMatrix, QType};

const KERNEL_VS_SAME_INPUTS: f64 = 1e-10;

fn act_quant_budget(q: QType) -> f64 {
    match q.vec_dot_type() {
        QType::F32 => 1e-10,
        QType::F16 => 1e-6,
        QType::BF16 => 1e-4,
        _ => 5e-4,
    }
}

/// rows x (blocks of the type) cases: single row, rows not a multiple of the 16-row tile,
/// many rows; one block, odd block counts.
fn cases(q: QType) -> Vec<(usize, usize)> {
    let b = q.block_size().max(32);
    vec![(1, b), (65, 3 * b), (513, b), (17, 5 * b)]
}

fn weights(q: QType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let w = Rng::new(seed).normals(rows * cols, 0.05);
    mxr_kernels::cpu::ggml::quantize_chunk(q, &w, cols).unwrap()
}

#[test]
fn matmul_matches_reference_for_every_type_and_ugly_shapes() {
    for q in QType::WEIGHT_TYPES {
        let kernel = DotKernel::new(q).unwrap();
        for (rows, cols) in cases(q) {
            for n_tokens in [1, 7, 65] {
                let wb = weights(q, rows, cols, (rows * cols) as u64);
                let w = QMatrix::new(q, rows, cols, &wb).unwrap();
                let x = Rng::new(n_tokens as u64).normals(n_tokens * cols, 1.0);
                let mut y = vec![f32::NAN; n_tokens * rows];
                matmul(&w, &x, n_tokens, &mut y, Threads(3)).unwrap();

                let mut same = Vec::new();
                let mut ideal = Vec::new();
                for xt in x.chunks_exact(cols) {
                    let mut a = vec![0u8; kernel.activation_bytes(cols).unwrap()];
                    kernel.quantize_activation(xt, &mut a).unwrap();
                    same.extend((0..rows).map(|r| reference::vec_dot(cols, q, w.row(r), kernel.atype, &a)));
                    ideal.extend(reference::matvec_f64(&w, xt));
                }
                let d = diff(&y, &same);
                assert!(d.nmse <= KERNEL_VS_SAME_INPUTS && d.nan_mismatches == 0, "{q} {rows}x{cols} t{n_tokens}: {d}");
                let d = diff(&y, &ideal);
                assert!(d.nmse <= act_quant_budget(q), "{q} {rows}x{cols} t{n_tokens} vs f64: {d}");
            }
        }
    }
}

#[test]
fn activation_quantization_agrees_with_reference_quantizer() {
    // ggml's SIMD Q8_0 activation quantizer rounds ties to even and scales by 127/amax,
    // its reference ties away and scales by 1/(amax/127): values may differ by one level.
    for q in [QType::Q8_0, QType::Q4K, QType::BF16, QType::F16] {
        let kernel = DotKernel::new(q).unwrap();
        let x = Rng::new(5).normals(256 * 9, 1.0);
        let mut a = vec![0u8; kernel.activation_bytes(x.len()).unwrap()];
        kernel.quantize_activation(&x, &mut a).unwrap();
        let ours = reference::quantize_to_vec(kernel.atype, &x).unwrap();
        let (da, db) = (
            reference::dequantize_to_vec(kernel.atype, &a, x.len()).unwrap(),
            reference::dequantize_to_vec(kernel.atype, &ours, x.len()).unwrap(),
        );
        let d = diff(&da, &db);
        assert!(d.nmse < 1e-6, "{q} activations ({}): {d}", kernel.atype);
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let q = QType::Q4K;
    let (rows, cols) = (100, 512);
    let wb = weights(q, rows, cols, 1);
    let w = QMatrix::new(q, rows, cols, &wb).unwrap();
    let x = Rng::new(2).normals(3 * cols, 1.0);
    let run = |t| {
        let mut y = vec![0f32; 3 * rows];
        matmul(&w, &x, 3, &mut y, Threads(t)).unwrap();
        y
    };
    let one = run(1);
    for t in [2, 5, 64] {
        assert!(run(t).iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()), "{t} threads");
    }
    let mut y = vec![0f32; rows];
    matvec(&w, &x[..cols], &mut y, Threads::all()).unwrap();
    assert!(y.iter().zip(&one[..rows]).all(|(a, b)| a.to_bits() == b.to_bits()), "matvec == first matmul row");
}

#[test]
fn shape_errors_are_reported_not_panics() {
    let wb = weights(QType::Q8_0, 4, 64, 1);
    let w = QMatrix::new(QType::Q8_0, 4, 64, &wb).unwrap();
    let mut y = vec![0f32; 4];
    let e = matvec(&w, &[0.0; 63], &mut y, Threads(1)).unwrap_err().to_string();
    assert!(e.contains("x has 63 elements, expected 64"), "{e}");
    let e = matvec(&w, &[0.0; 64], &mut y[..3], Threads(1)).unwrap_err().to_string();
    assert!(e.contains("y has 3 elements, expected 4"), "{e}");
    assert!(QMatrix::new(QType::Q8_0, 4, 64, &wb[1..]).is_err());
    assert!(QMatrix::new(QType::Q4K, 1, 100, &[]).is_err());
    let k = DotKernel::new(QType::Q8_0).unwrap();
    assert!(k.dot(64, &wb[..68], &[0u8; 60]).is_err());
}

/// A product split by columns (a cold expert's hidden units shared between the GPU and the
/// CPU) sums to the whole: each part quantizes its own slice of x, block by block as the
/// whole does, so only the order of the f32 sums differs. Columns that are not whole
/// blocks, or that run past the matrix, are an error.
#[test]
fn matmul_over_column_ranges_sums_to_the_whole() {
    use mxr_kernels::cpu::matmul_cols;
    for q in QType::WEIGHT_TYPES {
        let b = q.block_size().max(32);
        let (rows, cols, n_tokens) = (37, 5 * b, 3);
        let wb = weights(q, rows, cols, 11);
        let w = QMatrix::new(q, rows, cols, &wb).unwrap();
        let x = Rng::new(12).normals(n_tokens * cols, 1.0);
        let mut whole = vec![0f32; n_tokens * rows];
        matmul(&w, &x, n_tokens, &mut whole, Threads(2)).unwrap();
        let cut = 2 * b;
        let part = |range: std::ops::Range<usize>| {
            let xs: Vec<f32> = x.chunks_exact(cols).flat_map(|xt| xt[range.clone()].to_vec()).collect();
            let mut y = vec![f32::NAN; n_tokens * rows];
            matmul_cols(&w, range, &xs, n_tokens, &mut y, Threads(2)).unwrap();
            y
        };
        let (a, c) = (part(0..cut), part(cut..cols));
        let sum: Vec<f32> = a.iter().zip(&c).map(|(p, r)| p + r).collect();
        let d = diff(&sum, &whole.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!(d.nmse <= KERNEL_VS_SAME_INPUTS && d.nan_mismatches == 0, "{q}: {d}");
        // the parts differ from each other, so neither is the whole on its own
        assert!(diff(&a, &whole.iter().map(|&v| v as f64).collect::<Vec<_>>()).nmse > 1e-3, "{q}");
        let mut y = vec![0f32; n_tokens * rows];
        if q.block_size() > 1 {
            assert!(matmul_cols(&w, 1..cut, &x[..n_tokens * (cut - 1)], n_tokens, &mut y, Threads(1)).is_err(), "{q}: half a block");
        }
        assert!(
            matmul_cols(&w, cut..cols + b, &x[..n_tokens * (cols + b - cut)], n_tokens, &mut y, Threads(1)).is_err(),
            "{q}: past the end"
        );
    }
}

/// An expert's whole SwiGLU feed-forward in one parallel region gives exactly what the
/// three products it replaces give (gate and up with `matmul`, SiLU, down with
/// `matmul_cols` over the same hidden units), for every weight type, one and several
/// tokens, any thread count, and a part of the hidden units (a shared cold expert's).
#[test]
fn swiglu_ffn_equals_its_three_products() {
    use mxr_kernels::cpu::{matmul_cols, swiglu_ffn};
    let silu = |v: f32| v / (1.0 + (-v).exp());
    for q in QType::WEIGHT_TYPES {
        let b = q.block_size().max(32);
        // d_in of whole blocks; 3 blocks of hidden units (rows not a multiple of the tile);
        // an output width of 37 rows
        let (d_in, h, d_out) = (2 * b, 3 * b, 37);
        let gb = weights(q, h, d_in, 21);
        let ub = weights(q, h, d_in, 22);
        let db = weights(q, d_out, h, 23);
        let (gate, up, down) =
            (QMatrix::new(q, h, d_in, &gb).unwrap(), QMatrix::new(q, h, d_in, &ub).unwrap(), QMatrix::new(q, d_out, h, &db).unwrap());
        for (n_tokens, hidden) in [(1usize, 0..h), (3, 0..h), (2, b..h)] {
            let x = Rng::new(24 + n_tokens as u64).normals(n_tokens * d_in, 1.0);
            let hn = hidden.len();
            let rb = gate.row_bytes();
            let part = hidden.start * rb..hidden.end * rb;
            let (g, u) = (QMatrix::new(q, hn, d_in, &gb[part.clone()]).unwrap(), QMatrix::new(q, hn, d_in, &ub[part]).unwrap());
            let mut gy = vec![0f32; n_tokens * hn];
            let mut uy = vec![0f32; n_tokens * hn];
            matmul(&g, &x, n_tokens, &mut gy, Threads(2)).unwrap();
            matmul(&u, &x, n_tokens, &mut uy, Threads(2)).unwrap();
            let act: Vec<f32> = gy.iter().zip(&uy).map(|(&a, &c)| silu(a) * c).collect();
            let mut want = vec![0f32; n_tokens * d_out];
            matmul_cols(&down, hidden.clone(), &act, n_tokens, &mut want, Threads(2)).unwrap();
            for threads in [1, 2, 5] {
                let mut got = vec![f32::NAN; n_tokens * d_out];
                swiglu_ffn(&g, &u, &down, hidden.clone(), &x, n_tokens, &mut got, Threads(threads)).unwrap();
                let same = got.iter().zip(&want).all(|(a, c)| a.to_bits() == c.to_bits());
                assert!(same, "{q}: {n_tokens} tokens, hidden {hidden:?}, {threads} threads");
            }
        }
        // shapes that do not fit are errors, not panics
        let x = vec![0f32; d_in];
        let mut y = vec![0f32; d_out];
        assert!(swiglu_ffn(&gate, &up, &down, 0..h - 1, &x, 1, &mut y, Threads(2)).is_err(), "{q}: hidden units and rows differ");
        assert!(swiglu_ffn(&gate, &up, &down, 0..h, &x[..d_in - 1], 1, &mut y, Threads(2)).is_err(), "{q}: short x");
        assert!(swiglu_ffn(&gate, &up, &down, 0..h, &x, 1, &mut y[..d_out - 1], Threads(2)).is_err(), "{q}: short y");
    }
}

/// Matrices large enough to have their rows prefetched (8 MiB and up) give the dot
/// kernel's own products bit for bit, whole and over a column range, and so does an
/// expert of that size through `swiglu_ffn`.
#[test]
fn large_prefetched_matrices_give_the_dot_kernels_products() {
    use mxr_kernels::cpu::{matmul_cols, swiglu_ffn};
    let q = QType::Q4K;
    let (rows, cols) = (2560, 2048);
    let rb = q.row_bytes(cols).unwrap();
    // 97 distinct rows in turn: a 10240 x 2048 matrix of 11.8 MB, and an expert whose gate
    // and up are two quarters of it (2560 x 2048) and down 2048 x 2560 (8.8 MB together)
    let distinct = weights(q, 97, cols, 7);
    let tall: Vec<u8> = distinct.chunks_exact(rb).cycle().take(4 * rows).flatten().copied().collect();
    assert!(tall.len() >= 8 << 20);
    let w = QMatrix::new(q, 4 * rows, cols, &tall).unwrap();
    let kernel = DotKernel::new(q).unwrap();
    for (range, n_tokens) in [(0..cols, 1), (256..cols - 512, 2)] {
        let c = range.len();
        let x = Rng::new(9).normals(n_tokens * c, 1.0);
        let mut y = vec![f32::NAN; n_tokens * w.rows];
        matmul_cols(&w, range.clone(), &x, n_tokens, &mut y, Threads(3)).unwrap();
        let (first, width) = (q.row_bytes(range.start).unwrap(), q.row_bytes(c).unwrap());
        for t in 0..n_tokens {
            let mut a = vec![0u8; kernel.activation_bytes(c).unwrap()];
            kernel.quantize_activation(&x[t * c..(t + 1) * c], &mut a).unwrap();
            for r in 0..w.rows {
                let want = kernel.dot(c, &w.row(r)[first..first + width], &a).unwrap();
                assert_eq!(y[t * w.rows + r].to_bits(), want.to_bits(), "row {r}, token {t}, columns {range:?}");
            }
        }
    }
    let (h, d) = (rows, cols);
    let gate = QMatrix::new(q, h, d, &tall[..h * rb]).unwrap();
    let up = QMatrix::new(q, h, d, &tall[h * rb..2 * h * rb]).unwrap();
    let db = weights(q, d, h, 8);
    let down = QMatrix::new(q, d, h, &db).unwrap();
    let x = Rng::new(10).normals(d, 1.0);
    let (mut gy, mut uy) = (vec![0f32; h], vec![0f32; h]);
    matmul(&gate, &x, 1, &mut gy, Threads(2)).unwrap();
    matmul(&up, &x, 1, &mut uy, Threads(2)).unwrap();
    let act: Vec<f32> = gy.iter().zip(&uy).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    let mut want = vec![0f32; d];
    matmul(&down, &act, 1, &mut want, Threads(2)).unwrap();
    let mut got = vec![f32::NAN; d];
    swiglu_ffn(&gate, &up, &down, 0..h, &x, 1, &mut got, Threads(3)).unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
}
