//! `mxr bench --timeline`: where a decode step's time goes, kernel by kernel, inside its
//! CUDA graph (mxr_kernels::cuda::timeline). Each kernel is charged from the moment its
//! first block may run (its wait for the kernel ahead returned) to the same moment of the
//! next kernel, so the rows add up to the step's span on the GPU.

use anyhow::{bail, Result};
use mxr_kernels::cuda::{by_kernel, Gpu, KernelTime, Stamp};
use mxr_models::engine::Backend;
use mxr_models::forward::Logits;

use crate::run_cmd::Loaded;

/// Per kernel name: calls and nanoseconds over all replays.
pub struct Report {
    replays: usize,
    rows: Vec<KernelTime>,
    span_ns: f64,
    early: f64,
    kernels: f64,
}

/// The GPU whose decode graph --timeline can time, or why there is none.
pub fn gpu(l: &Loaded) -> Result<&Gpu> {
    match &l.backend {
        // with experts on the CPU a decoded token is one graph too, unless MXR_OFFLOAD_GRAPH=0
        Backend::Cuda(g) if !g.offloaded || g.offload_graph => Ok(&g.gpu),
        Backend::Cuda(_) => bail!("--timeline times the captured decode graph, and MXR_OFFLOAD_GRAPH=0 decodes without one"),
        _ => bail!("--timeline needs the model on one GPU (--device cuda)"),
    }
}

/// Decodes one token from an empty context (capturing the step's graph), then the rest of
/// `ids` one replay each, and sums their kernels.
pub fn measure(l: &Loaded, ids: &[u32]) -> Result<Report> {
    let g = gpu(l)?;
    if ids.len() < 2 {
        bail!("--timeline needs at least 2 tokens to decode (-n)");
    }
    let mut st = l.new_state()?;
    l.forward_with(&mut st, &ids[..1], Logits::Last, |_| ())?;
    let mut replays = Vec::new();
    for &id in &ids[1..] {
        g.timeline_reset()?;
        l.forward_with(&mut st, &[id], Logits::Last, |_| ())?;
        replays.push(g.timeline_read()?);
    }
    let n = replays.len() as f64;
    let is_mark = |s: &Stamp| s.name.as_deref().is_some_and(|m| m.starts_with("timeline_mark "));
    let mut rows = by_kernel(&replays)?;
    // the marks only stamp: the one after the last product (GpuModel::decode_body) is
    // charged the logits' copy to the host, up to the closing one (Gpu::capture), which
    // has no time of its own
    for r in rows.iter_mut().filter(|r| r.name.starts_with("timeline_mark ")) {
        r.name = "(logits copy to the host)".into();
        r.calls = replays.len();
    }
    rows.retain(|r| r.ns > 0 || !r.name.starts_with('('));
    Ok(Report {
        replays: replays.len(),
        rows,
        span_ns: replays.iter().map(|r| span_ns(r)).sum::<u64>() as f64 / n,
        early: replays.iter().map(|r| r.iter().filter(|s| !is_mark(s) && s.start + 1000 < s.release).count()).sum::<usize>() as f64 / n,
        kernels: replays.iter().map(|r| r.iter().filter(|s| !is_mark(s)).count()).sum::<usize>() as f64 / n,
    })
}

impl Report {
    pub fn print(&self, json: bool) {
        let n = self.replays as f64;
        if json {
            let rows: Vec<_> = self
                .rows
                .iter()
                .map(|r| {
                    serde_json::json!({"kernel": r.name, "calls_per_step": r.calls as f64 / n, "us_per_step": r.ns as f64 / n / 1e3,
                        "us_resident_before_release": r.early_ns as f64 / r.calls as f64 / 1e3})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"timeline": {"replays": self.replays, "span_us": self.span_ns / 1e3, "kernels_per_step": self.kernels, "kernels": rows}})
            );
            return;
        }
        println!(
            "timeline of a decode step (mean of {} replays): {:.1} us from the first kernel's release to the last's, {:.0} kernels, {:.0} of them resident over 1 us before the kernel ahead finished",
            self.replays,
            self.span_ns / 1e3,
            self.kernels,
            self.early
        );
        println!("| kernel | calls/step | us/step | us each | % of span | us resident before release |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for r in &self.rows {
            let per_step = r.ns as f64 / n;
            println!(
                "| {} | {:.0} | {:.1} | {:.2} | {:.1}% | {:.2} |",
                r.name,
                r.calls as f64 / n,
                per_step / 1e3,
                r.ns as f64 / r.calls as f64 / 1e3,
                100.0 * per_step / self.span_ns.max(1.0),
                r.early_ns as f64 / r.calls as f64 / 1e3
            );
        }
    }
}

/// From the first kernel's release to the last's.
fn span_ns(r: &[Stamp]) -> u64 {
    match (r.first(), r.last()) {
        (Some(a), Some(b)) => b.release.saturating_sub(a.release),
        _ => 0,
    }
}
