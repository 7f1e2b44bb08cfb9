//! The scale searches behind ggml's k-quant reference quantizers, ported operation for
//! operation (same float ops in the same order, no fused multiply-add) so the bytes we
//! produce equal `ggml_quantize_chunk`'s. Source: ggml-quants.c (make_qx_quants,
//! make_qkx2_quants, nearest_int).

/// Blocks whose largest magnitude is below this are all-zero (ggml's GROUP_MAX_EPS).
pub const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest (ties to even) via the 1.5 * 2^23 trick; valid for |x| <= 4194303.
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// [`nearest_int`] as a float: (x + 1.5 * 2^23) - 1.5 * 2^23 rounds to the nearest integer
/// (ties to even) for |x| <= 4194303, the same value the bit trick extracts.
#[inline]
pub fn nearest_f32(fval: f32) -> f32 {
    (fval + 12_582_912.0) - 12_582_912.0
}

/// Symmetric quantization of `x` to integers in [0, 2*nmax) with a least-squares scale
/// refined over 18 trial scales, weighting errors by x^2 (ggml's make_qx_quants with
/// rmse_type = 1 and no importance weights). Returns the scale; `l` gets the levels.
pub fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.iter_mut().for_each(|q| *q = 0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let q = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    for (q, &v) in l.iter_mut().zip(x) {
        *q = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    // The 18 trial scales do not depend on each other: sum them 8 at a time (each lane in
    // ggml's element order, so bit-identical), then pick winners in ggml's trial order.
    const LANES: usize = 8;
    const TRIALS: [i32; 18] = [-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9];
    for batch in TRIALS.chunks(LANES) {
        let mut iscale = [0f32; LANES];
        for (s, &is) in iscale.iter_mut().zip(batch) {
            *s = -(nmax as f32 + 0.1 * is as f32) / max;
        }
        let (mut sumlx, mut suml2) = ([0f32; LANES], [0f32; LANES]);
        for &v in x {
            let w = v * v;
            for k in 0..LANES {
                let q = level(iscale[k], v) as f32;
                sumlx[k] += w * v * q;
                suml2[k] += w * q * q;
            }
        }
        for k in 0..batch.len() {
            if suml2[k] > 0.0 && sumlx[k] * sumlx[k] > best * suml2[k] {
                for (q, &v) in l.iter_mut().zip(x) {
                    *q = (level(iscale[k], v) + nmax) as i8;
                }
                scale = sumlx[k] / suml2[k];
                best = scale * sumlx[k];
            }
        }
    }
    scale
}

/// Asymmetric quantization of `x` to [0, nmax] with a scale and a (non-positive) min found
/// by weighted least squares over `nstep + 1` trial scales (ggml's make_qkx2_quants with
/// use_mad = false). Returns (scale, -min); `l` gets the levels.
pub fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|q| *q = 0);
        return (0.0, -min);
    }
    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);
    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        l[i] = level(iscale, x[i], min) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    // The trials are sequential in ggml: a trial that lowers the error moves `min`, which the
    // next trials use. We evaluate LANES trials at once against the current `min` (each
    // lane accumulates over i in ggml's order, so its sums are bit-identical), then accept
    // results in trial order; after a trial that changes `min`, the rest of the batch is
    // recomputed from the next trial on. Same answer as ggml's loop, several times faster.
    const LANES: usize = 8;
    assert!(n <= 256, "make_qkx2_quants: sub-blocks of at most 256 values");
    // laux[i][k]: level of element i in lane k, as f32 (lanes contiguous and all-float, so
    // the lane loops vectorise; nearest_f32 rounds exactly as nearest_int does).
    let mut laux = [[0f32; LANES]; 256];
    let nmax_f = nmax as f32;
    let mut is = 0;
    while is <= nstep {
        let lanes = LANES.min((nstep - is + 1) as usize);
        let mut iscale = [0f32; LANES];
        for (k, s) in iscale.iter_mut().enumerate().take(lanes) {
            *s = (rmin + rdelta * (is + k as i32) as f32 + nmax as f32) / (max - min);
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for i in 0..n {
            let (w, xi) = (weights[i], x[i]);
            for k in 0..LANES {
                let q = nearest_f32(iscale[k] * (xi - min)).max(0.0).min(nmax_f);
                laux[i][k] = q;
                sum_l[k] += w * q;
                sum_l2[k] += w * q * q;
                sum_xl[k] += w * q * xi;
            }
        }
        // Least-squares scale and min of every lane, then every lane's error in one pass.
        let (mut this_scale, mut this_min, mut valid) = ([0f32; LANES], [0f32; LANES], [false; LANES]);
        for k in 0..lanes {
            let d = sum_w * sum_l2[k] - sum_l[k] * sum_l[k];
            if d > 0.0 {
                valid[k] = true;
                this_scale[k] = (sum_w * sum_xl[k] - sum_x * sum_l[k]) / d;
                this_min[k] = (sum_l2[k] * sum_x - sum_l[k] * sum_xl[k]) / d;
                if this_min[k] > 0.0 {
                    this_min[k] = 0.0;
                    this_scale[k] = sum_xl[k] / sum_l2[k];
                }
            }
        }
        let mut cur_error = [0f32; LANES];
        for i in 0..n {
            let (w, xi) = (weights[i], x[i]);
            for k in 0..LANES {
                let diff = this_scale[k] * laux[i][k] + this_min[k] - xi;
                cur_error[k] += w * (diff * diff);
            }
        }
        let mut next = is + lanes as i32;
        for k in (0..lanes).filter(|&k| valid[k]) {
            if cur_error[k] < best_error {
                for (li, lanes) in l.iter_mut().zip(&laux[..n]) {
                    *li = lanes[k] as u8;
                }
                best_error = cur_error[k];
                scale = this_scale[k];
                let moved = this_min[k].to_bits() != min.to_bits();
                min = this_min[k];
                if moved {
                    next = is + k as i32 + 1; // later lanes used the old min: redo them
                    break;
                }
            }
        }
        is = next;
    }
    (scale, -min)
}
