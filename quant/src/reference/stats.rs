//! Error metrics and deterministic test inputs shared by every crate's tests.
//!
//! Comparisons report the worst element (index and both values), the NaN count and the
//! normalized mean squared error NMSE = sum((a-b)^2) / sum(b^2) (ggml test-backend-ops),
//! so a failing test says where and by how much.

use std::fmt;

/// How far `actual` is from `expected`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Diff {
    pub max_abs: f64,
    /// Index of the largest absolute difference.
    pub at: usize,
    pub actual: f64,
    pub expected: f64,
    /// sum((a-b)^2) / sum(b^2); 0 when both are all zero.
    pub nmse: f64,
    /// Positions where exactly one side is NaN (NaN on both sides counts as equal).
    pub nan_mismatches: usize,
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max abs diff {:.3e} at [{}] (actual {}, expected {}), nmse {:.3e}, nan mismatches {}",
            self.max_abs, self.at, self.actual, self.expected, self.nmse, self.nan_mismatches
        )
    }
}

/// Compares two equally long sequences; panics if their lengths differ.
pub fn diff<A: Into<f64> + Copy, B: Into<f64> + Copy>(actual: &[A], expected: &[B]) -> Diff {
    assert_eq!(actual.len(), expected.len(), "diff: lengths differ");
    let mut d = Diff { max_abs: 0.0, at: 0, actual: 0.0, expected: 0.0, nmse: 0.0, nan_mismatches: 0 };
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (&a, &b)) in actual.iter().zip(expected).enumerate() {
        let (a, b): (f64, f64) = (a.into(), b.into());
        if a.is_nan() || b.is_nan() {
            d.nan_mismatches += (a.is_nan() != b.is_nan()) as usize;
            continue;
        }
        let e = (a - b).abs();
        if e > d.max_abs || i == 0 {
            (d.max_abs, d.at, d.actual, d.expected) = (e, i, a, b);
        }
        err2 += e * e;
        ref2 += b * b;
    }
    d.nmse = if ref2 > 0.0 {
        err2 / ref2
    } else if err2 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    d
}

/// Root mean squared difference.
pub fn rmse(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "rmse: lengths differ");
    let s: f64 = actual.iter().zip(expected).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
    (s / actual.len().max(1) as f64).sqrt()
}

/// ggml test-quantize-fns' data: 0.1 + 2 cos(i + offset).
pub fn cos_pattern(n: usize, offset: f32) -> Vec<f32> {
    (0..n).map(|i| 0.1 + 2.0 * (i as f32 + offset).cos()).collect()
}

/// A small deterministic generator (SplitMix64) for test data; no dependency, same values
/// on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Approximately standard normal (sum of 4 uniforms, rescaled): cheap, bounded tails.
    pub fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * 1.732_050_8
    }

    /// `n` values of `scale * normal()`.
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.normal()).collect()
    }
}
