//! Device memory the kernels read through: KV caches that grow in pages behind a fixed
//! address, expert stacks whose experts lie some in device and some in host memory, and
//! host memory mapped for a graph's exchanges with the host worker.
//! Needs a GPU: ignored by `cargo test`; scripts/gpu-check.sh runs it with --ignored on the
//! GPU machine and tabulates the `CHECK` lines.

use mxr_kernels::cuda::{CudaSlice, Gpu, GpuMatrix, KvType};
use mxr_quant::reference::{quantize_to_vec, stats::Rng};
use mxr_quant::QType;

fn gpu() -> Gpu {
    Gpu::open(0).expect("these tests need a GPU")
}

fn quantized(q: QType, n: usize, seed: u64) -> Vec<u8> {
    quantize_to_vec(q, &Rng::new(seed).normals(n, 0.5)).unwrap()
}

/// Prints a `CHECK` line for an exact check, and fails the test if it does not hold.
fn exact(what: &str, case: &str, ok: bool) {
    println!("CHECK {what} | {case} | {} | exact | {}", if ok { "same" } else { "differs" }, if ok { "ok" } else { "FAIL" });
    assert!(ok, "{what}: {case}");
}

const TYPES: [QType; 7] = [QType::Q8_0, QType::Q4K, QType::Q6K, QType::Q4_0, QType::BF16, QType::F16, QType::F32];

/// KV caches grow in pages behind a fixed address: memory is committed as positions fill,
/// the address stays, and data written across page boundaries reads back whole.
#[test]
#[ignore = "needs a GPU"]
fn paged_buffers_grow_behind_a_fixed_address() {
    use mxr_kernels::cuda::pages::PagedBuf;
    let g = gpu();
    let mut b = PagedBuf::reserve(&g, 1 << 30).unwrap();
    let base = b.ptr();
    assert_eq!(b.committed(), 0);
    b.ensure(1).unwrap();
    let page = b.committed();
    assert!((2 << 20..1 << 30).contains(&page), "page {page}");
    // three pages' worth of data, starting mid-page
    let data: Vec<u8> = (0..3 * page).map(|i| (i * 7 % 251) as u8).collect();
    b.write(&g, page / 2, &data).unwrap();
    assert_eq!(b.ptr(), base, "the address never moves");
    assert!(b.committed() >= page / 2 + data.len());
    let mut back = vec![0u8; data.len()];
    b.read(&g, page / 2, &mut back).unwrap();
    let ok = back == data;
    println!(
        "CHECK paged buffer | 1 GiB reserved, {} MiB pages, 3 pages written | round trip | exact | {}",
        page >> 20,
        if ok { "ok" } else { "FAIL" }
    );
    assert!(ok);
    // fresh pages read as zeros; beyond the reservation is an error
    let mut z = vec![1u8; 16];
    b.read(&g, 0, &mut z).unwrap();
    assert_eq!(z, vec![0u8; 16]);
    assert!(b.ensure((1 << 30) + 1).is_err());
    // a KV cache through the launchers: append at a position in the third page
    let mut kv = g.kv_reserve(KvType::Bf16, 3 * page, 0).unwrap();
    assert_eq!(kv.len(), 0);
    let width = 64;
    let pos = (2 * page + 100) / 2 / width; // a row inside the third page of bf16
    kv.ensure((pos + 1) * width).unwrap();
    let src = g.upload(&vec![1.5f32; width]).unwrap();
    g.kv_append(&src.as_view(), &mut kv, &g.upload(&[pos as i32]).unwrap(), pos, 1, width).unwrap();
    let all = g.kv_download(&kv, (pos + 1) * width).unwrap();
    assert!(all[pos * width..].iter().all(|&v| v == 1.5) && all[..pos * width].iter().all(|&v| v == 0.0));
}

/// One product per id (the expert `ids[p]` of stack `m` times `x`), downloaded.
fn products_by_ids(g: &Gpu, m: &GpuMatrix, ids: &CudaSlice<i32>, x: &CudaSlice<f32>) -> Vec<f32> {
    let n = ids.len();
    let mut y = g.zeros::<f32>(n * m.rows).unwrap();
    g.matvec(m, Some(ids), &x.as_view(), n, n, &mut y.as_view_mut()).unwrap();
    g.download(&y.as_view()).unwrap()
}

/// Issue 7, cold experts read in place: a stack whose experts lie some in device pages and
/// some in host pages (`GpuMatrix::upload_placed`) gives the bits of an ordinary stack in
/// the products by ids (one expert and two in a launch) and in the dequantization to bf16
/// the prefill uses, for every type; only the hot experts count as device bytes.
#[test]
#[ignore = "needs a GPU"]
fn placed_stacks_read_host_experts_in_place() {
    let g = gpu();
    let (n_exp, rows, cols) = (4, 96, 512);
    let on_gpu = [true, false, false, true];
    let ids = [1i32, 3, 2, 0, 1, 1];
    for q in TYPES {
        let w = quantized(q, n_exp * rows * cols, 80);
        let plain = GpuMatrix::upload(&g, q, n_exp, rows, cols, &w).unwrap();
        let placed = GpuMatrix::upload_placed(&g, q, rows, cols, &w, &on_gpu).unwrap();
        let x = g.upload(&Rng::new(81).normals(cols, 1.0)).unwrap();
        let gids = g.upload(&ids).unwrap();
        let product = |m: &GpuMatrix| products_by_ids(&g, m, &gids, &x);
        // the two-matrix launch (gate and up) takes quantized weights only
        let pair = |a: &GpuMatrix, b: &GpuMatrix| {
            if q.block_size() == 1 {
                return (Vec::new(), Vec::new());
            }
            let act = g.quantize_act(&x.as_view(), 1, cols).unwrap();
            let (mut y0, mut y1) = (g.zeros::<f32>(ids.len() * rows).unwrap(), g.zeros::<f32>(ids.len() * rows).unwrap());
            g.matvec_pair([a, b], Some(&gids), &act, ids.len(), ids.len(), [&mut y0.as_view_mut(), &mut y1.as_view_mut()]).unwrap();
            (g.download(&y0.as_view()).unwrap(), g.download(&y1.as_view()).unwrap())
        };
        let dequant = |m: &GpuMatrix, e: usize| {
            let mut out = g.zeros::<u16>(rows * cols).unwrap();
            g.to_bf16(m, e, &mut out.as_view_mut()).unwrap();
            g.download(&out.as_view()).unwrap()
        };
        let same_products = product(&placed) == product(&plain);
        let same_pairs = pair(&placed, &plain) == pair(&plain, &plain);
        let same_bf16 = (0..n_exp).all(|e| dequant(&placed, e) == dequant(&plain, e));
        let stride = placed.stride;
        let bytes_ok = placed.bytes() == 2 * stride && placed.host_bytes() == 2 * stride && plain.host_bytes() == 0;
        // the CPU reads the host experts' pages at their address, the file's bytes (types
        // kept as in the file; the others have no CPU view)
        let cpu_ok = match placed.host_pages() {
            Some(pages) => {
                let (read, each) = (pages.read(), w.len() / n_exp);
                (0..n_exp).all(|e| match read.expert(e) {
                    Some(b) => !on_gpu[e] && b[..each] == w[e * each..(e + 1) * each],
                    None => on_gpu[e],
                }) && read.expert(n_exp).is_none()
                    && plain.host_pages().is_none()
            }
            None => !mxr_kernels::cuda::matrix::as_in_file(q),
        };
        let ok = same_products && same_pairs && same_bf16 && bytes_ok && cpu_ok;
        println!(
            "CHECK placed stack | {q} {n_exp}x{rows}x{cols}, experts 1 and 2 in host memory | products {same_products}, pairs {same_pairs}, bf16 {same_bf16}, bytes {bytes_ok}, CPU view {cpu_ok} | exact | {}",
            if ok { "ok" } else { "FAIL" }
        );
        assert!(ok, "{q}");
    }
    assert!(
        GpuMatrix::upload_placed(&g, QType::Q8_0, rows, cols, &quantized(QType::Q8_0, 3 * rows * cols, 82), &on_gpu).is_err(),
        "3 experts' bytes for 4"
    );
}

/// `--expert-rebalance` with experts read in place: moving an expert's pages between
/// device and host memory keeps its address and its bits (the products by ids give the
/// same values before and after; gpu_forward's rebalance test replays a decode graph
/// captured before a move), and moves the byte counts; out-of-range experts and ordinary
/// stacks are refused.
#[test]
#[ignore = "needs a GPU"]
fn placed_experts_move_between_device_and_host_at_the_same_address() {
    let g = gpu();
    let (n_exp, rows, cols, q) = (4, 96, 512, QType::Q4K);
    let w = quantized(q, n_exp * rows * cols, 90);
    let mut placed = GpuMatrix::upload_placed(&g, q, rows, cols, &w, &[true, false, false, true]).unwrap();
    let ids = [0i32, 1, 2, 3, 1];
    let x = g.upload(&Rng::new(91).normals(cols, 1.0)).unwrap();
    let gids = g.upload(&ids).unwrap();
    let product = |m: &GpuMatrix| products_by_ids(&g, m, &gids, &x);
    let want = product(&placed);
    let pages = placed.host_pages().expect("q4_k keeps the file's layout");
    let each = w.len() / n_exp;
    let readable = |pages: &mxr_kernels::cuda::placed::HostPages| -> Vec<bool> {
        let r = pages.read();
        (0..n_exp).map(|e| r.expert(e).is_some_and(|b| b[..each] == w[e * each..(e + 1) * each])).collect()
    };
    let cpu_before = readable(&pages);
    let (len, dev, host) = (placed.buf.len(), placed.bytes(), placed.host_bytes());
    let stride = placed.stride;
    // expert 0 to the host, expert 2 to the device: the same memory on each side
    placed.relocate_expert(0, false).unwrap();
    placed.relocate_expert(2, true).unwrap();
    placed.relocate_expert(2, true).unwrap(); // already there: nothing to do
    let flags: Vec<_> = (0..n_exp).map(|e| placed.placed_on_gpu(e)).collect();
    let after = product(&placed);
    let flags_ok = flags == [Some(false), Some(false), Some(true), Some(true)];
    let bytes_ok = (placed.buf.len(), placed.bytes(), placed.host_bytes()) == (len, dev, host) && dev == 2 * stride;
    let refused = placed.relocate_expert(4, true).is_err()
        && GpuMatrix::upload(&g, q, n_exp, rows, cols, &w).unwrap().relocate_expert(0, false).is_err();
    // the CPU's view follows the moves (a view taken before them included), and keeps the
    // pages mapped after the stack has gone
    let cpu_after = readable(&pages);
    drop(placed);
    let cpu_kept = readable(&pages);
    let cpu_ok = cpu_before == [false, true, true, false] && cpu_after == [true, true, false, false] && cpu_kept == cpu_after;
    let ok = after == want && flags_ok && bytes_ok && refused && cpu_ok;
    println!(
        "CHECK placed expert moved | {q} {n_exp}x{rows}x{cols}, 0 to the host, 2 to the device | products {}, flags {flags_ok}, bytes {bytes_ok}, refusals {refused}, CPU view {cpu_ok} | exact | {}",
        after == want,
        if ok { "ok" } else { "FAIL" }
    );
    assert!(ok);
}

/// Host work inside a captured graph (`Gpu::host_post` and `Gpu::host_wait`, the CPU's
/// experts of a decode step): each replay hands the current x and ids to the GPU's host
/// worker through mapped memory, the worker runs the work, and its flagged rows come back
/// into y; rows not flagged keep their values. A failure
/// leaves NaN in every row and is reported once, and the next replay is clean again. Outside
/// a capture the call is refused.
#[test]
#[ignore = "needs a GPU"]
fn host_calls_run_inside_a_graph() {
    let g = gpu();
    let (k, d) = (3usize, 300usize);
    // flags the odd ids' rows and writes x * id there; a negative id is an error
    let work = move |x: &[f32], ids: &[i32], out: &mut [f32]| -> Result<(), String> {
        let (flags, rows) = out.split_at_mut(ids.len());
        for (j, &e) in ids.iter().enumerate() {
            if e < 0 {
                return Err(format!("id {e}"));
            }
            flags[j] = (e % 2) as f32;
            for (o, v) in rows[j * d..(j + 1) * d].iter_mut().zip(x) {
                *o = v * e as f32;
            }
        }
        Ok(())
    };
    let call = g.host_call(d, k, k + k * d, Box::new(work), None).unwrap();
    let xs = Rng::new(11).normals(d, 1.0);
    let x = g.upload(&xs).unwrap();
    let mut ids = g.upload(&[1i32, 2, 5]).unwrap();
    let mut y = g.upload(&vec![-1f32; k * d]).unwrap();
    // add_flagged_rows adds the flagged rows instead (checked after the first replay)
    let mut z = g.upload(&vec![0.25f32; k * d]).unwrap();
    let mut from = g.zeros::<f32>(k + k * d).unwrap();
    let refused = g.host_post(&call, &x.as_view(), &ids.as_view()).is_err() && g.host_wait(&call, &mut from.as_view_mut()).is_err();
    exact("host call", "refused outside a capture", refused);
    let graph = g
        .capture(|| {
            g.host_post(&call, &x.as_view(), &ids.as_view())?;
            g.host_wait(&call, &mut from.as_view_mut())?;
            g.take_flagged_rows(&from.as_view(), k, d, &mut y.as_view_mut())?;
            g.add_flagged_rows(&from.as_view(), k, d, &mut z.as_view_mut())
        })
        .unwrap();
    let mut want = vec![-1f32; k * d];
    for (case, id) in [("ids 1 2 5", [1i32, 2, 5]), ("ids 4 3 0", [4, 3, 0]), ("a failing replay", [2, -1, 3]), ("after it", [7, 8, 9])] {
        g.write(&id, &mut ids.as_view_mut()).unwrap();
        graph.launch().unwrap();
        let got = g.download(&y.as_view()).unwrap();
        let err = graph.host_error();
        let ok = if id.iter().any(|&e| e < 0) {
            // every flag NaN (not 0): every row taken, all NaN
            got.iter().all(|v| v.is_nan()) && err.as_deref().is_some_and(|e| e.contains("id -1")) && graph.host_error().is_none()
        } else {
            for (j, &e) in id.iter().enumerate() {
                if e % 2 == 1 {
                    for (w, v) in want[j * d..(j + 1) * d].iter_mut().zip(&xs) {
                        *w = v * e as f32;
                    }
                }
            }
            // the failed replay left NaN: the rows this one does not flag keep them
            let kept = |j: usize| case == "after it" && id[j] % 2 == 0;
            err.is_none()
                && (0..k).all(|j| {
                    if kept(j) {
                        got[j * d..(j + 1) * d].iter().all(|v| v.is_nan())
                    } else {
                        got[j * d..(j + 1) * d] == want[j * d..(j + 1) * d]
                    }
                })
        };
        if id.iter().any(|&e| e < 0) {
            want.fill(f32::NAN);
        }
        exact("host call", case, ok);
        if case == "ids 1 2 5" {
            let got = g.download(&z.as_view()).unwrap();
            let added = (0..k).all(|j| (0..d).all(|c| got[j * d + c] == if id[j] % 2 == 1 { 0.25 + xs[c] * id[j] as f32 } else { 0.25 }));
            exact("host call", "flagged rows added", added);
        }
    }
}
