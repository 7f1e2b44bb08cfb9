//! `mxr bench --kernels`: the decode kernels alone on the real model's shapes, to see how
//! close each comes to the card's copy bandwidth (no model file needed).

use std::time::Instant;

use anyhow::Result;
use mxr_kernels::cuda::{Gpu, GpuMatrix, KvType};
use mxr_quant::reference::quantize_to_vec;
use mxr_quant::reference::stats::Rng;
use mxr_quant::QType;

/// A matrix of `rows` copies of one random quantized row (the contents do not change
/// the timing).
fn matrix(g: &Gpu, q: QType, n_experts: usize, rows: usize, cols: usize) -> Result<GpuMatrix> {
    let row =
        quantize_to_vec(q, &Rng::new(1).normals(cols, 0.5)).ok_or_else(|| anyhow::anyhow!("cannot quantize a row of {cols} to {q}"))?;
    let data: Vec<u8> = row.iter().copied().cycle().take(row.len() * rows * n_experts).collect();
    Ok(GpuMatrix::upload(g, q, n_experts, rows, cols, &data)?)
}

/// Seconds per call of `f`: the median of 5 batches of `iters` calls, after a warm-up.
fn time(g: &Gpu, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    g.sync()?;
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        g.sync()?;
        v.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[2])
}

/// `only`: one group of kernels (matvec, lightning, attention, host; the CLI checks the
/// name), or all.
pub fn run(g: &Gpu, only: Option<&str>) -> Result<()> {
    let want = |group: &str| only.is_none_or(|o| o == group);
    let bw = g.copy_bandwidth(1 << 30, 5)?;
    println!(
        "{}; copy bandwidth {:.0} GB/s; matvec {} rows/warp, {} warps/block (q8_0: {} x {}), unroll {}",
        g.info(),
        bw / 1e9,
        g.tuning.matvec_rows,
        g.tuning.matvec_warps,
        g.tuning.matvec_q8_rows,
        g.tuning.matvec_q8_warps,
        g.tuning.matvec_unroll
    );
    println!("| kernel | type | shape | us | GB/s | % BW |");
    println!("| --- | --- | --- | ---: | ---: | ---: |");
    let row = |k: &str, q: &str, shape: &str, s: f64, bytes: f64| {
        println!("| {k} | {q} | {shape} | {:.1} | {:.0} | {:.0}% |", s * 1e6, bytes / s / 1e9, 100.0 * bytes / s / bw);
    };
    let types: &[QType] = if want("matvec") { &[QType::Q8_0, QType::Q4K, QType::Q6K, QType::Q4_0, QType::BF16] } else { &[] };
    for &q in types {
        let (rows, cols) = (24576, 6144);
        let w = matrix(g, q, 1, rows, cols)?;
        let x = g.upload(&Rng::new(2).normals(cols, 1.0))?;
        let mut y = g.zeros::<f32>(rows)?;
        let s = time(g, 50, || Ok(g.matvec(&w, None, &x.as_view(), 1, 1, &mut y.as_view_mut())?))?;
        row("matvec", &q.to_string(), "24576x6144", s, w.expert_bytes() as f64);
        // two experts of eight, gate-shaped then down-shaped
        let (h, d) = (9216, 6144);
        let gate = matrix(g, q, 8, h, d)?;
        let down = matrix(g, q, 8, d, h)?;
        let ids = g.upload(&[3i32, 6])?;
        let xd = g.upload(&Rng::new(3).normals(2 * h, 1.0))?;
        let mut yg = g.zeros::<f32>(2 * h)?;
        let s = time(g, 50, || Ok(g.matvec(&gate, Some(&ids), &x.as_view(), 2, 2, &mut yg.as_view_mut())?))?;
        row("matvec 2 experts", &q.to_string(), "2 x 9216x6144", s, 2.0 * gate.expert_bytes() as f64);
        let mut yd = g.zeros::<f32>(2 * d)?;
        let s = time(g, 50, || Ok(g.matvec(&down, Some(&ids), &xd.as_view(), 1, 2, &mut yd.as_view_mut())?))?;
        row("matvec 2 experts", &q.to_string(), "2 x 6144x9216", s, 2.0 * down.expert_bytes() as f64);
    }
    if want("matvec") {
        // the real model's lm_head, in the precision the converter keeps it (2.46 GB)
        let (rows, cols) = (200064, 6144);
        let w = matrix(g, QType::BF16, 1, rows, cols)?;
        let x = g.upload(&Rng::new(2).normals(cols, 1.0))?;
        let mut y = g.zeros::<f32>(rows)?;
        let s = time(g, 10, || Ok(g.matvec(&w, None, &x.as_view(), 1, 1, &mut y.as_view_mut())?))?;
        row("matvec lm_head", "BF16", "200064x6144", s, w.expert_bytes() as f64);
    }
    let (heads, hd) = (64, 128);
    if want("lightning") {
        lightning(g, &row, heads, hd)?;
    }
    if want("attention") {
        attention(g, &row, heads, hd)?;
    }
    if want("host") {
        host_exchange(g, &row)?;
    }
    Ok(())
}

/// A decode graph's exchange with the host worker (host_call.rs) on the real model's row
/// (6,144 values, 2 choices), the worker answering at once with no rows: graph replays of
/// host_post alone, and of host_post then host_wait with nothing between (the round trip
/// a layer with host experts pays beyond its GPU work). Bytes: the posted row and the
/// answer read back.
fn host_exchange(g: &Gpu, row: &dyn Fn(&str, &str, &str, f64, f64)) -> Result<()> {
    let (d, k) = (6144, 2);
    let work = move |_: &[f32], ids: &[i32], out: &mut [f32]| -> std::result::Result<(), String> {
        out[..ids.len()].fill(0.0);
        Ok(())
    };
    let call = g.host_call(d, k, k + k * d, Box::new(work), None)?;
    let x = g.upload(&Rng::new(4).normals(d, 1.0))?;
    let ids = g.upload(&[1i32, 2])?;
    let mut answer = g.zeros::<f32>(k + k * d)?;
    let post = g.capture(|| g.host_post(&call, &x.as_view(), &ids.as_view()))?;
    let both = g.capture(|| {
        g.host_post(&call, &x.as_view(), &ids.as_view())?;
        g.host_wait(&call, &mut answer.as_view_mut())
    })?;
    let shape = format!("{d} values, {k} choices");
    for (name, graph, bytes) in [("host_post (graph)", &post, d * 4), ("host_post + host_wait (graph)", &both, (d + k + k * d) * 4)] {
        let s = time(g, 200, || Ok(graph.launch()?))?;
        if let Some(e) = graph.host_error() {
            anyhow::bail!("{name}: {e}");
        }
        row(name, "f32", &shape, s, bytes as f64);
    }
    Ok(())
}

fn lightning(g: &Gpu, row: &dyn Fn(&str, &str, &str, f64, f64), heads: usize, hd: usize) -> Result<()> {
    let qkv = g.upload(&Rng::new(4).normals(heads * 3 * hd, 0.3))?;
    let decay = g.upload(&vec![0.99f32; heads])?;
    let mut state = g.zeros::<f32>(heads * hd * hd)?;
    let mut o = g.zeros::<f32>(heads * hd)?;
    let s = time(g, 50, || Ok(g.lightning(&qkv.as_view(), &mut state, &decay, &mut o.as_view_mut(), (1, heads, hd), true)?))?;
    row("lightning decode", "f32 state", "64 x 128x128", s, (2 * heads * hd * hd * 4) as f64);
    // prefill shape: 4096 tokens through one lightning layer
    let n = 4096;
    let qkv = g.upload(&Rng::new(6).normals(n * heads * 3 * hd, 0.3))?;
    let mut o = g.zeros::<f32>(n * heads * hd)?;
    let s = time(g, 3, || Ok(g.lightning(&qkv.as_view(), &mut state, &decay, &mut o.as_view_mut(), (n, heads, hd), true)?))?;
    row("lightning prefill", "f32 recurrence", "4096 tokens", s, (n * heads * 3 * hd * 4 + n * heads * hd * 4) as f64);
    let s = time(g, 3, || Ok(g.lightning_chunked(&qkv.as_view(), &mut state, &decay, &mut o.as_view_mut(), (n, heads, hd), true)?))?;
    row("lightning prefill", "bf16 chunks", "4096 tokens", s, (n * heads * 3 * hd * 4 + n * heads * hd * 4) as f64);
    Ok(())
}

fn attention(g: &Gpu, row: &dyn Fn(&str, &str, &str, f64, f64), heads: usize, hd: usize) -> Result<()> {
    // softmax attention over f32, bf16 and q8_0 caches (causal: n^2 / 2 query-key pairs,
    // 4 * hd FLOPs each per head)
    let n = 4096;
    let mut o = g.zeros::<f32>(n * heads * hd)?;
    let kv_dim = 8 * hd;
    let (k32, v32) = (Rng::new(7).normals(n * kv_dim, 1.0), Rng::new(8).normals(n * kv_dim, 1.0));
    let q = g.upload(&Rng::new(9).normals(n * heads * hd, 1.0))?;
    let pos = g.upload(&[0i32])?;
    for t in [KvType::F32, KvType::Bf16, KvType::Q8_0] {
        let (mut kc, mut vc) = (g.kv_zeros(t, n * kv_dim)?, g.kv_zeros(t, n * kv_dim)?);
        g.kv_write(&k32, &mut kc)?;
        g.kv_write(&v32, &mut vc)?;
        let s = time(g, 3, || Ok(g.attend(&q.as_view(), &kc, &vc, &mut o.as_view_mut(), n, heads, 8, hd, &pos, 0, None)?))?;
        let tflops = (n * n / 2 * heads * 4 * hd) as f64 / s / 1e12;
        let bytes = (2 * n * kv_dim) as f64 * t.bytes();
        row("attention prefill", &format!("{} KV", t.name()), &format!("4096 tokens, {tflops:.0} TFLOP/s"), s, bytes);
        // the warpgroup kernel where the GPU has one (sm_90)
        if t == KvType::Bf16 && g.sources().contains(&mxr_kernels::cuda::Source::FlashWgmma) {
            for v in mxr_kernels::cuda::WgmmaKernel::ALL {
                let s = time(g, 3, || {
                    Ok(g.attend_wgmma(&q.as_view(), &kc, &vc, &mut o.as_view_mut(), (n, heads, 8, hd), (&pos, 0), None, v)?)
                })?;
                let tflops = (n * n / 2 * heads * 4 * hd) as f64 / s / 1e12;
                let what = format!("bf16 KV, wgmma {}", v.label());
                row("attention prefill", &what, &format!("4096 tokens, {tflops:.0} TFLOP/s"), s, bytes);
            }
        }
    }
    // a long prompt's chunk: 8,192 queries after 57,344 cached positions (every query sees
    // 57,345 to 65,536 keys), as a million-token prefill runs it chunk by chunk
    // and the last chunk of a million-token prompt, for the producer kernels (the others
    // take seconds there)
    if g.sources().contains(&mxr_kernels::cuda::Source::FlashWgmma) {
        for depth in [65536usize, 1 << 20] {
            let chunk = 8192usize;
            let (kc, vc) = (g.kv_zeros(KvType::Bf16, depth * kv_dim)?, g.kv_zeros(KvType::Bf16, depth * kv_dim)?);
            let q = g.upload(&Rng::new(10).normals(chunk * heads * hd, 1.0))?;
            let mut o = g.zeros::<f32>(chunk * heads * hd)?;
            let pos0 = depth - chunk;
            let pos = g.upload(&[pos0 as i32])?;
            let pairs = chunk * pos0 + chunk * (chunk + 1) / 2;
            for v in mxr_kernels::cuda::WgmmaKernel::ALL.into_iter().filter(|v| depth <= 65536 || (v.producer && !v.pingpong)) {
                let s = time(g, 1, || {
                    Ok(g.attend_wgmma(&q.as_view(), &kc, &vc, &mut o.as_view_mut(), (chunk, heads, 8, hd), (&pos, pos0), None, v)?)
                })?;
                let tflops = (pairs * heads * 4 * hd) as f64 / s / 1e12;
                let what = format!("bf16 KV, wgmma {}", v.label());
                row("attention prefill", &what, &format!("8192 at depth {depth}, {tflops:.0} TFLOP/s"), s, (2 * depth * kv_dim * 2) as f64);
            }
        }
    }
    for t in [KvType::F32, KvType::Bf16, KvType::Q8_0] {
        for depth in [4096usize, 65536, 1 << 20] {
            let (kc, vc) = (g.kv_zeros(t, depth * kv_dim)?, g.kv_zeros(t, depth * kv_dim)?);
            let q = g.upload(&Rng::new(5).normals(heads * hd, 1.0))?;
            let pos = g.upload(&[(depth - 1) as i32])?;
            let mut out = g.zeros::<f32>(heads * hd)?;
            // the tensor-core kernels (bf16, q8_0) with 2 and 3 tile buffers per block
            let variants: &[usize] = if t == KvType::F32 { &[2] } else { &[2, 3] };
            for &stages in variants {
                let splits = g.decode_splits_staged(depth, 8, stages);
                let s = time(g, 20, || {
                    let shape = (heads, 8, hd);
                    Ok(g.attend_decode_staged(
                        &q.as_view(),
                        &kc,
                        &vc,
                        &mut out.as_view_mut(),
                        shape,
                        (&pos, depth - 1),
                        splits,
                        stages,
                        None,
                    )?)
                })?;
                let what = if t == KvType::F32 { "f32 KV".to_string() } else { format!("{} KV, {stages} stages", t.name()) };
                row("attention decode", &what, &format!("depth {depth}"), s, (2 * depth * kv_dim) as f64 * t.bytes());
            }
        }
    }
    Ok(())
}
