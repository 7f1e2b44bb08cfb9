//! `mxr bench --calibrate-devices`: the rates the cold-expert cost model uses (issue 7,
//! docs/offload.md), measured on this machine and saved for later runs: host memory read
//! bandwidth, the CPU expert kernels' streaming rate (one token) and arithmetic rate (a
//! batch), the host-to-GPU copy rate from pageable and pinned memory, and the rate the
//! GPU's decode products read an expert left in host pages (in place, over PCIe).

use std::time::Instant;

use anyhow::{Context, Result};
use mxr_kernels::cpu::{swiglu_ffn, Threads};
use mxr_kernels::cuda::{CudaSlice, Gpu, GpuMatrix};
use mxr_models::offload_cost::DeviceRates;
use mxr_quant::reference::quantize_to_vec;
use mxr_quant::reference::stats::Rng;
use mxr_quant::{QMatrix, QType};

/// Bytes/s that `threads` threads read from a buffer far larger than the caches.
fn host_read_bandwidth(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> =
                buf.chunks(words.div_ceil(threads)).map(|c| s.spawn(move || c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(sums);
    }
    (words * 8) as f64 / best
}

/// Median seconds of `reps` runs of `f(i)` (i = 0..reps) after one warm-up (`f(reps)`).
fn median(reps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    f(reps)?;
    let mut v = Vec::new();
    for i in 0..reps {
        let t = Instant::now();
        f(i)?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// One expert whose pages are all in page-locked host memory mapped for the device, and
/// the decode products that read it in place (gate and up in one launch, then down, one
/// token, as a decode step runs an expert).
struct InPlaceExpert<'g> {
    g: &'g Gpu,
    w: [GpuMatrix; 3],
    x: CudaSlice<f32>,
    y: [CudaSlice<f32>; 3],
}

impl<'g> InPlaceExpert<'g> {
    fn new(g: &'g Gpu, [gate, up, down]: [&QMatrix; 3]) -> Result<InPlaceExpert<'g>> {
        let place = |m: &QMatrix| GpuMatrix::upload_placed(g, m.qtype, m.rows, m.cols, m.data, &[false]);
        Ok(InPlaceExpert {
            g,
            w: [place(gate)?, place(up)?, place(down)?],
            x: g.upload(&Rng::new(5).normals(gate.cols, 1.0))?,
            y: [g.zeros::<f32>(gate.rows)?, g.zeros::<f32>(up.rows)?, g.zeros::<f32>(down.rows)?],
        })
    }

    /// One read of the whole expert, waited for.
    fn read(&mut self) -> Result<()> {
        let (g, [wg, wu, wd], [y0, y1, out]) = (self.g, &self.w, &mut self.y);
        let act = g.quantize_act(&self.x.as_view(), 1, wg.cols)?;
        g.matvec_pair([wg, wu], None, &act, 1, 1, [&mut y0.as_view_mut(), &mut y1.as_view_mut()])?;
        g.matvec(wd, None, &y0.as_view(), 1, 1, &mut out.as_view_mut())?;
        Ok(g.sync()?)
    }
}

/// Seconds per call of `cpu` and of `gpu` when both run at once: `cpu` `reps` times on
/// another thread (the CPU's products, with their own thread pool) while this thread calls
/// `gpu` (an in-place read of the expert) until that is done; to show how much they slow
/// each other (`--cold-experts mixed`).
fn side_by_side(mut gpu: impl FnMut() -> Result<()>, cpu: impl FnMut() -> Result<()> + Send, reps: usize) -> Result<(f64, f64)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    let mut cpu = cpu;
    let done = &done;
    std::thread::scope(|s| -> Result<(f64, f64)> {
        let worker = s.spawn(move || -> Result<f64> {
            let t = Instant::now();
            let r = (0..reps).try_for_each(|_| cpu());
            done.store(true, Ordering::Relaxed);
            r.map(|_| t.elapsed().as_secs_f64() / reps as f64)
        });
        let (t, mut n) = (Instant::now(), 0usize);
        let mut read = Ok(());
        while !done.load(Ordering::Relaxed) && read.is_ok() {
            read = gpu();
            n += 1;
        }
        let gpu_s = t.elapsed().as_secs_f64() / n.max(1) as f64;
        let cpu_s = worker.join().map_err(|_| anyhow::anyhow!("the CPU side's thread stopped"))??;
        read?;
        Ok((cpu_s, gpu_s))
    })
}

pub fn run(threads: Threads) -> Result<()> {
    let mut r = DeviceRates::DEFAULT;
    println!("| measure | value | how |");
    println!("| --- | ---: | --- |");
    r.host_read_gbps = host_read_bandwidth(threads.0) / 1e9;
    println!("| host memory read | {:.1} GB/s | {} threads summing 1 GiB |", r.host_read_gbps, threads.0);
    // real experts (gate and up 9216 x 6144, down 6144 x 9216) at q4_k, the offload slices'
    // type, through the kernels the runner uses for a cold expert. Each timed call takes the
    // next of enough distinct copies to fill 1 GiB: one expert (95 MB) fits in a large
    // last-level cache (the H200 host's holds 300 MiB) and would be timed from there, not
    // from memory, as a cold expert is read.
    let (h, d) = (9216, 6144);
    let matrix = |rows: usize, cols: usize, seed: u64| -> Result<Vec<u8>> {
        let row = quantize_to_vec(QType::Q4K, &Rng::new(seed).normals(cols, 0.5)).context("quantizing a q4_k row")?;
        Ok(row.iter().copied().cycle().take(row.len() * rows).collect())
    };
    let first = [matrix(h, d, 1)?, matrix(h, d, 3)?, matrix(d, h, 4)?];
    let bytes = first.iter().map(Vec::len).sum::<usize>();
    let n_experts = (1usize << 30).div_ceil(bytes).max(2);
    let experts: Vec<[Vec<u8>; 3]> = std::iter::repeat_n(first, n_experts).collect();
    let mats = |i: usize| -> [QMatrix<'_>; 3] {
        let [g, u, w] = &experts[i % n_experts];
        [
            QMatrix { qtype: QType::Q4K, rows: h, cols: d, data: g },
            QMatrix { qtype: QType::Q4K, rows: h, cols: d, data: u },
            QMatrix { qtype: QType::Q4K, rows: d, cols: h, data: w },
        ]
    };
    let swiglu = |i: usize, x: &[f32], n: usize, y: &mut [f32]| -> Result<()> {
        let [gate, up, down] = mats(i);
        Ok(swiglu_ffn(&gate, &up, &down, 0..h, x, n, y, threads)?)
    };
    let (bytes, gb) = (bytes as f64, (n_experts * bytes) as f64 / (1u64 << 30) as f64);
    let x = Rng::new(2).normals(64 * d, 1.0);
    let mut y = vec![0f32; 64 * d];
    let t1 = median(2 * n_experts, |i| swiglu(i, &x[..d], 1, &mut y[..d]))?;
    r.cpu_expert_gbps = bytes / t1 / 1e9;
    println!(
        "| CPU expert, 1 token | {:.1} GB/s of weights ({:.2} ms) | ggml q4_k x q8_k, gate, up and down {h}x{d}; {n_experts} copies ({gb:.2} GiB) in turn |",
        r.cpu_expert_gbps,
        t1 * 1e3
    );
    // arithmetic: one expert, so its weights stay in cache while 64 tokens pass
    let t64 = median(5, |_| swiglu(0, &x, 64, &mut y))?;
    r.cpu_gflops = 2.0 * 3.0 * (h * d * 64) as f64 / t64 / 1e9;
    println!("| CPU expert, 64 tokens | {:.0} GFLOP/s ({:.2} ms) | one expert |", r.cpu_gflops, t64 * 1e3);
    match Gpu::open(0) {
        Ok(g) => {
            r.h2d_gbps = g.upload_bandwidth(256 << 20, false, 5)? / 1e9;
            r.h2d_pinned_gbps = g.upload_bandwidth(256 << 20, true, 5)? / 1e9;
            println!("| host to GPU, pageable | {:.1} GB/s | 256 MiB, {} |", r.h2d_gbps, g.info().name);
            println!("| host to GPU, pinned | {:.1} GB/s | 256 MiB |", r.h2d_pinned_gbps);
            match (0..n_experts).map(|i| InPlaceExpert::new(&g, mats(i).each_ref())).collect::<Result<Vec<_>>>() {
                Ok(mut placed) => {
                    let t = median(2 * n_experts, |i| placed[i % n_experts].read())?;
                    r.in_place_gbps = bytes / t / 1e9;
                    println!(
                        "| GPU expert read in place, 1 token | {:.1} GB/s of weights ({:.2} ms) | the same experts in host pages mapped for the GPU |",
                        r.in_place_gbps,
                        t * 1e3
                    );
                    // how much the two slow each other (saved: mixed's rates), each side on
                    // its own experts (the CPU from the first, the GPU from the middle)
                    let mut y1 = vec![0f32; d];
                    let mut cpu_i = 0;
                    let cpu = || {
                        cpu_i += 1;
                        swiglu(cpu_i, &x[..d], 1, &mut y1)
                    };
                    let mut gpu_i = n_experts / 2;
                    let gpu = || {
                        gpu_i += 1;
                        placed[gpu_i % n_experts].read()
                    };
                    match side_by_side(gpu, cpu, 2 * n_experts) {
                        Ok((c, gs)) => {
                            r.mixed_gbps = Some((bytes / c / 1e9, bytes / gs / 1e9));
                            println!(
                                "| both at once (--cold-experts mixed) | CPU {:.1} + GPU in place {:.1} = {:.1} GB/s | the CPU's products and the in-place reads side by side (alone: {:.1} and {:.1}) |",
                                bytes / c / 1e9,
                                bytes / gs / 1e9,
                                bytes / c / 1e9 + bytes / gs / 1e9,
                                r.cpu_expert_gbps,
                                r.in_place_gbps
                            )
                        }
                        Err(e) => println!("| both at once (--cold-experts mixed) | not measured | {e:#} |"),
                    }
                }
                Err(e) => {
                    // 0: never read in place (the driver cannot map host pages for the GPU)
                    r.in_place_gbps = 0.0;
                    println!("| GPU expert read in place | not available | {e:#} |");
                }
            }
        }
        Err(e) => println!(
            "| host to GPU | (defaults {:.0} / {:.0} / {:.0} GB/s in place) | no GPU: {e} |",
            r.h2d_gbps, r.h2d_pinned_gbps, r.in_place_gbps
        ),
    }
    // what the model decides for one q4_k expert
    let bytes = bytes as u64;
    let flops = 3.0 * 2.0 * (h * d) as f64;
    println!();
    // copies from the mapped file as it is (pageable), and from page-locked memory (what a
    // run uses when the driver lets it lock the cold experts' pages)
    for (how, rates) in [("pageable", r), ("page-locked", r.pinned())] {
        match rates.copy_threshold(bytes, flops) {
            Some(1) => println!("cost model ({how} copies): a cold q4_k expert is always copied to the GPU (faster than the CPU even for one token)"),
            Some(n) => println!(
                "cost model ({how} copies): a cold q4_k expert runs on the CPU below {n} tokens per batch, and is copied to the GPU from {n}"
            ),
            None => println!("cost model ({how} copies): a cold q4_k expert always runs on the CPU"),
        }
    }
    let exit_ms = mxr_models::offload_cost::HOST_EXCHANGE_S * 1e3;
    let (mixed_cpu, mixed_in_place) = r.mixed_rates();
    let above = r.decode_mixed_above();
    let decode = if above <= 0.0 {
        "the CPU computes cold experts (the GPU cannot read host pages in place)".to_string()
    } else if above.is_infinite() {
        format!(
            "cold experts are read in place by the GPU ({:.1} GB/s): sharing them with the CPU never saves what its exchange with the host costs ({exit_ms:.2} ms a layer)",
            r.in_place_gbps
        )
    } else {
        format!(
            "cold experts are read in place by the GPU up to {:.1} MB a token per layer with experts in host memory, shared with the CPU above that (--cold-experts mixed: in place {:.1} GB/s alone, {mixed_in_place:.1} + the CPU's {mixed_cpu:.1} side by side; {exit_ms:.2} ms a layer for the exchange with the host)",
            above / 1e6,
            r.in_place_gbps
        )
    };
    println!("cost model (decode, --cold-experts auto): {decode}");
    let path = DeviceRates::cache_path().context("no cache directory (set MXR_CACHE_DIR or HOME)")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&r.to_json())?)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("saved to {} (mxr run/chat/bench read it)", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_by_side_times_each_side_per_call_while_the_other_runs() {
        let sleep = |ms| {
            move || -> Result<()> {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
        };
        // the CPU side: 3 calls of 20 ms; the GPU side runs until then, 1 ms a call
        let (cpu, gpu) = side_by_side(sleep(1), sleep(20), 3).unwrap();
        assert!(cpu >= 0.020 && gpu >= 0.001 && gpu < cpu, "{cpu} {gpu}");
        // an error on either side is the answer
        let mut n = 0;
        let failing = || -> Result<()> {
            n += 1;
            anyhow::ensure!(n < 3, "third read failed");
            std::thread::sleep(std::time::Duration::from_millis(1));
            Ok(())
        };
        assert!(side_by_side(failing, sleep(20), 3).unwrap_err().to_string().contains("third read"));
        let cpu_fails = || -> Result<()> { anyhow::bail!("no CPU") };
        assert!(side_by_side(sleep(1), cpu_fails, 3).unwrap_err().to_string().contains("no CPU"));
    }
}
