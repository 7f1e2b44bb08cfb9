//! Reference dequantizers: ggml blocks -> f32, equal to ggml's `to_float` (same float
//! operations in the same order).

use crate::blocks::*;
use crate::convert::{bf16_to_f32, f16_to_f32};
use crate::qtype::QType;

/// Dequantizes `bytes` (a whole number of blocks) into `out`. Panics on a length mismatch:
/// callers size buffers with `row_bytes`.
pub fn dequantize(qtype: QType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(qtype.row_bytes(out.len()), Some(bytes.len()), "dequantize {qtype}: size mismatch");
    match qtype {
        QType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        QType::F16 => each_u16(bytes, out, f16_to_f32),
        QType::BF16 => each_u16(bytes, out, bf16_to_f32),
        QType::Q8_0 => blocks::<BlockQ8_0>(bytes, out, |b, y| {
            let d = f16_to_f32(b.d);
            for (o, &q) in y.iter_mut().zip(&b.qs) {
                *o = q as f32 * d;
            }
        }),
        QType::Q4_0 => blocks::<BlockQ4_0>(bytes, out, |b, y| {
            let d = f16_to_f32(b.d);
            for (j, &q) in b.qs.iter().enumerate() {
                y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }),
        QType::Q4K => blocks::<BlockQ4K>(bytes, out, dequantize_block_q4k),
        QType::Q6K => blocks::<BlockQ6K>(bytes, out, dequantize_block_q6k),
        QType::Q8K => blocks::<BlockQ8K>(bytes, out, |b, y| {
            for (o, &q) in y.iter_mut().zip(&b.qs) {
                *o = b.d * q as f32;
            }
        }),
    }
}

/// Convenience: dequantize `n` elements into a new buffer; `None` if sizes disagree.
pub fn dequantize_to_vec(qtype: QType, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    if qtype.row_bytes(n) != Some(bytes.len()) {
        return None;
    }
    let mut out = vec![0f32; n];
    dequantize(qtype, bytes, &mut out);
    Some(out)
}

fn each_u16(bytes: &[u8], out: &mut [f32], f: fn(u16) -> f32) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f(u16::from_le_bytes([b[0], b[1]]));
    }
}

fn blocks<B: Block>(bytes: &[u8], out: &mut [f32], f: impl Fn(&B, &mut [f32])) {
    for (b, y) in bytes.chunks_exact(B::BYTES).zip(out.chunks_exact_mut(B::N)) {
        f(&B::read(b), y);
    }
}

fn dequantize_block_q4k(b: &BlockQ4K, y: &mut [f32]) {
    let (d, min) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
    for (chunk, q) in b.qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = q4k_scale_min(2 * chunk, &b.scales);
        let (sc2, m2) = q4k_scale_min(2 * chunk + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn dequantize_block_q6k(b: &BlockQ6K, y: &mut [f32]) {
    let d = f16_to_f32(b.d);
    for half in 0..2 {
        let (ql, qh) = (&b.ql[64 * half..], &b.qh[32 * half..]);
        let sc = &b.scales[8 * half..];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
        }
    }
}
