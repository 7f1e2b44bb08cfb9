//! Reference quantizers: f32 rows -> ggml blocks, bit-identical to ggml's `*_ref`
//! quantizers (what `ggml_quantize_chunk` runs without an importance matrix).

use super::kquant_search::{make_qkx2_quants, make_qx_quants_rmse1, nearest_int, GROUP_MAX_EPS};
use crate::blocks::*;
use crate::convert::{f16_to_f32, f32_to_bf16, f32_to_f16};
use crate::qtype::QType;

/// Quantizes `x` (a whole number of blocks) into `out` (exactly `qtype.row_bytes(x.len())`
/// bytes). Panics on a length mismatch: callers size buffers with `row_bytes`.
pub fn quantize(qtype: QType, x: &[f32], out: &mut [u8]) {
    let bytes = qtype.row_bytes(x.len());
    assert_eq!(bytes, Some(out.len()), "quantize {qtype}: {} values into {} bytes", x.len(), out.len());
    match qtype {
        QType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        QType::F16 => each_u16(x, out, f32_to_f16),
        QType::BF16 => each_u16(x, out, f32_to_bf16),
        QType::Q8_0 => blocks(x, out, quantize_block_q8_0),
        QType::Q4_0 => blocks(x, out, quantize_block_q4_0),
        QType::Q4K => blocks(x, out, quantize_block_q4k),
        QType::Q6K => blocks(x, out, quantize_block_q6k),
        QType::Q8K => blocks(x, out, quantize_block_q8k),
    }
}

/// Convenience: quantize into a new buffer. `None` if `x` is not a whole number of blocks.
pub fn quantize_to_vec(qtype: QType, x: &[f32]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; qtype.row_bytes(x.len())?];
    quantize(qtype, x, &mut out);
    Some(out)
}

fn each_u16(x: &[f32], out: &mut [u8], f: fn(f32) -> u16) {
    for (o, &v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&f(v).to_le_bytes());
    }
}

fn blocks<B: Block>(x: &[f32], out: &mut [u8], f: fn(&[f32]) -> B) {
    for (xb, ob) in x.chunks_exact(B::N).zip(out.chunks_exact_mut(B::BYTES)) {
        f(xb).write(ob);
    }
}

/// d = amax / 127, q = round(x / d) (ties away from zero).
pub fn quantize_block_q8_0(x: &[f32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_0];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 { d: f32_to_f16(d), qs }
}

/// d = max / -8 (max = the signed value of largest magnitude), q = min(15, trunc(x/d + 8.5)).
pub fn quantize_block_q4_0(x: &[f32]) -> BlockQ4_0 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let level = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    let mut qs = [0u8; QK4_0 / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = level(x[j]) | (level(x[j + QK4_0 / 2]) << 4);
    }
    BlockQ4_0 { d: f32_to_f16(d), qs }
}

/// Eight sub-blocks of 32 each get an asymmetric (scale, min) by weighted least squares;
/// the 16 numbers are then quantized to 6 bits against two f16 super-scales.
pub fn quantize_block_q4k(x: &[f32]) -> BlockQ4K {
    let mut l = [0u8; QK_K];
    let mut weights = [0f32; 32];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0.0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32], -1.0, 0.1, 20);
        (scales[j], mins[j]) = (scale, min);
        max_scale = if scale > max_scale { scale } else { max_scale };
        max_min = if min > max_min { min } else { max_min };
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; K_SCALE_SIZE];
    for j in 0..QK_K / 32 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let (d, dmin) = (f32_to_f16(max_scale / 63.0), f32_to_f16(max_min / 63.0));
    for j in 0..QK_K / 32 {
        let (sc, m) = q4k_scale_min(j, &packed);
        let dj = f16_to_f32(d) * sc as f32;
        if dj == 0.0 {
            continue; // keeps the levels of the search, as ggml does
        }
        let dm = f16_to_f32(dmin) * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    let mut qs = [0u8; QK_K / 2];
    for (chunk, q) in qs.chunks_exact_mut(32).enumerate() {
        let j = chunk * 64;
        for i in 0..32 {
            q[i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
    BlockQ4K { d, dmin, scales: packed, qs }
}

/// Sixteen sub-blocks of 16 get a symmetric scale each; the scales are quantized to int8
/// against one f16 super-scale and the weights to 6 bits.
pub fn quantize_block_q6k(x: &[f32]) -> BlockQ6K {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..QK_K / 16 {
        let scale = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    let mut block = BlockQ6K { ql: [0; QK_K / 2], qh: [0; QK_K / 4], scales: [0; QK_K / 16], d: 0 };
    if max_abs_scale < GROUP_MAX_EPS {
        block.d = f32_to_f16(0.0);
        return block;
    }
    let iscale = -128.0 / max_scale;
    block.d = f32_to_f16(1.0 / iscale);
    for (s, &scale) in block.scales.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * scale).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let d = f16_to_f32(block.d) * block.scales[j] as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    for half in 0..QK_K / 128 {
        let (j, ql, qh) = (half * 128, &mut block.ql[half * 64..], &mut block.qh[half * 32..]);
        let lv = |k: usize| l[k] as u8;
        for i in 0..32 {
            ql[i] = (lv(j + i) & 0xF) | ((lv(j + i + 64) & 0xF) << 4);
            ql[i + 32] = (lv(j + i + 32) & 0xF) | ((lv(j + i + 96) & 0xF) << 4);
            qh[i] = (lv(j + i) >> 4) | ((lv(j + i + 32) >> 4) << 2) | ((lv(j + i + 64) >> 4) << 4) | ((lv(j + i + 96) >> 4) << 6);
        }
    }
    block
}

/// d = max / -127 (max = signed value of largest magnitude), q = min(127, round(x / d)),
/// plus sums of each 16 quants.
pub fn quantize_block_q8k(x: &[f32]) -> BlockQ8K {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut block = BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
    if amax == 0.0 {
        return block;
    }
    let iscale = -127.0 / max;
    for (q, &v) in block.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *s = group.iter().map(|&q| q as i16).sum();
    }
    block.d = 1.0 / iscale;
    block
}
