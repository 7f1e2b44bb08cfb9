//! The matrix-vector products (matvec.cu) against a plain reference on random inputs with
//! ugly shapes: every type and shape, expert stacks picked by ids, parts of each expert,
//! row ranges, products from shared memory, and two products in one launch. Needs a GPU:
//! ignored by `cargo test`; scripts/gpu-check.sh runs it with --ignored on the GPU machine
//! (budgets as in gpu_kernels.rs).

use mxr_kernels::cuda::{Gpu, GpuMatrix, PIPELINE_Q4_K, PIPELINE_Q8_0};
use mxr_quant::reference::{matvec_f64, stats::diff, stats::Rng};
use mxr_quant::{QMatrix, QType};

mod common;
use common::{as_kernel_input, check, gpu, quantized, shapes, TYPES};

#[test]
#[ignore = "needs a GPU"]
fn matvec_every_type_and_shape() {
    let g = gpu();
    for q in TYPES {
        for (rows, cols) in shapes(q) {
            let w = quantized(q, rows * cols, 1);
            let x = Rng::new(2).normals(cols, 1.0);
            let want = matvec_f64(&QMatrix::new(q, rows, cols, &w).unwrap(), &as_kernel_input(q, &x));
            let gw = GpuMatrix::upload(&g, q, 1, rows, cols, &w).unwrap();
            let gx = g.upload(&x).unwrap();
            let mut gy = g.zeros::<f32>(rows).unwrap();
            g.matvec(&gw, None, &gx.as_view(), 1, 1, &mut gy.as_view_mut()).unwrap();
            let got = g.download(&gy.as_view()).unwrap();
            check("matvec", &format!("{q} {rows}x{cols}"), diff(&got, &want).nmse, 1e-10);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn matvec_gathers_experts_and_inputs() {
    let g = gpu();
    let (n_exp, rows, cols) = (3, 37, 256);
    for q in TYPES {
        let w = quantized(q, n_exp * rows * cols, 3);
        let xs = Rng::new(4).normals(2 * cols, 1.0);
        let ids = [2i32, 0, 2, 1];
        let row_bytes = q.row_bytes(cols).unwrap();
        let gw = GpuMatrix::upload(&g, q, n_exp, rows, cols, &w).unwrap();
        let (gx, gids) = (g.upload(&xs).unwrap(), g.upload(&ids).unwrap());
        for x_div in [1usize, 2] {
            // x_div 1: pair p reads x row p (rows 0..4 of a 4-row input); 2: row p / 2.
            let x_all: Vec<f32> = if x_div == 1 { xs.iter().chain(&xs).copied().collect() } else { xs.clone() };
            let gx_all = if x_div == 1 { g.upload(&x_all).unwrap() } else { gx.clone() };
            let mut gy = g.zeros::<f32>(4 * rows).unwrap();
            g.matvec(&gw, Some(&gids), &gx_all.as_view(), x_div, 4, &mut gy.as_view_mut()).unwrap();
            let got = g.download(&gy.as_view()).unwrap();
            let mut want = Vec::new();
            for (p, &e) in ids.iter().enumerate() {
                let e = e as usize;
                let m = QMatrix::new(q, rows, cols, &w[e * rows * row_bytes..(e + 1) * rows * row_bytes]).unwrap();
                want.extend(matvec_f64(&m, &as_kernel_input(q, &x_all[(p / x_div) * cols..(p / x_div + 1) * cols])));
            }
            check("matvec (experts)", &format!("{q} x_div {x_div}"), diff(&got, &want).nmse, 1e-10);
            // a negative id skips its pair: those rows keep what they held (7.0), the
            // others are as above
            let skip = g.upload(&[2i32, -1, 2, 1]).unwrap();
            let mut gy = g.upload(&vec![7f32; 4 * rows]).unwrap();
            g.matvec(&gw, Some(&skip), &gx_all.as_view(), x_div, 4, &mut gy.as_view_mut()).unwrap();
            let got = g.download(&gy.as_view()).unwrap();
            let kept = got[rows..2 * rows].iter().all(|&v| v == 7.0);
            let others: Vec<f32> = [0usize, 2, 3].iter().flat_map(|&p| got[p * rows..(p + 1) * rows].to_vec()).collect();
            let want_others: Vec<f64> = [0usize, 2, 3].iter().flat_map(|&p| want[p * rows..(p + 1) * rows].to_vec()).collect();
            let nmse = if kept { diff(&others, &want_others).nmse } else { f64::INFINITY };
            check("matvec (experts, a pair skipped)", &format!("{q} x_div {x_div}"), nmse, 1e-10);
        }
    }
}

/// Products over part of each expert (`matvec_part`, `matvec_pair_rows`: the GPU's share of
/// a cold expert's hidden units, issue 7's mixed decode): rows 0..n and columns 0..c of
/// each chosen expert's layout against the reference on that corner of the matrix, for
/// every type and each kernel family (quantized direct and staged, float wide, row-wise
/// and one value at a time). A skipped pair (-1) keeps its rows; a part outside the matrix
/// or not ending on whole blocks is an error.
#[test]
#[ignore = "needs a GPU"]
fn matvec_parts_compute_a_corner_of_each_expert() {
    use mxr_kernels::cuda::Part;
    let g = gpu();
    let n_exp = 3;
    for q in TYPES {
        let unit = Part::unit(q);
        let mut cases = vec![(37usize, 4 * unit, Part { rows: 20, cols: 2 * unit })];
        if q.block_size() == 1 {
            // past the wide kernel's 1,024 rows: the row-wise kernel, then rows of values
            // that are no whole 16-byte load (one value at a time)
            cases.push((1030, 96, Part { rows: 1000, cols: 64 }));
            cases.push((1030, 70, Part { rows: 1029, cols: 64 }));
        }
        for (rows, cols, part) in cases {
            let w = quantized(q, n_exp * rows * cols, 80);
            let ids = [2i32, -1, 0, 2];
            let xs = Rng::new(81).normals(ids.len() * part.cols, 1.0);
            let gw = GpuMatrix::upload(&g, q, n_exp, rows, cols, &w).unwrap();
            let (gx, gids) = (g.upload(&xs).unwrap(), g.upload(&ids).unwrap());
            let mut gy = g.upload(&vec![7f32; ids.len() * part.rows]).unwrap();
            g.matvec_part(&gw, part, Some(&gids), &gx.as_view(), None, 1, ids.len(), &mut gy.as_view_mut()).unwrap();
            let got = g.download(&gy.as_view()).unwrap();
            let (rb, sub_rb) = (q.row_bytes(cols).unwrap(), q.row_bytes(part.cols).unwrap());
            let (mut got_kept, mut want) = (Vec::new(), Vec::new());
            for (p, &e) in ids.iter().enumerate() {
                let rows_p = &got[p * part.rows..(p + 1) * part.rows];
                if e < 0 {
                    assert!(rows_p.iter().all(|&v| v == 7.0), "{q}: a skipped pair's rows changed");
                    continue;
                }
                // the corner: the first sub_rb bytes of the expert's first part.rows rows
                let corner: Vec<u8> = (0..part.rows).flat_map(|r| w[(e as usize * rows + r) * rb..][..sub_rb].iter().copied()).collect();
                let m = QMatrix::new(q, part.rows, part.cols, &corner).unwrap();
                want.extend(matvec_f64(&m, &as_kernel_input(q, &xs[p * part.cols..(p + 1) * part.cols])));
                got_kept.extend_from_slice(rows_p);
            }
            check("matvec_part", &format!("{q} {rows}x{cols}, part {}x{}", part.rows, part.cols), diff(&got_kept, &want).nmse, 1e-10);
            // two matrices' rows 0..n over one input: each pair's rows of the whole product
            if mxr_kernels::cuda::quantized(q) {
                let gw1 = GpuMatrix::upload(&g, q, n_exp, rows, cols, &quantized(q, n_exp * rows * cols, 82)).unwrap();
                let xs = Rng::new(83).normals(2 * cols, 1.0);
                let act = g.quantize_act(&g.upload(&xs).unwrap().as_view(), 2, cols).unwrap();
                let ids = g.upload(&[1i32, 2, 0, 1]).unwrap();
                let n = part.rows;
                let (mut y0, mut y1) = (g.zeros::<f32>(4 * n).unwrap(), g.zeros::<f32>(4 * n).unwrap());
                g.matvec_pair_rows([&gw, &gw1], [n, n], Some(&ids), &act, 2, 4, [&mut y0.as_view_mut(), &mut y1.as_view_mut()]).unwrap();
                let (mut w0, mut w1) = (g.zeros::<f32>(4 * rows).unwrap(), g.zeros::<f32>(4 * rows).unwrap());
                g.matvec_pair([&gw, &gw1], Some(&ids), &act, 2, 4, [&mut w0.as_view_mut(), &mut w1.as_view_mut()]).unwrap();
                let (p0, p1) = (g.download(&y0.as_view()).unwrap(), g.download(&y1.as_view()).unwrap());
                let (f0, f1) = (g.download(&w0.as_view()).unwrap(), g.download(&w1.as_view()).unwrap());
                let same = (0..4)
                    .all(|p| p0[p * n..(p + 1) * n] == f0[p * rows..p * rows + n] && p1[p * n..(p + 1) * n] == f1[p * rows..p * rows + n]);
                println!(
                    "CHECK matvec_pair_rows | {q} {rows}x{cols}, rows 0..{n} | {} | exact | {}",
                    if same { "equal" } else { "differ" },
                    if same { "ok" } else { "FAIL" }
                );
                assert!(same, "{q}: matvec_pair_rows differs from the whole products' rows");
            }
            let mut y = g.zeros::<f32>(4 * (rows + 1)).unwrap();
            let mut bad = |p: Part| g.matvec_part(&gw, p, Some(&gids), &gx.as_view(), None, 1, 4, &mut y.as_view_mut()).is_err();
            assert!(bad(Part { rows: rows + 1, cols }), "{q}: rows past the matrix");
            assert!(bad(Part { rows, cols: cols + unit }), "{q}: columns past the matrix");
            assert!(bad(Part { rows, cols: unit / 2 }), "{q}: a part ending inside a block");
        }
    }
}

/// A float product in row ranges (`matvec_rows`, the decode step's lm_head in pieces)
/// gives each row the bits of the whole product; ranges the kernel cannot take are errors.
#[test]
#[ignore = "needs a GPU"]
fn matvec_rows_give_the_rows_of_the_whole_product() {
    let g = gpu();
    for (q, rows, cols) in [(QType::BF16, 4096usize, 512usize), (QType::F16, 2056, 264), (QType::F32, 1032, 100)] {
        let w = GpuMatrix::upload(&g, q, 1, rows, cols, &quantized(q, rows * cols, 70)).unwrap();
        let x = g.upload(&Rng::new(71).normals(cols, 1.0)).unwrap();
        let mut whole = g.zeros::<f32>(rows).unwrap();
        g.matvec(&w, None, &x.as_view(), 1, 1, &mut whole.as_view_mut()).unwrap();
        let want = g.download(&whole.as_view()).unwrap();
        // two halves on a block boundary, then three uneven pieces
        let (wp, rp) = g.tuning.matvec_shape(q);
        let b = (wp * rp) as usize;
        let half = rows / 2 / b * b;
        for cuts in [vec![0, half, rows], vec![0, b, 5 * b, rows]] {
            let mut y = g.zeros::<f32>(rows).unwrap();
            for r in cuts.windows(2) {
                g.matvec_rows(&w, r[0]..r[1], &x.as_view(), &mut y.slice_mut(r[0]..r[1])).unwrap();
            }
            let same = g.download(&y.as_view()).unwrap() == want;
            println!(
                "CHECK matvec_rows | {q} {rows}x{cols}, pieces at {cuts:?} | {} | exact | {}",
                if same { "equal" } else { "differ" },
                if same { "ok" } else { "FAIL" }
            );
            assert!(same, "{q} {rows}x{cols} in pieces {cuts:?}");
        }
        let mut y = g.zeros::<f32>(rows).unwrap();
        assert!(g.matvec_rows(&w, 1..rows, &x.as_view(), &mut y.slice_mut(1..rows)).is_err(), "a range off a block's first row");
        assert!(g.matvec_rows(&w, 0..rows + 1, &x.as_view(), &mut y.as_view_mut()).is_err(), "past the last row");
        assert!(g.matvec_rows(&w, 0..b, &x.as_view(), &mut y.slice_mut(0..2 * b)).is_err(), "y of another length");
    }
    let q8 = GpuMatrix::upload(&g, QType::Q8_0, 1, 2048, 256, &quantized(QType::Q8_0, 2048 * 256, 72)).unwrap();
    let small = GpuMatrix::upload(&g, QType::BF16, 1, 512, 256, &quantized(QType::BF16, 512 * 256, 73)).unwrap();
    let x = g.upload(&Rng::new(74).normals(256, 1.0)).unwrap();
    let mut y = g.zeros::<f32>(2048).unwrap();
    assert!(g.matvec_rows(&q8, 0..1024, &x.as_view(), &mut y.slice_mut(0..1024)).is_err(), "quantized weights");
    assert!(g.matvec_rows(&small, 0..256, &x.as_view(), &mut y.slice_mut(0..256)).is_err(), "under 1024 rows (another kernel)");
}

/// Q8_0's and Q4_K's products from shared memory (`MXR_MATVEC_STAGE` = 1 to 4 chunks per
/// warp, dense launches prefetching before their PDL wait or not) give the same bits as the
/// kernels reading global memory: single matrices (rows that fill no block, rows of one
/// partial chunk, of whole and partial chunks, and rows too wide to stage, which fall
/// back), expert stacks picked by ids, and the two-matrix launch.
#[test]
#[ignore = "needs a GPU"]
fn staged_products_equal_the_direct_ones() {
    let mut plain = gpu();
    plain.tuning.matvec_stage = 0;
    let shapes = [(1, 256), (65, 768), (513, 256), (7, 6144), (37, 9216), (5, 11264), (9, 20480)];
    for q in [QType::Q8_0, QType::Q4K] {
        let ws: Vec<(usize, usize, Vec<u8>, Vec<f32>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(rows, cols))| (rows, cols, quantized(q, rows * cols, 40 + i as u64), Rng::new(60 + i as u64).normals(cols, 1.0)))
            .collect();
        let single = |g: &Gpu| -> Vec<Vec<f32>> {
            ws.iter()
                .map(|(rows, cols, w, x)| {
                    let gw = GpuMatrix::upload(g, q, 1, *rows, *cols, w).unwrap();
                    let gx = g.upload(x).unwrap();
                    let mut gy = g.zeros::<f32>(*rows).unwrap();
                    g.matvec(&gw, None, &gx.as_view(), 1, 1, &mut gy.as_view_mut()).unwrap();
                    g.download(&gy.as_view()).unwrap()
                })
                .collect()
        };
        // stacks of 3 experts, 4 pairs over 2 tokens, gate/up-like pair of 70 and 37 rows;
        // then a dense pair (no ids) of 130 and 37 rows
        let (n_exp, rows0, rows1, cols) = (3, 70, 37, 2304);
        let ids = [2i32, 0, 1, 2];
        let w0 = quantized(q, n_exp * rows0 * cols, 42);
        let w1 = quantized(q, n_exp * rows1 * cols, 43);
        let x = Rng::new(44).normals(2 * cols, 1.0);
        let pairs = |g: &Gpu| {
            let (m0, m1) =
                (GpuMatrix::upload(g, q, n_exp, rows0, cols, &w0).unwrap(), GpuMatrix::upload(g, q, n_exp, rows1, cols, &w1).unwrap());
            let gx = g.upload(&x).unwrap();
            let act = g.quantize_act(&gx.as_view(), 2, cols).unwrap();
            let gids = g.upload(&ids).unwrap();
            let (mut y0, mut y1) = (g.zeros::<f32>(4 * rows0).unwrap(), g.zeros::<f32>(4 * rows1).unwrap());
            g.matvec_pair([&m0, &m1], Some(&gids), &act, 2, 4, [&mut y0.as_view_mut(), &mut y1.as_view_mut()]).unwrap();
            let mut y2 = g.zeros::<f32>(4 * rows0).unwrap();
            g.matvec_with(&m0, Some(&gids), &gx.as_view(), Some(&act), 2, 4, &mut y2.as_view_mut()).unwrap();
            let (d0, d1) = (
                GpuMatrix::upload(g, q, 1, 130, cols, &w0[..q.row_bytes(cols).unwrap() * 130]).unwrap(),
                GpuMatrix::upload(g, q, 1, 37, cols, &w1[..q.row_bytes(cols).unwrap() * 37]).unwrap(),
            );
            let (mut z0, mut z1) = (g.zeros::<f32>(130).unwrap(), g.zeros::<f32>(37).unwrap());
            g.matvec_pair([&d0, &d1], None, &act, 1, 1, [&mut z0.as_view_mut(), &mut z1.as_view_mut()]).unwrap();
            [y0, y1, y2, z0, z1].map(|y| g.download(&y.as_view()).unwrap())
        };
        let (direct, direct_pairs) = (single(&plain), pairs(&plain));
        for (stages, early) in [(1, true), (1, false), (2, true), (2, false), (3, true), (3, false), (4, true)] {
            let mut staged = gpu();
            (staged.tuning.matvec_stage, staged.tuning.matvec_early) = (stages, early);
            staged.tuning.matvec_staged = PIPELINE_Q8_0 | PIPELINE_Q4_K;
            let what = format!("{q:?} S={stages}{}", if early { " early" } else { "" });
            for ((rows, cols, ..), (a, b)) in ws.iter().zip(direct.iter().zip(single(&staged))) {
                let bytes = staged.tuning.matvec_stage_bytes(q, *cols);
                check(
                    "matvec staged = direct",
                    &format!("{what} {rows}x{cols}, {bytes} bytes staged"),
                    if *a == b { 0.0 } else { 1.0 },
                    0.0,
                );
            }
            let same = direct_pairs == pairs(&staged);
            check("matvec staged = direct", &format!("{what} experts, pairs and single"), if same { 0.0 } else { 1.0 }, 0.0);
        }
    }
}

/// Two quantized products in one launch (gate and up; qkv and gate) give exactly what two
/// launches give: expert stacks picked by ids, and single matrices of different heights.
#[test]
#[ignore = "needs a GPU"]
fn matvec_pair_equals_two_products() {
    let g = gpu();
    let cols = 512;
    for q in [QType::Q8_0, QType::Q4K, QType::Q6K, QType::Q4_0] {
        // stacks of 3 experts, 4 pairs (x_div 2: two tokens); then single 130- and 37-row matrices
        let cases = [(3usize, 70usize, 70usize, Some(vec![2i32, 0, 1, 2]), 2usize), (1, 130, 37, None, 1)];
        for (n_exp, rows0, rows1, ids, x_div) in cases {
            let pairs = ids.as_ref().map_or(1, Vec::len);
            let w0 = GpuMatrix::upload(&g, q, n_exp, rows0, cols, &quantized(q, n_exp * rows0 * cols, 30)).unwrap();
            let w1 = GpuMatrix::upload(&g, q, n_exp, rows1, cols, &quantized(q, n_exp * rows1 * cols, 31)).unwrap();
            let n_x = pairs.div_ceil(x_div);
            let gx = g.upload(&Rng::new(32).normals(n_x * cols, 1.0)).unwrap();
            let act = g.quantize_act(&gx.as_view(), n_x, cols).unwrap();
            let gids = ids.as_ref().map(|v| g.upload(v).unwrap());
            let (mut a0, mut a1) = (g.zeros::<f32>(pairs * rows0).unwrap(), g.zeros::<f32>(pairs * rows1).unwrap());
            g.matvec_pair([&w0, &w1], gids.as_ref(), &act, x_div, pairs, [&mut a0.as_view_mut(), &mut a1.as_view_mut()]).unwrap();
            let (mut b0, mut b1) = (g.zeros::<f32>(pairs * rows0).unwrap(), g.zeros::<f32>(pairs * rows1).unwrap());
            g.matvec_with(&w0, gids.as_ref(), &gx.as_view(), Some(&act), x_div, pairs, &mut b0.as_view_mut()).unwrap();
            g.matvec_with(&w1, gids.as_ref(), &gx.as_view(), Some(&act), x_div, pairs, &mut b1.as_view_mut()).unwrap();
            let same = g.download(&a0.as_view()).unwrap() == g.download(&b0.as_view()).unwrap()
                && g.download(&a1.as_view()).unwrap() == g.download(&b1.as_view()).unwrap();
            check("matvec_pair = two matvecs", &format!("{q} {rows0}+{rows1} rows, {pairs} pairs"), if same { 0.0 } else { 1.0 }, 0.0);
        }
    }
}

/// Products over PCIe on few blocks (`Gpu::over_pcie` with `Tuning::pcie_blocks`): each
/// block takes every so many blocks of rows, staged (Q4_K, Q8_0 with 256-wide rows) or
/// direct, and the outputs are the same bits as one block per block of rows, for single
/// products and pairs, with ids skipping a pair; 1 block in all and 5 (not a divisor).
#[test]
#[ignore = "needs a GPU"]
fn products_on_few_blocks_equal_one_block_per_row_block() {
    let mut g = gpu();
    let (n_exp, rows, cols) = (3usize, 300usize, 512usize);
    for q in [QType::Q8_0, QType::Q4K, QType::Q6K, QType::Q4_0] {
        let w0 = GpuMatrix::upload(&g, q, n_exp, rows, cols, &quantized(q, n_exp * rows * cols, 40)).unwrap();
        let w1 = GpuMatrix::upload(&g, q, n_exp, rows, cols, &quantized(q, n_exp * rows * cols, 41)).unwrap();
        let gx = g.upload(&Rng::new(42).normals(cols, 1.0)).unwrap();
        let act = g.quantize_act(&gx.as_view(), 1, cols).unwrap();
        let gids = g.upload(&[2i32, -1, 0]).unwrap();
        let run = |g: &Gpu, few: bool| -> Vec<f32> {
            let (mut a, mut b0, mut b1) =
                (g.zeros::<f32>(3 * rows).unwrap(), g.zeros::<f32>(3 * 200).unwrap(), g.zeros::<f32>(3 * 200).unwrap());
            let mut go = || -> Result<(), mxr_kernels::KernelError> {
                g.matvec_with(&w0, Some(&gids), &gx.as_view(), Some(&act), 3, 3, &mut a.as_view_mut())?;
                g.matvec_pair_rows([&w0, &w1], [200, 130], Some(&gids), &act, 3, 3, [&mut b0.as_view_mut(), &mut b1.slice_mut(..3 * 130)])
            };
            if few {
                g.over_pcie(go).unwrap()
            } else {
                go().unwrap()
            }
            [a, b0, b1].iter().flat_map(|v| g.download(&v.as_view()).unwrap()).collect()
        };
        let want = run(&g, false);
        for limit in [1u32, 5] {
            g.tuning.pcie_blocks = limit;
            let same = run(&g, true) == want;
            check("products on few blocks", &format!("{q} {rows} rows, {limit} blocks in all"), if same { 0.0 } else { 1.0 }, 0.0);
        }
        g.tuning.pcie_blocks = 0;
    }
}
