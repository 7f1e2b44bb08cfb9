//! Decode's fused kernels against the kernels they replace, bit for bit (they are the same
//! arithmetic in fewer launches): the router's product with its top-k, the MoE's
//! combination inside the next norm, and the MoE's norm inside the router (whose router
//! sums run in another order: its weights are compared within rounding). The fused
//! routers run twice: the second run shows that their "last block" tickets were left at
//! zero. Run on the GPU machine by scripts/gpu-check.sh.

use mxr_kernels::cuda::{Gpu, GpuMatrix, Residual};
use mxr_quant::reference::{quantize_to_vec, stats::Rng};
use mxr_quant::QType;

fn gpu() -> Gpu {
    Gpu::open(0).expect("these tests need a GPU")
}

fn same(kernel: &str, case: &str, equal: bool) {
    println!("CHECK {kernel} | {case} | {} | exact | {}", if equal { "equal" } else { "differ" }, if equal { "ok" } else { "FAIL" });
    assert!(equal, "{kernel} {case}: the fused kernel's values differ from the separate kernels'");
}

fn weights(q: QType, n: usize, seed: u64) -> Vec<u8> {
    quantize_to_vec(q, &Rng::new(seed).normals(n, 0.5)).unwrap()
}

#[test]
#[ignore = "needs a GPU"]
fn norm_adds_expert_outputs_as_moe_combine_does() {
    let g = gpu();
    // decode's width, rows of few 32-blocks, rows not of whole 16-byte loads (the scalar
    // path), and one expert per token
    for (rows, width, k) in [(1usize, 6144usize, 2usize), (3, 96, 3), (2, 1030, 2), (5, 64, 1)] {
        let x = Rng::new(40).normals(rows * width, 2.0);
        let y = Rng::new(41).normals(rows * k * width, 1.0);
        let w: Vec<f32> = Rng::new(42).normals(rows * k, 1.0).iter().map(|v| v.abs()).collect();
        let norm = Rng::new(43).normals(width, 1.0);
        let (gx, gy, gw, gn) = (g.upload(&x).unwrap(), g.upload(&y).unwrap(), g.upload(&w).unwrap(), g.upload(&norm).unwrap());
        let (alpha, beta) = (1.3f32, 0.7f32);
        let quantize = width.is_multiple_of(32);
        // separate: moe_combine, then the norm with a plain residual
        let mut m = g.zeros::<f32>(rows * width).unwrap();
        g.moe_combine(&gy.as_view(), &gw.as_view(), rows, k, width, &mut m.as_view_mut()).unwrap();
        let mut want = gx.clone();
        let plain = Residual { a: m.as_view(), alpha, beta, combine: None };
        let want_q = g.rmsnorm_fused(&mut want.as_view_mut(), Some(&plain), &gn, None, 1e-6, quantize).unwrap();
        // fused
        let mut got = gx.clone();
        let fused = Residual { a: gy.as_view(), alpha, beta, combine: Some((gw.as_view(), k)) };
        let got_q = g.rmsnorm_fused(&mut got.as_view_mut(), Some(&fused), &gn, None, 1e-6, quantize).unwrap();
        let mut equal = g.download(&got.as_view()).unwrap() == g.download(&want.as_view()).unwrap();
        if let (Some(a), Some(b)) = (&got_q, &want_q) {
            equal &= g.download(&a.q.as_view()).unwrap() == g.download(&b.q.as_view()).unwrap();
            equal &= g.download(&a.d.as_view()).unwrap() == g.download(&b.d.as_view()).unwrap();
        }
        same("rmsnorm_fused + combine", &format!("{rows}x{width}, k {k}"), equal);
        // the combine weights' length is checked
        let short = Residual { a: gy.as_view(), alpha, beta, combine: Some((gw.slice(..rows * k - 1), k)) };
        assert!(g.rmsnorm_fused(&mut got.as_view_mut(), Some(&short), &gn, None, 1e-6, false).is_err());
    }
}

#[test]
#[ignore = "needs a GPU"]
fn route_fused_equals_the_product_then_top_k() {
    let g = gpu();
    for (n_tokens, n_exp, k, cols, q) in [
        (1usize, 8usize, 2usize, 6144usize, QType::F32),
        (5, 32, 2, 100, QType::F32),
        (3, 45, 3, 264, QType::BF16),
        (8, 7, 2, 64, QType::F16),
    ] {
        let router = GpuMatrix::upload(&g, q, 1, n_exp, cols, &weights(q, n_exp * cols, 44)).unwrap();
        let gx = g.upload(&Rng::new(45).normals(n_tokens * cols, 1.0)).unwrap();
        // separate: the product (few rows: one block per row), then route_topk
        let mut logits = g.zeros::<f32>(n_tokens * n_exp).unwrap();
        g.matvec(&router, None, &gx.as_view(), 1, n_tokens, &mut logits.as_view_mut()).unwrap();
        let mut ids = g.zeros::<i32>(n_tokens * k).unwrap();
        let mut w = g.zeros::<f32>(n_tokens * k).unwrap();
        let mut counts = g.zeros::<u32>(n_exp).unwrap();
        g.route_topk(&logits.as_view(), n_tokens, n_exp, k, &mut ids.as_view_mut(), &mut w.as_view_mut(), &mut counts).unwrap();
        let (want_ids, want_w) = (g.download(&ids.as_view()).unwrap(), g.download(&w.as_view()).unwrap());
        let want_counts = g.download(&counts.as_view()).unwrap();
        // fused, twice, into fresh outputs; the counts accumulate
        let mut fcounts = g.zeros::<u32>(n_exp).unwrap();
        for run in 1..=2u32 {
            let mut ids = g.zeros::<i32>(n_tokens * k).unwrap();
            let mut w = g.zeros::<f32>(n_tokens * k).unwrap();
            let ran =
                g.route_fused(&router, &gx.as_view(), n_tokens, k, &mut ids.as_view_mut(), &mut w.as_view_mut(), &mut fcounts).unwrap();
            assert!(ran, "route_fused should take {n_tokens} tokens of a {q} router");
            let c: Vec<u32> = g.download(&fcounts.as_view()).unwrap();
            let equal = g.download(&ids.as_view()).unwrap() == want_ids
                && g.download(&w.as_view()).unwrap() == want_w
                && c.iter().zip(&want_counts).all(|(&a, &b)| a == run * b);
            same("route_fused", &format!("{n_tokens} tokens, top-{k} of {n_exp}, {q} x{cols}, run {run}"), equal);
        }
    }
    // where it does not apply, it runs nothing and says so
    let (n_exp, cols) = (8, 256);
    let q8 = GpuMatrix::upload(&g, QType::Q8_0, 1, n_exp, cols, &weights(QType::Q8_0, n_exp * cols, 46)).unwrap();
    let f32r = GpuMatrix::upload(&g, QType::F32, 1, n_exp, cols, &weights(QType::F32, n_exp * cols, 46)).unwrap();
    let gx = g.upload(&Rng::new(47).normals(65 * cols, 1.0)).unwrap();
    let mut ids = g.zeros::<i32>(65 * 2).unwrap();
    let mut w = g.zeros::<f32>(65 * 2).unwrap();
    let mut counts = g.zeros::<u32>(n_exp).unwrap();
    let (iv, wv) = (&mut ids.as_view_mut(), &mut w.as_view_mut());
    assert!(!g.route_fused(&q8, &gx.slice(..cols), 1, 2, iv, wv, &mut counts).unwrap(), "a quantized router");
    assert!(!g.route_fused(&f32r, &gx.as_view(), 65, 2, iv, wv, &mut counts).unwrap(), "65 tokens");
    assert_eq!(g.download(&counts.as_view()).unwrap(), vec![0; n_exp], "nothing ran");
}

/// Decode's MoE norm inside the router (`moe_norm_route`, MXR_FUSE bit 8) against
/// rmsnorm_fused then route_fused: the normalised row and its int8 form bit for bit, the
/// same choices, the weights within rounding (the router's sums run in another order), the
/// counts twice over two runs (its tickets left at zero); and where it does not apply it
/// queues nothing and says so.
#[test]
#[ignore = "needs a GPU"]
fn norm_inside_the_router_equals_the_norm_then_the_router() {
    let g = gpu();
    // (width, experts, top-k, expert outputs combined into the residual (0: a plain
    // residual, None: no residual), int8 form)
    for (width, n_exp, k, res, quantize) in [
        (6144usize, 8usize, 2usize, Some(2usize), true),
        (6144, 32, 2, Some(0), false),
        (256, 4, 1, None, true),
        (2048, 8, 3, Some(1), true),
    ] {
        let x = Rng::new(50).normals(width, 2.0);
        let norm = Rng::new(51).normals(width, 1.0);
        let kr = res.unwrap_or(0).max(1);
        let y = Rng::new(52).normals(kr * width, 1.0);
        let cw: Vec<f32> = Rng::new(53).normals(kr, 1.0).iter().map(|v| v.abs()).collect();
        let router = GpuMatrix::upload(&g, QType::F32, 1, n_exp, width, &weights(QType::F32, n_exp * width, 54)).unwrap();
        let (gx, gn, gy, gcw) = (g.upload(&x).unwrap(), g.upload(&norm).unwrap(), g.upload(&y).unwrap(), g.upload(&cw).unwrap());
        let residual =
            res.map(|r| Residual { a: gy.as_view(), alpha: 1.3, beta: 0.7, combine: if r == 0 { None } else { Some((gcw.as_view(), r)) } });
        // separate
        let mut want = gx.clone();
        let want_q = g.rmsnorm_fused(&mut want.as_view_mut(), residual.as_ref(), &gn, None, 1e-5, quantize).unwrap();
        let (mut ids, mut w, mut counts) = (g.zeros::<i32>(k).unwrap(), g.zeros::<f32>(k).unwrap(), g.zeros::<u32>(n_exp).unwrap());
        assert!(g.route_fused(&router, &want.as_view(), 1, k, &mut ids.as_view_mut(), &mut w.as_view_mut(), &mut counts).unwrap());
        let (want_x, want_ids, want_w) =
            (g.download(&want.as_view()).unwrap(), g.download(&ids.as_view()).unwrap(), g.download(&w.as_view()).unwrap());
        let want_counts = g.download(&counts.as_view()).unwrap();
        // fused, twice; x itself is left as it was
        let mut fcounts = g.zeros::<u32>(n_exp).unwrap();
        for run in 1..=2u32 {
            let got = g
                .moe_norm_route(&gx.as_view(), residual.as_ref(), &gn, 1e-5, quantize, &router, k, &mut fcounts)
                .unwrap()
                .expect("moe_norm_route should take this shape");
            let mut equal = g.download(&got.x.as_view()).unwrap() == want_x && g.download(&gx.as_view()).unwrap() == x;
            match (&got.act, &want_q) {
                (Some(a), Some(b)) => {
                    equal &= g.download(&a.q.as_view()).unwrap() == g.download(&b.q.as_view()).unwrap();
                    equal &= g.download(&a.d.as_view()).unwrap() == g.download(&b.d.as_view()).unwrap();
                }
                (None, None) => {}
                _ => equal = false,
            }
            let c: Vec<u32> = g.download(&fcounts.as_view()).unwrap();
            equal &= g.download(&got.ids.as_view()).unwrap() == want_ids && c.iter().zip(&want_counts).all(|(&a, &b)| a == run * b);
            let gw = g.download(&got.weights.as_view()).unwrap();
            let dw = gw.iter().zip(&want_w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let case = format!("width {width}, top-{k} of {n_exp}, residual {res:?}, int8 {quantize}, run {run}");
            println!("CHECK moe_norm_route weights | {case} | max abs {dw:.2e} | 1e-5 | {}", if dw <= 1e-5 { "ok" } else { "FAIL" });
            same("moe_norm_route", &case, equal);
            assert!(dw <= 1e-5, "{case}: weights differ by {dw}");
        }
    }
    // where it does not apply: nothing runs, x and the counts stay
    let width = 6144;
    let gx = g.upload(&Rng::new(55).normals(2 * width, 1.0)).unwrap();
    let gn = g.upload(&Rng::new(56).normals(width, 1.0)).unwrap();
    let f32r = |n: usize| GpuMatrix::upload(&g, QType::F32, 1, n, width, &weights(QType::F32, n * width, 57)).unwrap();
    let q8 = GpuMatrix::upload(&g, QType::Q8_0, 1, 8, width, &weights(QType::Q8_0, 8 * width, 58)).unwrap();
    let mut counts = g.zeros::<u32>(8).unwrap();
    let one = gx.slice(..width);
    assert!(g.moe_norm_route(&one, None, &gn, 1e-5, true, &q8, 2, &mut counts).unwrap().is_none(), "a quantized router");
    assert!(g.moe_norm_route(&gx.as_view(), None, &gn, 1e-5, true, &f32r(8), 2, &mut counts).unwrap().is_none(), "two rows");
    assert!(g.moe_norm_route(&one, None, &gn, 1e-5, true, &f32r(5), 2, &mut counts).unwrap().is_none(), "5 experts share no whole blocks");
    let mut off = gpu();
    off.tuning.fuse &= !mxr_kernels::cuda::FUSE_NORM_ROUTE;
    let (gx2, gn2, r2) = (
        off.upload(&Rng::new(55).normals(width, 1.0)).unwrap(),
        off.upload(&Rng::new(56).normals(width, 1.0)).unwrap(),
        GpuMatrix::upload(&off, QType::F32, 1, 8, width, &weights(QType::F32, 8 * width, 57)).unwrap(),
    );
    let mut c2 = off.zeros::<u32>(8).unwrap();
    assert!(off.moe_norm_route(&gx2.as_view(), None, &gn2, 1e-5, true, &r2, 2, &mut c2).unwrap().is_none(), "MXR_FUSE without 8");
    assert_eq!(g.download(&counts.as_view()).unwrap(), vec![0; 8], "nothing ran");
}
