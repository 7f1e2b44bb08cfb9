//! Where a model runs: the CPU, one GPU or a layer split over several (`--device`,
//! `--gpus`), and on a GPU which experts it holds (`--gpu-mem`, `--expert-stats`,
//! `--cpu-moe`, `--n-cpu-moe`) and how the cold ones run (`--cold-experts`; issue 7,
//! docs/offload.md).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::Gpu;
use mxr_models::engine::Backend;
use mxr_models::gpu::split::SplitModel;
use mxr_models::gpu::{ColdExperts, GpuModel};
use mxr_models::layer_split::{split, LayerBytes};
use mxr_models::offload_cost::{DecodeWay, DeviceRates};
use mxr_models::placement::{layer_state, plan_paged, ExpertStats, Placement, Policy, Sizes, IN_PLACE_PAGE};
use mxr_models::Model;

use crate::run_cmd::{ColdArg, Device, KvArg, ModelArgs};

/// GPU memory kept free for activations, scratch and cuBLAS workspaces.
const GPU_MARGIN: u64 = 2 << 30;

/// --gpus as written: at least one GPU, none twice (checked before looking for GPUs).
fn check_gpu_list(a: &ModelArgs) -> Result<()> {
    if let Some(list) = &a.gpus {
        if list.is_empty() {
            bail!("--gpus: name at least one GPU (e.g. 0,1)");
        }
        let mut seen = list.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != list.len() {
            bail!("--gpus {}: a GPU is named twice", list.iter().map(usize::to_string).collect::<Vec<_>>().join(","));
        }
    }
    Ok(())
}

/// The GPUs to use: --gpus, or every visible one.
fn gpu_list(a: &ModelArgs) -> Result<Vec<usize>> {
    match &a.gpus {
        Some(list) => {
            let n = Gpu::count()?;
            if let Some(bad) = list.iter().find(|&&g| g >= n) {
                bail!("--gpus: GPU {bad} asked for, but there are {n} (0 to {})", n.saturating_sub(1));
            }
            Ok(list.clone())
        }
        None => Ok((0..Gpu::count()?).collect()),
    }
}

/// The GPU memory to plan with: --gpu-mem, or the card's free memory.
fn gpu_budget(a: &ModelArgs, gpu: &Gpu) -> Result<u64> {
    match a.gpu_mem {
        Some(gib) if gib > 0.0 && gib.is_finite() => Ok((gib * (1u64 << 30) as f64) as u64),
        Some(gib) => bail!("--gpu-mem {gib}: give a positive number of GiB"),
        None => Ok(gpu.memory()?.0 as u64),
    }
}

/// --cpu-moe, --n-cpu-moe N, or else the experts that fit `budget`.
fn expert_policy(a: &ModelArgs, budget: impl FnOnce() -> Result<u64>) -> Result<Policy> {
    Ok(if a.cpu_moe {
        Policy::CpuMoe
    } else if let Some(n) = a.n_cpu_moe {
        Policy::NCpuMoe(n)
    } else {
        Policy::Budget(budget()?)
    })
}

/// Routing statistics from --expert-stats, if given.
fn expert_stats(a: &ModelArgs, c: &mxr_models::Config) -> Result<Option<ExpertStats>> {
    match &a.expert_stats {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let j: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?;
            Ok(Some(ExpertStats::from_json(&j, c).with_context(|| p.display().to_string())?))
        }
        None => Ok(None),
    }
}

/// The model's layers split over several GPUs (issue 10): cut by bytes in proportion to
/// each GPU's budget (--gpu-mem each, or its free memory), each GPU placing its own
/// layers' experts; the plan printed per GPU.
fn split_backend(a: &ModelArgs, model: &Model, ordinals: &[usize], ctx: usize) -> Result<Backend> {
    let c = &model.config;
    let started = Instant::now();
    let gpus = ordinals.iter().map(|&o| Gpu::open(o)).collect::<Result<Vec<_>, _>>()?;
    let budgets = gpus.iter().map(|g| gpu_budget(a, g)).collect::<Result<Vec<_>>>()?;
    let stats = expert_stats(a, c)?;
    // with a budget, each GPU's own
    let policy = expert_policy(a, || Ok(0))?;
    let tensors = model.file.header().tensors().iter().map(|t| (t.name.as_str(), t.n_bytes));
    // a split decodes one sequence at a time (run --prompts goes in turn there)
    let mut cp = ColdPlan { side_by_side: 1, ..ColdPlan::new(a, model)? };
    // experts read in place take whole pages (counted so even where every expert fits)
    let shares_for = |cold: ColdExperts| {
        let page = if cold != ColdExperts::Host { IN_PLACE_PAGE } else { 1 };
        let lb = LayerBytes::from_tensors_paged(tensors.clone(), c.n_experts, layer_state(c, ctx, a.kv_type.kv_type().bytes()), page);
        split(&lb, c.n_experts, stats.as_ref(), &budgets, GPU_MARGIN, policy)
    };
    let mut shares = shares_for(cp.cold)?;
    // under auto, the decode cost of the whole split's cold experts settles the way
    let (mut bytes, mut layers) = (0.0, 0);
    for sh in &shares {
        let (b, l) = cold_load(a, model, ctx, &sh.placement.only(sh.layers.clone()), stats.as_ref());
        bytes += b;
        layers += l;
    }
    let host_experts = shares.iter().map(|sh| sh.placement.host_experts).sum();
    if cp.settle(bytes, layers, host_experts, crate::plan_cmd::host_memory()) {
        shares = shares_for(cp.cold)?;
    }
    for (i, (sh, g)) in shares.iter().zip(&gpus).enumerate() {
        // the line `mxr plan --gpus` prints for the same split
        eprintln!("{} ({}, budget {:.2} GiB)", crate::plan_cmd::share_line(i, sh), g.info().name, sh.budget as f64 / (1u64 << 30) as f64);
    }
    let ranges: Vec<_> = shares.iter().map(|s| s.layers.clone()).collect();
    let placements: Vec<_> = shares.into_iter().map(|s| Some(s.placement)).collect();
    let cold = cp.cold;
    let mut m = match SplitModel::upload(model, gpus, &ranges, &placements, cold) {
        Err(e) if cold == ColdExperts::InPlace && a.cold_experts == ColdArg::Auto => {
            eprintln!("cold experts: not read in place ({e}); the CPU computes them");
            let gpus = ordinals.iter().map(|&o| Gpu::open(o)).collect::<Result<Vec<_>, _>>()?;
            SplitModel::upload(model, gpus, &ranges, &placements, ColdExperts::Host)?
        }
        r => r?,
    };
    for (i, (part, pl)) in m.parts.iter_mut().zip(&placements).enumerate() {
        part.kv_type = a.kv_type.kv_type();
        if let Some(pl) = pl.as_ref().filter(|pl| pl.host_experts > 0) {
            // (no statistics line: a part's placement marks other parts' layers as off it)
            eprint!("GPU {i}: ");
            offload_setup(part, pl, None, &cp, a, model, ctx)?;
        }
    }
    eprintln!(
        "uploaded {:.2} GiB of weights to {} GPUs in {:.1} s",
        m.weight_bytes() as f64 / (1u64 << 30) as f64,
        m.parts.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(Backend::Split(Box::new(m)))
}

/// How the cold experts will run: the cost model's rates (calibrated by `mxr bench
/// --calibrate-devices`, or the defaults) and where they came from; the way chosen
/// (--cold-experts) and why, in words.
pub struct ColdPlan {
    pub rates: DeviceRates,
    pub source: String,
    pub cold: ColdExperts,
    pub why: String,
    /// auto's in place, until the placement settles it ([`ColdPlan::settle`])
    provisional: bool,
    /// sequences decoded side by side (`ModelArgs::side_by_side`)
    side_by_side: usize,
    /// mixed's CPU share reads the page-locked copy (the experts' types), so mixed holds
    /// the cold experts once in host memory ([`mxr_models::offload_cost::mixed_reads_copy`])
    pub mixed_reads_copy: bool,
}

impl ColdPlan {
    /// The plan for `model` on this machine's saved rates.
    pub fn new(a: &ModelArgs, model: &Model) -> Result<ColdPlan> {
        let (rates, path) = DeviceRates::saved()?;
        let reads_copy = mxr_models::offload_cost::mixed_reads_copy(model.expert_types());
        Ok(ColdPlan { mixed_reads_copy: reads_copy, ..ColdPlan::with_rates(a, rates, path) })
    }

    pub fn with_rates(a: &ModelArgs, rates: DeviceRates, path: Option<std::path::PathBuf>) -> ColdPlan {
        let source = match path {
            Some(f) => format!("rates from {}", f.display()),
            None => "default rates; `mxr bench --calibrate-devices` measures this machine's".into(),
        };
        let (cold, why) = cold_mode(a, &rates);
        let provisional = a.cold_experts == ColdArg::Auto && cold == ColdExperts::InPlace;
        ColdPlan { rates, source, cold, why, provisional, side_by_side: a.side_by_side, mixed_reads_copy: false }
    }

    /// Under auto, once the placement is known: keeps the cold experts read in place, or
    /// turns to mixed or the CPU's way where that decodes a token sooner
    /// ([`DeviceRates::decode_way`]) for `cold_bytes` of cold experts a token over
    /// `host_layers` layers with experts in host memory. Mixed only where the host's
    /// memory (`host_mem`, if known) holds what it needs for the placement's
    /// `host_expert_bytes` ([`DeviceRates::mixed_host_bytes`]). True where the placement
    /// must be planned again (the CPU's way: experts the CPU computes take no pages; mixed
    /// keeps in place's).
    pub fn settle(&mut self, cold_bytes: f64, host_layers: usize, host_expert_bytes: u64, host_mem: Option<u64>) -> bool {
        if !std::mem::take(&mut self.provisional) || host_layers == 0 {
            return false;
        }
        self.why = self.rates.decode_comparison(cold_bytes, host_layers);
        let need = self.rates.mixed_host_bytes(host_expert_bytes, self.mixed_reads_copy);
        let mixed = host_mem.is_none_or(|m| need <= m);
        if !mixed {
            self.why += &format!(
                "; not mixed: it would hold {:.1} GiB of host memory, more than the host's {:.1}",
                need as f64 / (1u64 << 30) as f64,
                host_mem.unwrap_or(0) as f64 / (1u64 << 30) as f64
            );
        }
        match self.rates.decode_way_for(cold_bytes, host_layers, mixed, self.side_by_side) {
            DecodeWay::InPlace => false,
            DecodeWay::Mixed => {
                if self.side_by_side > 1 {
                    self.why += &format!("; mixed for {} sequences side by side", self.side_by_side);
                }
                self.cold = ColdExperts::Mixed;
                false
            }
            DecodeWay::Cpu => {
                self.cold = ColdExperts::Host;
                true
            }
        }
    }
}

/// The cold experts a decoded token is expected to read under placement `p` (bytes, by
/// the statistics or evenly spread) and the layers that keep experts in host memory.
fn cold_load(a: &ModelArgs, model: &Model, ctx: usize, p: &Placement, stats: Option<&ExpertStats>) -> (f64, usize) {
    let sizes = Sizes::of(model, ctx, a.kv_type.kv_type().bytes(), GPU_MARGIN);
    (p.expected_cold_bytes(stats, &sizes.expert, model.config.n_experts_used), p.host_layers())
}

/// How the cold experts are computed (--cold-experts), and why, in words. auto's in
/// place is provisional: [`ColdPlan::settle`] weighs it against the CPU's way once the
/// placement is known.
pub fn cold_mode(a: &ModelArgs, rates: &DeviceRates) -> (ColdExperts, String) {
    match a.cold_experts {
        ColdArg::Cpu => (ColdExperts::Host, "--cold-experts cpu".into()),
        ColdArg::InPlace => (ColdExperts::InPlace, "--cold-experts in-place".into()),
        ColdArg::Mixed => (ColdExperts::Mixed, "--cold-experts mixed".into()),
        ColdArg::Auto if a.cpu_moe || a.n_cpu_moe.is_some() => {
            (ColdExperts::Host, format!("{}: llama.cpp's meaning", if a.cpu_moe { "--cpu-moe" } else { "--n-cpu-moe" }))
        }
        ColdArg::Auto if rates.in_place_gbps > 0.0 => {
            (ColdExperts::InPlace, format!("the GPU reads cold experts in place at {:.1} GB/s", rates.in_place_gbps))
        }
        ColdArg::Auto => (ColdExperts::Host, "this GPU cannot read host pages in place (measured)".into()),
    }
}

/// Uploads `model` to GPU `ordinal` (opened as `gpu`) with the cold experts computed as
/// `cold` says; where in-place was only the automatic choice and the driver refuses it,
/// falls back to the CPU's way with a note.
fn upload_cold(a: &ModelArgs, model: &Model, gpu: Gpu, ordinal: usize, p: &Placement, cold: ColdExperts) -> Result<GpuModel> {
    let all = 0..model.config.n_layers;
    match GpuModel::upload_part_with(model, gpu, Some(p), all.clone(), cold) {
        Err(e) if cold == ColdExperts::InPlace && a.cold_experts == ColdArg::Auto => {
            eprintln!("cold experts: not read in place ({e}); the CPU computes them");
            Ok(GpuModel::upload_part_with(model, Gpu::open(ordinal)?, Some(p), all, ColdExperts::Host)?)
        }
        r => Ok(r?),
    }
}

/// A GPU (or a split's part) with experts in host memory: the cost model's rates
/// (calibrated, or the defaults) and what the user should know of its cold experts.
fn offload_setup(
    g: &mut GpuModel,
    p: &Placement,
    stats: Option<&ExpertStats>,
    cp: &ColdPlan,
    a: &ModelArgs,
    model: &Model,
    ctx: usize,
) -> Result<()> {
    let (why, source) = (&cp.why, &cp.source);
    g.rates = cp.rates;
    if let Some(t) = a.threads {
        g.cpu_threads = Threads(t.max(1));
    }
    if g.in_place_bytes > 0 && g.offloaded {
        eprintln!(
            "cold experts: {:.2} GiB in page-locked host memory mapped into the expert stacks{}; a batch's MoE gives the CPU as many of the chosen ones as finish with the rest read in place by the GPU ({:.1} against {:.1} GB/s; {why})",
            g.in_place_bytes as f64 / (1u64 << 30) as f64,
            if g.cpu_reads_host_pages() { ", where the CPU reads them too (not from the file)" } else { " (the CPU reads them from the file: the type is repacked for the GPU)" },
            g.rates.cpu_expert_gbps,
            g.rates.in_place_gbps
        );
        if let Some((h1, h)) = g.mixed_share()? {
            let (cpu, in_place) = g.rates.mixed_rates();
            eprintln!(
                "cold experts shared in a decoded token: the GPU reads hidden units 0..{h1} of {h} of each chosen one in place, the CPU computes the rest on {} threads ({in_place:.1} and {cpu:.1} GB/s side by side)",
                g.cpu_threads.0
            );
        }
    } else if g.in_place_bytes > 0 {
        eprintln!(
            "cold experts: read in place by the GPU over PCIe from {:.2} GiB of page-locked host memory mapped into the expert stacks ({why})",
            g.in_place_bytes as f64 / (1u64 << 30) as f64
        );
    } else {
        eprintln!(
            "cold experts: the CPU computes them on {} threads, or a batch copies them to the GPU where that is faster ({why}; {source})",
            g.cpu_threads.0
        );
    }
    match &g.pin_note {
        Some(note) => eprintln!("{note}"),
        // in place or mixed: nothing is copied (the CPU reads the mapped file)
        None if g.in_place_bytes > 0 => {}
        None => eprintln!(
            "cold experts page-locked in host memory: {:.2} GiB, copied at the pinned rate ({:.1} GB/s)",
            g.pinned_bytes() as f64 / (1u64 << 30) as f64,
            g.rates.h2d_pinned_gbps
        ),
    }
    if let Some(st) = stats {
        // issue 7's bound: decode cannot beat the host reads of the cold experts
        let sizes = Sizes::of(model, ctx, a.kv_type.kv_type().bytes(), GPU_MARGIN);
        let cold = p.cold_bytes_per_token(st, &sizes.expert);
        let (rate, what) = if g.in_place_bytes > 0 && g.offloaded {
            (g.rates.in_place_gbps + g.rates.cpu_expert_gbps, "the GPU's in-place and the CPU's rates together")
        } else if g.in_place_bytes > 0 {
            (g.rates.in_place_gbps, "the GPU's in-place read rate")
        } else {
            (g.rates.host_read_gbps, "the host's bandwidth")
        };
        eprintln!(
            "cold experts read {:.1} MB per decoded token by the statistics: at least {:.2} ms at {what}, {rate:.1} GB/s",
            cold / 1e6,
            cold / (rate * 1e9) * 1e3,
        );
    }
    Ok(())
}

/// Where the experts go on this GPU (see mxr_models::placement), by the routing
/// statistics `stats`. Where cold experts will be read in place, every expert matrix takes
/// whole pages on the GPU, and the placement counts them so.
/// The sizes placement plans with: each sequence decoded side by side keeps its own KV
/// cache and states.
fn sizes(a: &ModelArgs, model: &Model, ctx: usize, kv: f64, page: u64) -> Sizes {
    let mut s = Sizes::of_paged(model, ctx, kv, GPU_MARGIN, page);
    s.state *= a.side_by_side.max(1) as u64;
    s
}

fn placement(a: &ModelArgs, model: &Model, gpu: &Gpu, ctx: usize, cold: ColdExperts, stats: Option<&ExpertStats>) -> Result<Placement> {
    let c = &model.config;
    let policy = expert_policy(a, || gpu_budget(a, gpu))?;
    let kv = a.kv_type.kv_type().bytes();
    let sizes = |page: u64| sizes(a, model, ctx, kv, page);
    let p = plan_paged(sizes, c.n_experts, stats, policy, cold != ColdExperts::Host).map_err(|e| {
        // the cheapest fix first: the same context in half the memory
        let kv = match a.kv_type {
            KvArg::F32 => "; or --kv-type bf16 (half the KV cache)",
            KvArg::Bf16 => "; or --kv-type q8_0 (the KV cache in 56% of the memory)",
            KvArg::Q8_0 => "",
        };
        let side = if a.side_by_side > 1 {
            format!("; or fewer sequences side by side (--parallel {}: each keeps its own KV cache and states)", a.side_by_side)
        } else {
            String::new()
        };
        anyhow::anyhow!("{e}{kv}{side}")
    })?;
    Ok(p)
}

/// Puts the model on the device `--device` names (auto: a GPU if one is usable).
pub fn backend(a: &ModelArgs, model: &Model, threads: Threads, ctx: usize) -> Result<Backend> {
    let device = a.device;
    if device == Device::Cpu {
        return Ok(Backend::Cpu(threads));
    }
    check_gpu_list(a)?;
    let ordinals = match gpu_list(a) {
        Ok(o) => o,
        Err(e) if device == Device::Auto => {
            eprintln!("device: no GPU used ({e})");
            return Ok(Backend::Cpu(threads));
        }
        Err(e) => bail!("--device cuda: {e}"),
    };
    if ordinals.len() > 1 {
        return match split_backend(a, model, &ordinals, ctx) {
            Ok(b) => Ok(b),
            Err(e) if device == Device::Auto => {
                eprintln!("device: the GPUs were not used ({e:#})");
                Ok(Backend::Cpu(threads))
            }
            Err(e) => Err(e).context("--device cuda"),
        };
    }
    let gpu = match Gpu::open(ordinals[0]) {
        Ok(g) => g,
        Err(e) if device == Device::Auto => {
            eprintln!("device: no GPU used ({e})");
            return Ok(Backend::Cpu(threads));
        }
        Err(e) => bail!("--device cuda: {e}"),
    };
    let started = Instant::now();
    let name = gpu.info().to_string();
    let mut cp = ColdPlan::new(a, model)?;
    // under auto, the placement's expected cold experts settle the way (and where that is
    // the CPU's, the experts are planned again without pages)
    let planned = expert_stats(a, &model.config).and_then(|st| {
        let p = placement(a, model, &gpu, ctx, cp.cold, st.as_ref())?;
        let (bytes, layers) = cold_load(a, model, ctx, &p, st.as_ref());
        let p = if cp.settle(bytes, layers, p.host_experts, crate::plan_cmd::host_memory()) {
            placement(a, model, &gpu, ctx, cp.cold, st.as_ref())?
        } else {
            p
        };
        Ok((p, st))
    });
    let (p, stats) = match planned {
        Ok(p) => p,
        Err(e) if device == Device::Auto => {
            eprintln!("device: the GPU was not used ({e:#})");
            return Ok(Backend::Cpu(threads));
        }
        Err(e) => return Err(e).context("--device cuda"),
    };
    if p.host_experts > 0 {
        eprintln!("{p}");
    }
    match upload_cold(a, model, gpu, ordinals[0], &p, cp.cold) {
        Ok(mut g) => {
            g.kv_type = a.kv_type.kv_type();
            if p.host_experts > 0 {
                offload_setup(&mut g, &p, stats.as_ref(), &cp, a, model, ctx)?;
            }
            eprintln!(
                "uploaded {:.2} GiB of weights to {name} in {:.1} s",
                g.weight_bytes as f64 / (1u64 << 30) as f64,
                started.elapsed().as_secs_f64()
            );
            Ok(Backend::Cuda(Box::new(g)))
        }
        Err(e) if device == Device::Auto => {
            eprintln!("device: the GPU was not used ({e:#})");
            Ok(Backend::Cpu(threads))
        }
        Err(e) => Err(e).context("--device cuda"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        m: ModelArgs,
    }

    fn args(a: &[&str]) -> ModelArgs {
        T::parse_from(std::iter::once("mxr").chain(a.iter().copied())).m
    }

    /// Sequences side by side each need room for their KV cache and states; nothing else
    /// grows.
    #[test]
    fn placement_keeps_room_for_each_sequence_side_by_side() {
        let model = Model::open(mxr_e2e::repo_root().join(mxr_e2e::fixture::FIXTURE)).unwrap();
        let one = sizes(&args(&[]), &model, 64, 2.0, 1);
        let three = sizes(&ModelArgs { side_by_side: 3, ..args(&[]) }, &model, 64, 2.0, 1);
        assert!(one.state > 0);
        assert_eq!(three.state, 3 * one.state);
        assert_eq!((three.non_expert, &three.expert, three.margin), (one.non_expert, &one.expert, one.margin));
    }

    #[test]
    fn cold_experts_auto_keeps_llama_cpp_meanings_and_follows_the_rates() {
        let fast = DeviceRates { in_place_gbps: 48.0, cpu_expert_gbps: 40.0, ..DeviceRates::DEFAULT };
        let slow = DeviceRates { in_place_gbps: 12.0, ..fast };
        assert_eq!(cold_mode(&args(&[]), &fast).0, ColdExperts::InPlace);
        assert!(cold_mode(&args(&[]), &fast).1.contains("in place at 48.0 GB/s"));
        assert_eq!(cold_mode(&args(&[]), &DeviceRates { in_place_gbps: 0.0, ..fast }).0, ColdExperts::Host);
        // auto reads in place wherever the GPU can, until the placement settles it: S2x32
        // at 25% (76 MB of cold experts a token over 2 layers) shares them between the GPU
        // and the CPU (mixed: 0.96 against 1.58 ms; the same placement, so no new plan)
        let mut p = ColdPlan::with_rates(&args(&[]), fast, None);
        assert!(!p.settle(76e6, 2, 3 << 30, None) && p.cold == ColdExperts::Mixed, "{}", p.why);
        assert!(p.why.contains("76.0 MB of cold experts a token: in place 1.58 ms"), "{}", p.why);
        assert!(p.why.contains("mixed 0.96 ms at 40.0 + 48.0 GB/s, with 2 layers exchanging"), "{}", p.why);
        // where the two slow each other down badly, the CPU's way (and the placement is
        // planned again)
        let contended = DeviceRates { mixed_gbps: Some((30.0, 5.0)), ..slow };
        let mut p = ColdPlan::with_rates(&args(&[]), contended, None);
        assert!(p.settle(76e6, 2, 3 << 30, None) && p.cold == ColdExperts::Host, "{}", p.why);
        assert!(p.why.contains("the CPU's way 2.00 ms at 40.0 GB/s, mixed 2.27 ms"), "{}", p.why);
        assert!(!p.settle(76e6, 2, 3 << 30, None), "settled once");
        // a host without room for mixed's two forms of the cold experts (3 GiB and the
        // CPU's 40 / 88 of them): the faster of the others, here in place
        let mut p = ColdPlan::with_rates(&args(&[]), fast, None);
        assert!(!p.settle(76e6, 2, 3 << 30, Some(4 << 30)) && p.cold == ColdExperts::InPlace, "{}", p.why);
        assert!(p.why.contains("not mixed: it would hold 4.4 GiB of host memory, more than the host's 4.0"), "{}", p.why);
        // ... where the CPU reads the page-locked copy, mixed holds the 3 GiB once
        let mut p = ColdPlan::with_rates(&args(&[]), fast, None);
        p.mixed_reads_copy = true;
        assert!(!p.settle(76e6, 2, 3 << 30, Some(4 << 30)) && p.cold == ColdExperts::Mixed, "{}", p.why);
        let mut p = ColdPlan::with_rates(&args(&[]), fast, None);
        assert!(!p.settle(76e6, 2, 3 << 30, Some(5 << 30)) && p.cold == ColdExperts::Mixed, "{}", p.why);
        // ... but not for a few cold bytes, nor where no expert stays on the host
        let mut p = ColdPlan::with_rates(&args(&[]), slow, None);
        assert!(!p.settle(0.1e6, 2, 1 << 20, None) && p.cold == ColdExperts::InPlace, "{}", p.why);
        assert!(!ColdPlan::with_rates(&args(&[]), slow, None).settle(0.0, 0, 0, None));
        // ... unless several sequences decode side by side: then mixed (its GPU share on
        // few SMs), where the host has room for it
        let side = ModelArgs { side_by_side: 8, ..args(&[]) };
        let mut p = ColdPlan::with_rates(&side, slow, None);
        assert!(!p.settle(0.1e6, 2, 1 << 20, None) && p.cold == ColdExperts::Mixed, "{}", p.why);
        assert!(p.why.contains("mixed for 8 sequences side by side"), "{}", p.why);
        let mut p = ColdPlan::with_rates(&side, fast, None);
        assert!(!p.settle(76e6, 2, 3 << 30, Some(4 << 30)) && p.cold == ColdExperts::InPlace, "{}", p.why);
        let mut p = ColdPlan::with_rates(&ModelArgs { side_by_side: 8, ..args(&["--cold-experts", "in-place"]) }, slow, None);
        assert!(!p.settle(0.1e6, 2, 1 << 20, None) && p.cold == ColdExperts::InPlace);
        // a way asked for is kept whatever the rates
        let mut p = ColdPlan::with_rates(&args(&["--cold-experts", "in-place"]), slow, None);
        assert!(!p.settle(76e6, 2, 3 << 30, None) && p.cold == ColdExperts::InPlace);
        // --cpu-moe and --n-cpu-moe mean what they mean in llama.cpp: the CPU computes them
        assert_eq!(cold_mode(&args(&["--cpu-moe"]), &fast).0, ColdExperts::Host);
        assert_eq!(cold_mode(&args(&["--n-cpu-moe", "3"]), &fast).0, ColdExperts::Host);
        // unless asked otherwise, whatever the rates
        assert_eq!(cold_mode(&args(&["--cpu-moe", "--cold-experts", "in-place"]), &slow).0, ColdExperts::InPlace);
        assert_eq!(cold_mode(&args(&["--cold-experts", "cpu"]), &fast).0, ColdExperts::Host);
        assert_eq!(cold_mode(&args(&["--cpu-moe", "--cold-experts", "mixed"]), &fast).0, ColdExperts::Mixed);
        assert!(T::try_parse_from(["mxr", "--cold-experts", "gpu"]).is_err());
    }
}
