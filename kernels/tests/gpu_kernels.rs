//! Every CUDA kernel against a plain reference on random inputs with ugly shapes (the
//! matrix-vector products: gpu_matvec.rs).
//! Needs a GPU: ignored by `cargo test`; scripts/gpu-check.sh runs it with --ignored on
//! the GPU machine. Each check prints one `CHECK kernel | case | error | budget` line, which
//! the script gathers into its table.
//!
//! Budgets: products accumulate in f32 in another order than the f64 reference, so a row of
//! n terms is off by ~n·2^-24 relative to Σ|terms| — NMSE below 1e-10 for f32 math; the
//! bf16 GEMM rounds nothing more (inputs are bf16 already on both sides), NMSE 1e-8.
//! Quantized weights multiply int8 activations (ggml's Q8_0 quantization of the input): the
//! reference applies the same quantization to x (mxr-quant's bit-exact port), so the same
//! budget holds.

use mxr_kernels::cuda::{Gpu, GpuMatrix, KvType, Residual};
use mxr_quant::convert::{bf16_to_f32, f32_to_bf16};
use mxr_quant::reference::{dequantize_to_vec, stats::diff, stats::Rng};
use mxr_quant::QType;

mod common;
use common::{check, gpu, quantized, shapes, TYPES};

#[test]
#[ignore = "needs a GPU"]
fn dequantize_to_bf16_and_gather_rows_are_exact() {
    let g = gpu();
    for q in TYPES {
        for (rows, cols) in shapes(q) {
            let w = quantized(q, 2 * rows * cols, 5);
            let f = dequantize_to_vec(q, &w, 2 * rows * cols).unwrap();
            let gw = GpuMatrix::upload(&g, q, 2, rows, cols, &w).unwrap();
            let mut out = g.zeros::<u16>(rows * cols).unwrap();
            g.to_bf16(&gw, 1, &mut out.as_view_mut()).unwrap();
            let got = g.download(&out.as_view()).unwrap();
            let want: Vec<u16> = f[rows * cols..].iter().map(|&v| f32_to_bf16(v)).collect();
            let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!("CHECK to_bf16 | {q} {rows}x{cols} | {bad} of {} differ | 0 | {}", want.len(), if bad == 0 { "ok" } else { "FAIL" });
            assert_eq!(bad, 0, "to_bf16 {q} {rows}x{cols}");

            let ids: Vec<i32> = vec![(rows - 1) as i32, 0, (rows / 2) as i32];
            let one = GpuMatrix::upload(&g, q, 1, rows, cols, &w[..q.row_bytes(cols).unwrap() * rows]).unwrap();
            let gids = g.upload(&ids).unwrap();
            let mut rows_out = g.zeros::<f32>(3 * cols).unwrap();
            g.gather_embed(&one, &gids, 3, &mut rows_out.as_view_mut()).unwrap();
            let got = g.download(&rows_out.as_view()).unwrap();
            let want: Vec<f32> = ids.iter().flat_map(|&r| f[r as usize * cols..(r as usize + 1) * cols].to_vec()).collect();
            assert_eq!(got, want, "gather_embed {q} {rows}x{cols}");
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn gemm_bf16_matches_f64() {
    let g = gpu();
    for (rows, cols, n) in [(1, 64, 1), (65, 96, 3), (513, 256, 77), (1000, 1024, 130)] {
        let w: Vec<u16> = Rng::new(6).normals(rows * cols, 0.5).iter().map(|&v| f32_to_bf16(v)).collect();
        let x: Vec<u16> = Rng::new(7).normals(n * cols, 1.0).iter().map(|&v| f32_to_bf16(v)).collect();
        let (gw, gx) = (g.upload(&w).unwrap(), g.upload(&x).unwrap());
        let mut gy = g.zeros::<f32>(n * rows).unwrap();
        g.gemm_bf16(&gw.as_view(), &gx.as_view(), &mut gy.as_view_mut(), rows, cols, n).unwrap();
        let got = g.download(&gy.as_view()).unwrap();
        let mut want = vec![0f64; n * rows];
        for t in 0..n {
            for r in 0..rows {
                want[t * rows + r] = (0..cols).map(|c| bf16_to_f32(w[r * cols + c]) as f64 * bf16_to_f32(x[t * cols + c]) as f64).sum();
            }
        }
        check("gemm_bf16", &format!("{rows}x{cols} x {n}"), diff(&got, &want).nmse, 1e-8);
        // the f32 product of the same values (no TF32: the budget is f32 rounding)
        let (wf, xf): (Vec<f32>, Vec<f32>) = (w.iter().map(|&v| bf16_to_f32(v)).collect(), x.iter().map(|&v| bf16_to_f32(v)).collect());
        let (gw, gx) = (g.upload(&wf).unwrap(), g.upload(&xf).unwrap());
        g.gemm_f32(&gw.as_view(), &gx.as_view(), &mut gy.as_view_mut(), rows, cols, n).unwrap();
        check("gemm_f32", &format!("{rows}x{cols} x {n}"), diff(&g.download(&gy.as_view()).unwrap(), &want).nmse, 1e-12);
    }
}

#[test]
#[ignore = "needs a GPU"]
fn norm_and_elementwise() {
    let g = gpu();
    let (rows, width) = (5, 1031);
    let x = Rng::new(8).normals(rows * width, 2.0);
    let a = Rng::new(9).normals(rows * width, 1.0);
    let w = Rng::new(10).normals(width, 1.0);
    let (gx, ga, gw) = (g.upload(&x).unwrap(), g.upload(&a).unwrap(), g.upload(&w).unwrap());

    let mut y = gx.clone();
    g.rmsnorm(&mut y.as_view_mut(), &gw, 1e-6).unwrap();
    let want: Vec<f64> = x
        .chunks(width)
        .flat_map(|r| {
            let ms = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
            let s = 1.0 / (ms + 1e-6).sqrt();
            r.iter().zip(&w).map(move |(&v, &wv)| v as f64 * s * wv as f64).collect::<Vec<_>>()
        })
        .collect();
    check("rmsnorm", &format!("{rows}x{width}"), diff(&g.download(&y.as_view()).unwrap(), &want).nmse, 1e-12);
    // the fused kernel without a residual is the same kernel's arithmetic: equal values
    let norm_only = g.download(&y.as_view()).unwrap();
    let mut y = gx.clone();
    assert!(g.rmsnorm_fused(&mut y.as_view_mut(), None, &gw, None, 1e-6, false).unwrap().is_none());
    assert_eq!(g.download(&y.as_view()).unwrap(), norm_only, "rmsnorm_fused without a residual");
    // with a residual and the int8 form, on rows of a multiple of 32 (and 4) and of 8 rows
    for (rows, width) in [(3usize, 6144usize), (8, 96), (1, 2048)] {
        let x = Rng::new(20).normals(rows * width, 2.0);
        let a = Rng::new(21).normals(rows * width, 1.0);
        let w = Rng::new(22).normals(width, 1.0);
        let (gx, ga, gw) = (g.upload(&x).unwrap(), g.upload(&a).unwrap(), g.upload(&w).unwrap());
        let (alpha, beta) = (1.7f32, -0.3f32);
        let mut y = gx.clone();
        let q = g
            .rmsnorm_fused(&mut y.as_view_mut(), Some(&Residual { a: ga.as_view(), alpha, beta, combine: None }), &gw, None, 1e-6, true)
            .unwrap()
            .unwrap();
        let want: Vec<f64> = x
            .chunks(width)
            .zip(a.chunks(width))
            .flat_map(|(r, ar)| {
                let v: Vec<f64> = r.iter().zip(ar).map(|(&xv, &av)| alpha as f64 * xv as f64 + beta as f64 * av as f64).collect();
                let ms = v.iter().map(|t| t * t).sum::<f64>() / width as f64;
                let s = 1.0 / (ms + 1e-6).sqrt();
                v.into_iter().zip(&w).map(move |(t, &wv)| t * s * wv as f64).collect::<Vec<_>>()
            })
            .collect();
        let got = g.download(&y.as_view()).unwrap();
        let case = format!("{rows}x{width}, residual, int8");
        check("rmsnorm_fused", &case, diff(&got, &want).nmse, 1e-12);
        // the int8 form equals quantize_act's of the same values
        let sep = g.quantize_act(&y.as_view(), rows, width).unwrap();
        let same = g.download(&q.q.as_view()).unwrap() == g.download(&sep.q.as_view()).unwrap()
            && g.download(&q.d.as_view()).unwrap() == g.download(&sep.d.as_view()).unwrap();
        check("rmsnorm_fused int8 = quantize_act", &case, if same { 0.0 } else { 1.0 }, 0.0);
        // with the gate: exactly rmsnorm, then sigmoid_gate
        let mut y = gx.clone();
        g.rmsnorm_fused(&mut y.as_view_mut(), None, &gw, Some(&ga.as_view()), 1e-6, false).unwrap();
        let mut z = gx.clone();
        g.rmsnorm(&mut z.as_view_mut(), &gw, 1e-6).unwrap();
        g.sigmoid_gate(&mut z.as_view_mut(), &ga.as_view()).unwrap();
        let same = g.download(&y.as_view()).unwrap() == g.download(&z.as_view()).unwrap();
        check("rmsnorm_fused gated = rmsnorm, sigmoid_gate", &format!("{rows}x{width}"), if same { 0.0 } else { 1.0 }, 0.0);
    }

    let silu = |v: f64| v / (1.0 + (-v).exp());
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let mut y = gx.clone();
    g.silu(&mut y.as_view_mut()).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| silu(v as f64)).collect();
    check("silu", "5x1031", diff(&g.download(&y.as_view()).unwrap(), &want).nmse, 1e-12);

    let mut y = gx.clone();
    g.sigmoid_gate(&mut y.as_view_mut(), &ga.as_view()).unwrap();
    let want: Vec<f64> = x.iter().zip(&a).map(|(&v, &gv)| v as f64 * sig(gv as f64)).collect();
    check("sigmoid_gate", "5x1031", diff(&g.download(&y.as_view()).unwrap(), &want).nmse, 1e-12);

    let mut y = g.zeros::<f32>(x.len()).unwrap();
    g.swiglu(&gx.as_view(), &ga.as_view(), &mut y.as_view_mut()).unwrap();
    let want: Vec<f64> = x.iter().zip(&a).map(|(&v, &u)| silu(v as f64) * u as f64).collect();
    check("swiglu", "5x1031", diff(&g.download(&y.as_view()).unwrap(), &want).nmse, 1e-12);
    // into bf16: exactly the f32 result, rounded as f32_to_bf16 rounds
    let mut yb = g.zeros::<u16>(x.len()).unwrap();
    g.swiglu_bf16(&gx.as_view(), &ga.as_view(), &mut yb.as_view_mut()).unwrap();
    let rounded: Vec<u16> = g.download(&y.as_view()).unwrap().iter().map(|&v| f32_to_bf16(v)).collect();
    let differ = g.download(&yb.as_view()).unwrap().iter().zip(&rounded).filter(|(a, b)| a != b).count();
    check("swiglu_bf16", "5x1031", differ as f64, 0.0);

    // into int8: exactly quantize_act of the f32 result (5 rows of 1031 is not blocks of
    // 32: the first 4 x 1024 values as 4 rows of 1024)
    let (qn, qc) = (4, 1024);
    let fused = g.swiglu_quantize(&gx.slice(..qn * qc), &ga.slice(..qn * qc), qn, qc).unwrap();
    let two = g.quantize_act(&y.slice(..qn * qc), qn, qc).unwrap();
    let same = g.download(&fused.q.as_view()).unwrap() == g.download(&two.q.as_view()).unwrap()
        && g.download(&fused.d.as_view()).unwrap() == g.download(&two.d.as_view()).unwrap();
    check("swiglu_quantize = quantize_act(swiglu)", "4x1024", if same { 0.0 } else { 1.0 }, 0.0);
    assert!(g.swiglu_quantize(&gx.as_view(), &ga.as_view(), 5, 1031).is_err(), "1031 columns are not blocks of 32");

    let mut y = gx.clone();
    g.residual(&mut y.as_view_mut(), &ga.as_view(), 1.7, -0.3).unwrap();
    let want: Vec<f64> = x.iter().zip(&a).map(|(&v, &u)| 1.7 * v as f64 - 0.3 * u as f64).collect();
    check("residual", "5x1031", diff(&g.download(&y.as_view()).unwrap(), &want).nmse, 1e-12);

    let idx = [3i32, 0, 3, 1, 4];
    let gi = g.upload(&idx).unwrap();
    let mut y = g.zeros::<f32>(5 * width).unwrap();
    g.gather_rows(&gx.as_view(), &gi.as_view(), 1, 5, width, &mut y.as_view_mut()).unwrap();
    let want: Vec<f32> = idx.iter().flat_map(|&i| x[i as usize * width..(i as usize + 1) * width].to_vec()).collect();
    assert_eq!(g.download(&y.as_view()).unwrap(), want, "gather_rows");
    // into bf16, and with two output rows per source row (div 2). The embedding gather of
    // a bf16 matrix (width a multiple of 8) runs first: its kernel has the same name in
    // another module, and the function cache must tell the two apart
    let ew = 64;
    let embed: Vec<u16> = x[..5 * ew].iter().map(|&v| f32_to_bf16(v)).collect();
    let bytes: Vec<u8> = embed.iter().flat_map(|v| v.to_le_bytes()).collect();
    let ge = GpuMatrix::upload(&g, QType::BF16, 1, 5, ew, &bytes).unwrap();
    let mut ye = g.zeros::<f32>(5 * ew).unwrap();
    g.gather_embed(&ge, &gi, 5, &mut ye.as_view_mut()).unwrap();
    let want: Vec<f32> = idx.iter().flat_map(|&i| embed[i as usize * ew..(i as usize + 1) * ew].iter().map(|&v| bf16_to_f32(v))).collect();
    assert_eq!(g.download(&ye.as_view()).unwrap(), want, "gather_embed bf16");
    let mut yb = g.zeros::<u16>(5 * width).unwrap();
    g.gather_rows_bf16(&gx.as_view(), &gi.as_view(), 2, 5, width, &mut yb.as_view_mut()).unwrap();
    let want: Vec<u16> =
        idx.iter().flat_map(|&i| x[(i as usize / 2) * width..(i as usize / 2 + 1) * width].iter().map(|&v| f32_to_bf16(v))).collect();
    assert_eq!(g.download(&yb.as_view()).unwrap(), want, "gather_rows_bf16");
    // ids looked up in a table on the GPU
    let table = g.upload(&[7i32, -1, 5, 0, 2]).unwrap();
    let mut mapped = g.zeros::<i32>(idx.len()).unwrap();
    g.map_ids(&gi.as_view(), &table.as_view(), &mut mapped.as_view_mut()).unwrap();
    assert_eq!(g.download(&mapped.as_view()).unwrap(), vec![0, 7, 0, -1, 2], "map_ids");
    // split places: a resident choice keeps its expert in `hot` and is skipped (-1) in
    // `cold_at`, a cold one the other way round
    let cold = g.upload(&[0i32, 1, 0, 1, 1]).unwrap();
    for (ids, hot, cold_at) in [
        ([0i32, 3, 4], [0, -1, -1], [-1, 3, 4]),
        ([2, 0, 1], [2, 0, -1], [-1, -1, 1]),
        ([2, 0, 2], [2, 0, 2], [-1, -1, -1]),
        ([4, 1, 3], [-1, -1, -1], [4, 1, 3]),
    ] {
        let gi = g.upload(&ids).unwrap();
        let (mut h, mut c) = (g.zeros::<i32>(3).unwrap(), g.zeros::<i32>(3).unwrap());
        g.split_places(&gi.as_view(), &cold.as_view(), &mut h.as_view_mut(), &mut c.as_view_mut()).unwrap();
        assert_eq!(g.download(&h.as_view()).unwrap(), hot, "split_places {ids:?}: hot");
        assert_eq!(g.download(&c.as_view()).unwrap(), cold_at, "split_places {ids:?}: cold");
    }
    let perm = [2i32, 4, 0, 1, 3];
    let gp = g.upload(&perm).unwrap();
    let mut z = g.zeros::<f32>(5 * width).unwrap();
    g.scatter_rows(&gx.as_view(), &gp.as_view(), 5, width, &mut z.as_view_mut()).unwrap();
    let got = g.download(&z.as_view()).unwrap();
    for (i, &p) in perm.iter().enumerate() {
        assert_eq!(&got[p as usize * width..(p as usize + 1) * width], &x[i * width..(i + 1) * width], "scatter_rows");
    }
    println!("CHECK gather/scatter_rows (f32, bf16) | 5x1031 | exact | 0 | ok");
}

/// The CPU router's rule: softmax in f32, top k, ties to the lower index, renormalised.
fn route_ref(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let p: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
    let s: f32 = p.iter().sum();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let top: Vec<(usize, f32)> = order.into_iter().take(k).map(|e| (e, p[e] / s)).collect();
    let t: f32 = top.iter().map(|x| x.1).sum();
    top.into_iter().map(|(e, w)| (e, w / t)).collect()
}

#[test]
#[ignore = "needs a GPU"]
fn routing_picks_the_same_experts() {
    let g = gpu();
    for (n_tokens, n_exp, k) in [(1, 8, 2), (37, 32, 2), (5, 45, 3), (9, 256, 8)] {
        let mut logits = Rng::new(11).normals(n_tokens * n_exp, 1.5);
        // A tie in the first token: experts 1 and 5 equal and largest.
        logits[1] = 9.0;
        logits[5] = 9.0;
        let gl = g.upload(&logits).unwrap();
        let mut ids = g.zeros::<i32>(n_tokens * k).unwrap();
        let mut w = g.zeros::<f32>(n_tokens * k).unwrap();
        let mut counts = g.zeros::<u32>(n_exp).unwrap();
        g.route_topk(&gl.as_view(), n_tokens, n_exp, k, &mut ids.as_view_mut(), &mut w.as_view_mut(), &mut counts).unwrap();
        let (ids, w, counts) =
            (g.download(&ids.as_view()).unwrap(), g.download(&w.as_view()).unwrap(), g.download(&counts.as_view()).unwrap());
        let mut want_counts = vec![0u32; n_exp];
        let mut wd = Vec::new();
        let mut ww = Vec::new();
        for t in 0..n_tokens {
            for (j, (e, we)) in route_ref(&logits[t * n_exp..(t + 1) * n_exp], k).into_iter().enumerate() {
                assert_eq!(ids[t * k + j] as usize, e, "token {t} choice {j}");
                want_counts[e] += 1;
                wd.push(w[t * k + j]);
                ww.push(we);
            }
        }
        assert_eq!(counts, want_counts);
        check("route_topk", &format!("{n_tokens} tokens, top-{k} of {n_exp}"), diff(&wd, &ww).nmse, 1e-12);
    }
}

/// Lightning recurrence in f64: S = λS + kᵀv, o = q S.
fn lightning_ref(qkv: &[f32], n: usize, heads: usize, hd: usize, decay: &[f32], state: &mut [f64]) -> Vec<f64> {
    let mut out = vec![0f64; n * heads * hd];
    for t in 0..n {
        for h in 0..heads {
            let base = t * heads * 3 * hd + h * 3 * hd;
            let (q, k, v) = (&qkv[base..base + hd], &qkv[base + hd..base + 2 * hd], &qkv[base + 2 * hd..base + 3 * hd]);
            let s = &mut state[h * hd * hd..(h + 1) * hd * hd];
            for a in 0..hd {
                for b in 0..hd {
                    s[a * hd + b] = decay[h] as f64 * s[a * hd + b] + k[a] as f64 * v[b] as f64;
                }
            }
            for b in 0..hd {
                out[t * heads * hd + h * hd + b] = (0..hd).map(|a| q[a] as f64 * s[a * hd + b]).sum();
            }
        }
    }
    out
}

#[test]
#[ignore = "needs a GPU"]
fn lightning_matches_the_recurrence() {
    let g = gpu();
    // the last three: several chunks of the tensor-core kernel, a partial last chunk
    for (hd, heads, n) in
        [(16, 3, 1), (64, 2, 37), (128, 4, 100), (32, 5, 17), (24, 3, 9), (100, 2, 5), (128, 3, 300), (64, 2, 129), (100, 2, 70)]
    {
        let qkv = Rng::new(12).normals(n * heads * 3 * hd, 0.3);
        let decay: Vec<f32> = (0..heads).map(|h| (-0.1 * (h as f64 + 1.0)).exp() as f32).collect();
        let init = Rng::new(13).normals(heads * hd * hd, 0.2);
        let mut s64: Vec<f64> = init.iter().map(|&v| v as f64).collect();
        let want = lightning_ref(&qkv, n, heads, hd, &decay, &mut s64);
        let (gq, gd) = (g.upload(&qkv).unwrap(), g.upload(&decay).unwrap());
        let mut gs = g.upload(&init).unwrap();
        let mut go = g.zeros::<f32>(n * heads * hd).unwrap();
        g.lightning(&gq.as_view(), &mut gs, &gd, &mut go.as_view_mut(), (n, heads, hd), false).unwrap();
        let case = format!("hd {hd}, {heads} heads, {n} tokens");
        check("lightning (out)", &case, diff(&g.download(&go.as_view()).unwrap(), &want).nmse, 1e-10);
        check("lightning (state)", &case, diff(&g.download(&gs.as_view()).unwrap(), &s64).nmse, 1e-10);
        // chunked on tensor cores: q, k, v and the scores rounded to bf16 (as flash attention)
        let mut gs = g.upload(&init).unwrap();
        let mut go = g.zeros::<f32>(n * heads * hd).unwrap();
        g.lightning_chunked(&gq.as_view(), &mut gs, &gd, &mut go.as_view_mut(), (n, heads, hd), false).unwrap();
        check("lightning chunked (out)", &case, diff(&g.download(&go.as_view()).unwrap(), &want).nmse, 5e-5);
        check("lightning chunked (state)", &case, diff(&g.download(&gs.as_view()).unwrap(), &s64).nmse, 5e-5);
        // SiLU as the kernels read q, k, v: the same values as silu_inplace first
        let mut sq = gq.clone();
        g.silu(&mut sq.as_view_mut()).unwrap();
        for chunked in [false, true] {
            let run = |input: &mxr_kernels::cuda::CudaSlice<f32>, silu: bool| {
                let mut gs = g.upload(&init).unwrap();
                let mut go = g.zeros::<f32>(n * heads * hd).unwrap();
                let f = if chunked { Gpu::lightning_chunked } else { Gpu::lightning };
                f(&g, &input.as_view(), &mut gs, &gd, &mut go.as_view_mut(), (n, heads, hd), silu).unwrap();
                (g.download(&go.as_view()).unwrap(), g.download(&gs.as_view()).unwrap())
            };
            let same = run(&gq, true) == run(&sq, false);
            let name = if chunked { "lightning chunked, SiLU on read" } else { "lightning, SiLU on read" };
            check(name, &case, if same { 0.0 } else { 1.0 }, 0.0);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn rope_and_attention() {
    let g = gpu();
    for (hd, rd, heads, kv_heads, pos0, n) in [
        (128, 64, 8, 2, 0, 5),
        (64, 64, 4, 4, 33, 1),
        (32, 16, 8, 1, 7, 40),
        (128, 64, 64, 8, 100, 3),
        (24, 8, 4, 2, 3, 6),
        (80, 32, 6, 3, 50, 2),
        // several query tiles and key tiles of the tensor-core kernel
        (128, 64, 16, 2, 70, 150),
        (64, 32, 4, 4, 0, 130),
        // more key tiles than the TMA kernels' four stages, for several query tiles
        (128, 64, 16, 2, 300, 130),
        // decode over many key tiles per split, the largest group (16 heads per KV head),
        // and a head size the bf16 tensor-core kernels do not take (SIMT decode, no prefill)
        (128, 64, 64, 8, 700, 1),
        (64, 32, 16, 1, 300, 2),
        (20, 8, 4, 2, 10, 3),
    ] {
        let (width, kv_dim) = (heads * hd, kv_heads * hd);
        let q = Rng::new(14).normals(n * width, 1.0);
        let len = pos0 + n;
        let kc = Rng::new(15).normals(len * kv_dim, 1.0);
        let vc = Rng::new(16).normals(len * kv_dim, 1.0);
        let theta = 10000.0f64;
        // RoPE reference
        let mut qr: Vec<f64> = q.iter().map(|&v| v as f64).collect();
        for t in 0..n {
            for h in 0..heads {
                for i in 0..rd / 2 {
                    let ang = (pos0 + t) as f64 * theta.powf(-((2 * i) as f64) / rd as f64);
                    let (c, s) = (ang.cos() as f32 as f64, ang.sin() as f32 as f64);
                    let o = t * width + h * hd;
                    let (a, b) = (qr[o + i], qr[o + i + rd / 2]);
                    qr[o + i] = a * c - b * s;
                    qr[o + i + rd / 2] = b * c + a * s;
                }
            }
        }
        let mut gq = g.upload(&q).unwrap();
        let gpos = g.upload(&[pos0 as i32]).unwrap();
        g.rope(&mut gq.as_view_mut(), n, width, hd, rd, theta, &gpos).unwrap();
        let got_q = g.download(&gq.as_view()).unwrap();
        let case = format!("hd {hd}/{rd}, {heads}/{kv_heads} heads, pos {pos0}+{n}");
        check("rope", &case, diff(&got_q, &qr).nmse, 1e-12);
        // attention reference on the rotated q the GPU produced
        let group = heads / kv_heads;
        let reference = |kc: &[f32], vc: &[f32]| {
            let mut want = vec![0f64; n * width];
            for t in 0..n {
                for h in 0..heads {
                    let gk = h / group;
                    let qv = &got_q[t * width + h * hd..t * width + (h + 1) * hd];
                    let scores: Vec<f64> = (0..pos0 + t + 1)
                        .map(|j| (0..hd).map(|c| qv[c] as f64 * kc[j * kv_dim + gk * hd + c] as f64).sum::<f64>() / (hd as f64).sqrt())
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for c in 0..hd {
                            want[t * width + h * hd + c] += ej / z * vc[j * kv_dim + gk * hd + c] as f64;
                        }
                    }
                }
            }
            want
        };
        // f32 caches (exact kernels), then bf16 caches: the reference then takes the
        // bf16-rounded keys and values; decode is exact on them, prefill (tensor cores)
        // also rounds q and the probabilities to bf16.
        for t in [KvType::F32, KvType::Bf16] {
            let round = |v: &[f32]| -> Vec<f32> {
                match t {
                    KvType::Bf16 => v.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect(),
                    _ => v.to_vec(),
                }
            };
            let (kr, vr) = (round(&kc), round(&vc));
            let want = reference(&kr, &vr);
            // The cache: the first pos0 rows written from the host, the last n appended by kv_append.
            let (mut gk, mut gv) = (g.kv_zeros(t, len * kv_dim).unwrap(), g.kv_zeros(t, len * kv_dim).unwrap());
            g.kv_write(&kc[..pos0 * kv_dim], &mut gk).unwrap();
            g.kv_write(&vc[..pos0 * kv_dim], &mut gv).unwrap();
            let (nk, nv) = (g.upload(&kc[pos0 * kv_dim..]).unwrap(), g.upload(&vc[pos0 * kv_dim..]).unwrap());
            g.kv_append(&nk.as_view(), &mut gk, &gpos, pos0, n, kv_dim).unwrap();
            g.kv_append(&nv.as_view(), &mut gv, &gpos, pos0, n, kv_dim).unwrap();
            assert_eq!(g.kv_download(&gk, len * kv_dim).unwrap(), kr, "kv_append {}", t.name());
            assert_eq!(g.kv_download(&gv, len * kv_dim).unwrap(), vr, "kv_append {}", t.name());
            let mut go = g.zeros::<f32>(n * width).unwrap();
            let tensor_cores = t == KvType::Bf16 && hd % 8 == 0;
            let res = g.attend(&gq.as_view(), &gk, &gv, &mut go.as_view_mut(), n, heads, kv_heads, hd, &gpos, pos0, None);
            // the bf16 prefill kernel takes head sizes in multiples of 8, the f32 one groups
            // of at most 8 heads; outside those they say so
            let refusal = match t {
                KvType::Bf16 if !tensor_cores => Some("multiples of 8"),
                KvType::F32 if group > 8 => Some("groups of at most 8"),
                _ => None,
            };
            if let Some(why) = refusal {
                let e = res.expect_err("attention outside the kernel's shapes").to_string();
                check(&format!("attend {} refuses", t.name()), &case, if e.contains(why) { 0.0 } else { 1.0 }, 0.0);
            } else {
                res.unwrap();
                let (name, budget) = match t {
                    KvType::Bf16 => ("attend bf16 (tensor cores)", 2e-5),
                    _ => ("attend f32", 1e-10),
                };
                check(name, &case, diff(&g.download(&go.as_view()).unwrap(), &want).nmse, budget);
            }
            // RoPE fused into the tensor-core kernel and into the key append: exactly the
            // rope kernel's rotation, then the unfused kernels
            if tensor_cores {
                let table = g.rope_table(n, rd, theta, &gpos).unwrap();
                let raw_q = g.upload(&q).unwrap();
                let mut fo = g.zeros::<f32>(n * width).unwrap();
                g.attend(&raw_q.as_view(), &gk, &gv, &mut fo.as_view_mut(), n, heads, kv_heads, hd, &gpos, pos0, Some(&table)).unwrap();
                let same_out = g.download(&fo.as_view()).unwrap() == g.download(&go.as_view()).unwrap();
                // keys: rope then append, against the fused append, into caches holding pos0 rows
                let mut rk = g.upload(&kc[pos0 * kv_dim..]).unwrap();
                g.rope(&mut rk.as_view_mut(), n, kv_dim, hd, rd, theta, &gpos).unwrap();
                let (mut c1, mut c2) = (g.kv_zeros(t, len * kv_dim).unwrap(), g.kv_zeros(t, len * kv_dim).unwrap());
                g.kv_append(&rk.as_view(), &mut c1, &gpos, pos0, n, kv_dim).unwrap();
                g.kv_append_roped(&nk.as_view(), &mut c2, &gpos, pos0, (n, kv_dim, hd), &table).unwrap();
                let same_k = g.kv_download(&c1, len * kv_dim).unwrap() == g.kv_download(&c2, len * kv_dim).unwrap();
                check("attend + kv_append, RoPE fused", &case, if same_out && same_k { 0.0 } else { 1.0 }, 0.0);
                // head size 128: the warpgroup (wgmma) kernel, on the H100/H200 this runs on
                if hd == 128 {
                    let (shape, at) = ((n, heads, kv_heads, hd), (&gpos, pos0));
                    let mut first = Vec::new();
                    for v in mxr_kernels::cuda::WgmmaKernel::ALL {
                        assert!(v.takes_group(heads / kv_heads), "{}: every case's group is a multiple of 4", v.label());
                        let mut wo = g.zeros::<f32>(n * width).unwrap();
                        g.attend_wgmma(&raw_q.as_view(), &gk, &gv, &mut wo.as_view_mut(), shape, at, Some(&table), v).unwrap();
                        let got = g.download(&wo.as_view()).unwrap();
                        let what = v.label();
                        check(&format!("attend bf16 (wgmma, {what})"), &case, diff(&got, &want).nmse, 2e-5);
                        // each warpgroup does one head's arithmetic in the same order whatever
                        // shares its block or overlaps it: the same bits
                        if first.is_empty() {
                            first = got;
                        } else {
                            check(&format!("wgmma {what} = 1 head, 2 stages"), &case, if got == first { 0.0 } else { 1.0 }, 0.0);
                        }
                    }
                }
            }
            // The last query alone, split over the keys (decode), for several split counts.
            let last = n - 1;
            let gq_last = g.upload(&got_q[last * width..]).unwrap();
            let gpos_last = g.upload(&[(pos0 + last) as i32]).unwrap();
            for (splits, stages) in [(1usize, 2usize), (3, 2), (7, 2), (64, 2), (1, 3), (7, 3)] {
                let mut go = g.zeros::<f32>(width).unwrap();
                let shape = (heads, kv_heads, hd);
                let at = (&gpos_last, pos0 + last);
                g.attend_decode_staged(&gq_last.as_view(), &gk, &gv, &mut go.as_view_mut(), shape, at, splits, stages, None).unwrap();
                if tensor_cores {
                    // RoPE fused: the unrotated query and a one-token table give the same output
                    let table = g.rope_table(1, rd, theta, &gpos_last).unwrap();
                    let raw = g.upload(&q[last * width..]).unwrap();
                    let mut fo = g.zeros::<f32>(width).unwrap();
                    g.attend_decode_staged(&raw.as_view(), &gk, &gv, &mut fo.as_view_mut(), shape, at, splits, stages, Some(&table))
                        .unwrap();
                    let same = g.download(&fo.as_view()).unwrap() == g.download(&go.as_view()).unwrap();
                    check(
                        "attend_decode, RoPE fused",
                        &format!("{case}, {splits} splits, {stages} stages"),
                        if same { 0.0 } else { 1.0 },
                        0.0,
                    );
                }
                let d = diff(&g.download(&go.as_view()).unwrap(), &want[last * width..]);
                // tensor cores round q and the probabilities to bf16 as the prefill kernel does
                let (name, budget) = if tensor_cores {
                    (format!("attend_decode bf16 (tensor cores, {stages} stages)"), 2e-5)
                } else {
                    (format!("attend_decode {}", t.name()), 1e-10)
                };
                check(&name, &format!("{case}, {splits} splits"), d.nmse, budget);
            }
        }
        q8_attention(&g, &case, (hd, rd, heads, kv_heads), (pos0, n), (&q, &kc, &vc), theta, &reference);
    }
}

/// f64 attention of the test's queries over given K and V caches.
type AttentionRef<'a> = dyn Fn(&[f32], &[f32]) -> Vec<f64> + 'a;

/// q8_0 caches (heads of whole 32-value blocks): appends quantize as ggml's q8_0 does on the
/// host (kv_write), and attention over them, prefill and decode, equals the bf16 kernels'
/// over a bf16 cache of the dequantized values: the q8_0 kernels dequantize each tile to
/// bf16 and then run the same products. Other head sizes are refused.
#[allow(clippy::too_many_arguments)]
fn q8_attention(
    g: &Gpu,
    case: &str,
    (hd, rd, heads, kv_heads): (usize, usize, usize, usize),
    (pos0, n): (usize, usize),
    (q, kc, vc): (&[f32], &[f32], &[f32]),
    theta: f64,
    reference: &AttentionRef<'_>,
) {
    let (width, kv_dim, len) = (heads * hd, kv_heads * hd, pos0 + n);
    let t = KvType::Q8_0;
    let gpos = g.upload(&[pos0 as i32]).unwrap();
    let (mut qk, mut qv) = (g.kv_zeros(t, len * kv_dim).unwrap(), g.kv_zeros(t, len * kv_dim).unwrap());
    let raw_q = g.upload(q).unwrap();
    if hd % 32 != 0 {
        let mut o = g.zeros::<f32>(n * width).unwrap();
        let e = g.attend(&raw_q.as_view(), &qk, &qv, &mut o.as_view_mut(), n, heads, kv_heads, hd, &gpos, pos0, None).unwrap_err();
        check("attend q8_0 refuses", case, if e.to_string().contains("q8_0") { 0.0 } else { 1.0 }, 0.0);
        return;
    }
    // the first pos0 rows from the host, the last n appended (keys rotated on the way in)
    let table = g.rope_table(n, rd, theta, &gpos).unwrap();
    g.kv_write(&kc[..pos0 * kv_dim], &mut qk).unwrap();
    g.kv_write(&vc[..pos0 * kv_dim], &mut qv).unwrap();
    let (nk, nv) = (g.upload(&kc[pos0 * kv_dim..]).unwrap(), g.upload(&vc[pos0 * kv_dim..]).unwrap());
    g.kv_append_roped(&nk.as_view(), &mut qk, &gpos, pos0, (n, kv_dim, hd), &table).unwrap();
    g.kv_append(&nv.as_view(), &mut qv, &gpos, pos0, n, kv_dim).unwrap();
    // the host's quantization of the same values: rotated keys from an f32 cache
    let mut fk = g.kv_zeros(KvType::F32, len * kv_dim).unwrap();
    g.kv_write(&kc[..pos0 * kv_dim], &mut fk).unwrap();
    g.kv_append_roped(&nk.as_view(), &mut fk, &gpos, pos0, (n, kv_dim, hd), &table).unwrap();
    let (mut hk, mut hv) = (g.kv_zeros(t, len * kv_dim).unwrap(), g.kv_zeros(t, len * kv_dim).unwrap());
    g.kv_write(&g.kv_download(&fk, len * kv_dim).unwrap(), &mut hk).unwrap();
    g.kv_write(vc, &mut hv).unwrap();
    let (kq, vq) = (g.kv_download(&qk, len * kv_dim).unwrap(), g.kv_download(&qv, len * kv_dim).unwrap());
    let same = kq == g.kv_download(&hk, len * kv_dim).unwrap() && vq == g.kv_download(&hv, len * kv_dim).unwrap();
    check("kv_append q8_0 = ggml's q8_0", case, if same { 0.0 } else { 1.0 }, 0.0);
    // written back from the host, a cache is unchanged (sessions move between host and GPU)
    let mut again = g.kv_zeros(t, len * kv_dim).unwrap();
    g.kv_write(&kq, &mut again).unwrap();
    check("kv_write q8_0 round trip", case, if g.kv_download(&again, len * kv_dim).unwrap() == kq { 0.0 } else { 1.0 }, 0.0);
    // bf16 caches of the dequantized values
    let (mut bk, mut bv) = (g.kv_zeros(KvType::Bf16, len * kv_dim).unwrap(), g.kv_zeros(KvType::Bf16, len * kv_dim).unwrap());
    g.kv_write(&kq, &mut bk).unwrap();
    g.kv_write(&vq, &mut bv).unwrap();
    let (mut o8, mut o16) = (g.zeros::<f32>(n * width).unwrap(), g.zeros::<f32>(n * width).unwrap());
    g.attend(&raw_q.as_view(), &qk, &qv, &mut o8.as_view_mut(), n, heads, kv_heads, hd, &gpos, pos0, Some(&table)).unwrap();
    g.attend(&raw_q.as_view(), &bk, &bv, &mut o16.as_view_mut(), n, heads, kv_heads, hd, &gpos, pos0, Some(&table)).unwrap();
    let got = g.download(&o8.as_view()).unwrap();
    check("attend q8_0 = bf16 of its values", case, if got == g.download(&o16.as_view()).unwrap() { 0.0 } else { 1.0 }, 0.0);
    // and against f64 attention over the dequantized values (bf16 rounding of the tiles, q
    // and the probabilities, as for a bf16 cache)
    let want = reference(&kq, &vq);
    check("attend q8_0 (tensor cores)", case, diff(&got, &want).nmse, 2e-5);
    let last = n - 1;
    let gpos_last = g.upload(&[(pos0 + last) as i32]).unwrap();
    let one = g.rope_table(1, rd, theta, &gpos_last).unwrap();
    let raw = g.upload(&q[last * width..]).unwrap();
    for (splits, stages) in [(1usize, 2usize), (7, 2), (64, 2), (1, 3), (7, 3)] {
        let (mut d8, mut d16) = (g.zeros::<f32>(width).unwrap(), g.zeros::<f32>(width).unwrap());
        let (shape, at) = ((heads, kv_heads, hd), (&gpos_last, pos0 + last));
        g.attend_decode_staged(&raw.as_view(), &qk, &qv, &mut d8.as_view_mut(), shape, at, splits, stages, Some(&one)).unwrap();
        g.attend_decode_staged(&raw.as_view(), &bk, &bv, &mut d16.as_view_mut(), shape, at, splits, stages, Some(&one)).unwrap();
        let got = g.download(&d8.as_view()).unwrap();
        let c = format!("{case}, {splits} splits, {stages} stages");
        check("attend_decode q8_0 = bf16 of its values", &c, if got == g.download(&d16.as_view()).unwrap() { 0.0 } else { 1.0 }, 0.0);
        check("attend_decode q8_0 (tensor cores)", &c, diff(&got, &want[last * width..]).nmse, 2e-5);
    }
}

#[test]
#[ignore = "needs a GPU"]
fn kernel_cache_is_reused() {
    let g = gpu();
    let first = g.warm_up().unwrap();
    let g2 = Gpu::open(0).unwrap();
    let second = g2.warm_up().unwrap();
    let all = g.sources().len();
    println!("CHECK nvrtc cache | sources from cache: {first} then {second} | - | {all} | {}", if second == all { "ok" } else { "FAIL" });
    assert_eq!(second, all, "a second process-level open should load every module from the disk cache");
}

/// `MXR_TIMELINE=1`: a replayed graph's kernels each leave one stamp, in capture order and
/// named by it (kernel and grid), each released no earlier than the one ahead and no
/// earlier than it started.
#[test]
#[ignore = "needs a GPU"]
fn timeline_stamps_each_captured_kernel_in_order() {
    std::env::set_var("MXR_TIMELINE", "1");
    let g = gpu();
    std::env::remove_var("MXR_TIMELINE");
    assert!(g.tuning.timeline);
    let (rows, cols) = (64, 4096);
    let w8 = GpuMatrix::upload(&g, QType::Q8_0, 1, rows, cols, &quantized(QType::Q8_0, rows * cols, 6)).unwrap();
    let w4 = GpuMatrix::upload(&g, QType::Q4K, 1, rows, cols, &quantized(QType::Q4K, rows * cols, 7)).unwrap();
    let x = g.upload(&Rng::new(5).normals(cols, 1.0)).unwrap();
    let act = g.quantize_act(&x.as_view(), 1, cols).unwrap();
    let mut y = g.zeros::<f32>(rows).unwrap();
    // four products of two kernels, taking turns (the input quantized outside the graph);
    // capture adds a fifth, the closing mark
    let graph = g
        .capture(|| {
            for w in [&w8, &w4, &w8, &w4] {
                g.matvec_with(w, None, &x.as_view(), Some(&act), 1, 1, &mut y.as_view_mut())?;
            }
            Ok(())
        })
        .unwrap();
    for _ in 0..2 {
        g.timeline_reset().unwrap();
        graph.launch().unwrap();
        let s = g.timeline_read().unwrap();
        let names: Vec<_> = s.iter().map(|s| s.name.as_deref().unwrap_or("?")).collect();
        // and the mark every timed graph ends with
        let ordered = s.len() == 5
            && names[0] == names[2]
            && names[1] == names[3]
            && names[0].starts_with("matvec_q8_0 ")
            && names[1].starts_with("matvec_q4_k ")
            && names[4] == "timeline_mark 1x1x1"
            && s.windows(2).all(|p| p[0].release <= p[1].release)
            && s.iter().all(|s| s.start <= s.release && s.start > 0);
        check("timeline", &format!("{names:?}"), if ordered { 0.0 } else { 1.0 }, 0.0);
    }
}

/// The look for NaN and infinity the decode step does beside its logits' copy: the first
/// one's index wherever it lies (whole 16-byte units, the tail, a start off 16 bytes),
/// whichever kind it is, with a later one present; -1 for clean values, also on the side
/// stream.
#[test]
#[ignore = "needs a GPU"]
fn first_non_finite_finds_the_first_nan_or_infinity() {
    let g = gpu();
    let mut out = g.zeros::<i32>(1).unwrap();
    let mut cases = 0;
    for n in [1usize, 3, 4, 1031, 4100, 200_064] {
        let clean: Vec<f32> = Rng::new(n as u64).normals(n + 1, 1e30);
        for skip in [0usize, 1] {
            let mut places = vec![None, Some(0), Some(n / 2), Some(n - 1)];
            places.extend([4 * 1024 + 3, 4 * 1024 * 2 + 1].iter().filter(|&&p| p < n).map(|&p| Some(p)));
            for (k, at) in places.into_iter().enumerate() {
                let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN][k % 4];
                let mut host = clean[..n + skip].to_vec();
                if let Some(a) = at {
                    host[skip + a] = bad;
                    // a later one does not move the answer
                    if a + 5 < n {
                        host[skip + a + 5] = f32::NAN;
                    }
                }
                let x = g.upload(&host).unwrap();
                let view = x.slice(skip..skip + n);
                let side = k % 2 == 1;
                if side {
                    g.side_after_main().unwrap();
                    g.first_non_finite_side(&view, &mut out.as_view_mut()).unwrap();
                    g.main_after_side().unwrap();
                } else {
                    g.first_non_finite(&view, &mut out.as_view_mut()).unwrap();
                }
                let got = g.download(&out.as_view()).unwrap()[0];
                let want = at.map_or(-1, |a| a as i32);
                let case = format!("n {n}, from {skip}, {bad} at {at:?}{}", if side { ", side stream" } else { "" });
                assert_eq!(got, want, "{case}");
                cases += 1;
            }
        }
    }
    check("first_non_finite", &format!("{cases} cases, lengths 1 to 200064, aligned and not"), 0.0, 0.0);
    let x = g.upload(&[1f32]).unwrap();
    assert!(g.first_non_finite(&x.as_view(), &mut out.slice_mut(0..0)).is_err(), "no room for the answer");
}
