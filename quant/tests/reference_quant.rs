//! Reference quantizers on their own: round-trip error within ggml's test-quantize-fns
//! budgets, exact f16/bf16 conversions, and the block invariants the kernels rely on.

use mxr_quant::blocks::{Block, BlockQ8K};
use mxr_quant::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use mxr_quant::reference::{
    self,
    stats::{cos_pattern, diff, rmse, Rng},
};
use mxr_quant::QType;

/// Round-trip RMSE budgets on 0.1 + 2cos(i + offset) data (|x| <= 2.1). A b-bit block
/// quantizer with step s has uniform rounding error, RMSE ~ s / sqrt(12):
/// Q8_0 s = 2.1/127 -> 0.0048; Q6_K s ~ 2.1/31 -> 0.020; Q4_0 s = 2.1/8 -> 0.076;
/// Q4_K (asymmetric, optimised min/scale per 32) s ~ 4.2/15 -> <= 0.081; BF16 step 2^-7 on
/// [1, 2) -> 0.0023; F16 2^-10 -> 0.0003. Budgets sit ~20% above these.
fn budget(q: QType) -> f64 {
    match q {
        QType::F32 => 0.0,
        QType::F16 => 0.0004,
        QType::BF16 => 0.0028,
        QType::Q8_0 => 0.0058,
        QType::Q6K => 0.024,
        QType::Q4K => 0.08,
        QType::Q4_0 => 0.09,
        QType::Q8K => unreachable!(),
    }
}

/// ggml test-quantize-fns' own metric, sqrt(sum d^2) / n on 4096 values, and its budget.
fn ggml_total_error(x: &[f32], y: &[f32]) -> f64 {
    let s: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    s.sqrt() / x.len() as f64
}

#[test]
fn round_trip_error_is_within_budgets() {
    for q in QType::WEIGHT_TYPES {
        for n in [256, 4096] {
            let x = cos_pattern(n, 0.37);
            let bytes = reference::quantize_to_vec(q, &x).unwrap();
            let y = reference::dequantize_to_vec(q, &bytes, n).unwrap();
            let e = rmse(&y, &x);
            println!("{q} n={n}: rmse {e:.5}");
            assert!(e <= budget(q), "{q} n={n}: rmse {e}");
            if n == 4096 {
                assert!(ggml_total_error(&x, &y) <= 0.002, "{q}: ggml test-quantize-fns metric");
            }
            if q == QType::F32 {
                assert_eq!(x, y);
            }
        }
    }
}

#[test]
fn more_bits_give_less_error() {
    let x = Rng::new(1).normals(256 * 16, 1.0);
    let err = |q| {
        let b = reference::quantize_to_vec(q, &x).unwrap();
        rmse(&reference::dequantize_to_vec(q, &b, x.len()).unwrap(), &x)
    };
    let (q4_0, q4k, q6k, q8_0, bf16, f16) =
        (err(QType::Q4_0), err(QType::Q4K), err(QType::Q6K), err(QType::Q8_0), err(QType::BF16), err(QType::F16));
    assert!(q4k < q4_0 && q6k < q4k && q8_0 < q6k && f16 < bf16 && bf16 < q8_0, "{q4_0} {q4k} {q6k} {q8_0} {bf16} {f16}");
}

#[test]
fn f16_round_trips_every_finite_half_and_rounds_to_nearest_even() {
    for h in 0..=u16::MAX {
        let f = f16_to_f32(h);
        if f.is_nan() {
            assert!(f16_to_f32(f32_to_f16(f)).is_nan());
        } else {
            assert_eq!(f32_to_f16(f), h, "half {h:#06x} = {f}");
        }
    }
    // 1 + 2^-11 is halfway between 1 and the next half: ties to even (1.0).
    assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
    assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
    assert_eq!(f32_to_f16(65520.0), 0x7C00, "rounds to +inf");
    assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001, "smallest subnormal");
}

#[test]
fn bf16_rounds_to_nearest_even_and_keeps_nan() {
    assert_eq!(f32_to_bf16(1.0), 0x3F80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80, "tie to even (down)");
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82, "tie to even (up)");
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    for h in (0..=u16::MAX).filter(|h| !bf16_to_f32(*h).is_nan()) {
        assert_eq!(f32_to_bf16(bf16_to_f32(h)), h);
    }
}

#[test]
fn q8k_block_sums_match_its_quants() {
    let x = Rng::new(4).normals(256 * 3, 2.0);
    let bytes = reference::quantize_to_vec(QType::Q8K, &x).unwrap();
    for b in bytes.chunks_exact(BlockQ8K::BYTES) {
        let blk = BlockQ8K::read(b);
        for (j, s) in blk.bsums.iter().enumerate() {
            assert_eq!(*s as i32, blk.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum::<i32>());
        }
        assert!(blk.qs.iter().all(|&q| q >= -127), "q8_K stays in [-127, 127]");
    }
}

#[test]
fn all_zero_and_constant_rows_are_exact() {
    for q in QType::WEIGHT_TYPES {
        for x in [vec![0.0f32; 512], vec![0.5f32; 512]] {
            let b = reference::quantize_to_vec(q, &x).unwrap();
            let y = reference::dequantize_to_vec(q, &b, 512).unwrap();
            let d = diff(&y, &x);
            assert!(d.max_abs <= 1e-3 * x[0].abs() as f64 + 1e-30, "{q} constant {}: {d}", x[0]);
        }
    }
}

#[test]
fn quantized_dot_tracks_the_exact_product() {
    // The reference matvec with quantized activations stays within the activation
    // quantization budget of the ideal f64 product (ggml test_mul_mat: NMSE 5e-4).
    let (rows, cols) = (9, 512);
    let mut rng = Rng::new(8);
    let w = rng.normals(rows * cols, 0.1);
    let x = rng.normals(cols, 1.0);
    for q in QType::WEIGHT_TYPES {
        let wb: Vec<u8> = w.chunks(cols).flat_map(|r| reference::quantize_to_vec(q, r).unwrap()).collect();
        let w = mxr_quant::QMatrix::new(q, rows, cols, &wb).unwrap();
        let got = reference::matvec_quantized(&w, &x);
        let want = reference::matvec_f64(&w, &x);
        let d = diff(&got, &want);
        assert!(d.nmse < 5e-4, "{q}: {d}");
    }
}

#[test]
fn qtype_names_parse_and_sizes_are_consistent() {
    for q in QType::WEIGHT_TYPES {
        assert_eq!(QType::parse(&q.to_string()), Some(q));
        assert_eq!(QType::from_ggml(q.ggml_id()), Some(q));
        assert_eq!(q.row_bytes(q.block_size() * 3), Some(q.type_size() * 3));
        assert_eq!(q.row_bytes(q.block_size() + 1).is_some(), q.block_size() == 1);
    }
    assert_eq!(QType::parse("q4_k"), Some(QType::Q4K));
    assert_eq!(QType::parse("q5_k"), None);
    assert!((QType::Q4K.bits_per_weight() - 4.5).abs() < 1e-12);
    assert!((QType::Q8_0.bits_per_weight() - 8.5).abs() < 1e-12);
}
