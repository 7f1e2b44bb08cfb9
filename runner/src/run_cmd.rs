//! `mxr run`: one prompt in, streamed text out (llama.cpp's `llama-cli -p` conventions),
//! timings on stderr; `--dump-logits` writes every prompt position's logits as .npy.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::{Gpu, KvType};
use mxr_models::engine::{Backend, State};
use mxr_models::forward::Logits;
use mxr_models::gpu::split::SplitModel;
use mxr_models::gpu::{ColdExperts, GpuModel};
use mxr_models::layer_split::{split, LayerBytes};
use mxr_models::layers::PatternSummary;
use mxr_models::offload_cost::DeviceRates;
use mxr_models::placement::{layer_state, plan, ExpertStats, Placement, Policy, Sizes, IN_PLACE_PAGE};
use mxr_models::Model;

use crate::interrupt::{Interrupt, Interrupted};
use crate::sampler::{Sampler, SamplerConfig};
use crate::template::{render, Message};
use crate::tokenizer::{StreamDecoder, TextTokenizer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model file (GGUF). Default: the bundled nano model (nano/checkpoint, converted to
    /// nano/mxr-nano-q8_0.gguf on first use).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Where to compute: auto uses the first GPU when there is one and the model fits it.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Context size in tokens (prompt + generated). 0 = the model's.
    #[arg(short = 'c', long, default_value_t = 4096)]
    pub ctx_size: usize,
    /// GPU memory to use, GiB (default: the card's free memory). Weights that are not
    /// experts, the KV cache and states go first, then experts by popularity; the rest
    /// stay in host memory and run on the CPU.
    #[arg(long)]
    pub gpu_mem: Option<f64>,
    /// GPUs to split the layers over, e.g. 0,1 (default: every visible GPU). Contiguous
    /// layers per GPU, balanced by bytes; the embedding on the first, lm_head on the last;
    /// --gpu-mem then applies to each.
    #[arg(long, value_delimiter = ',')]
    pub gpus: Option<Vec<usize>>,
    /// Routing statistics from `mxr calibrate` (which experts are popular).
    #[arg(long)]
    pub expert_stats: Option<PathBuf>,
    /// Keep every expert on the CPU (llama.cpp's --cpu-moe).
    #[arg(long, conflicts_with = "n_cpu_moe")]
    pub cpu_moe: bool,
    /// Keep the experts of the first N layers on the CPU (llama.cpp's --n-cpu-moe).
    #[arg(long)]
    pub n_cpu_moe: Option<usize>,
    /// Element type of the GPU's KV cache: bf16 (half the memory; attention and the
    /// lightning prefill on tensor cores), q8_0 (36 bytes per 32 values, a little over a
    /// quarter of f32: int8 with a scale per 32, dequantized inside the tensor-core
    /// kernels; head_dim a multiple of 32) or f32 (the CPU's exact values, f32 kernels
    /// throughout). The CPU always keeps f32.
    #[arg(long, value_enum, default_value_t = KvArg::Bf16)]
    pub kv_type: KvArg,
    /// How experts left in host memory are computed: in-place (the GPU reads them over
    /// PCIe from page-locked host pages mapped into its expert stacks; decode stays one
    /// CUDA graph), cpu (the CPU computes them from the mapped file, or a long batch copies
    /// them to the GPU), mixed (in place and on the CPU side by side: each layer the host
    /// gives the CPU as many of the chosen cold experts as finish with the rest read in
    /// place; for placements with many cold experts a token), or auto: cpu with --cpu-moe
    /// or --n-cpu-moe (llama.cpp's meaning), else in-place where the measured rates say the
    /// GPU reads a cold expert at least as fast as the CPU computes one (docs/offload.md).
    #[arg(long, value_enum, default_value_t = ColdArg::Auto)]
    pub cold_experts: ColdArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColdArg {
    Auto,
    Cpu,
    InPlace,
    Mixed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvArg {
    F32,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

impl KvArg {
    pub fn kv_type(self) -> KvType {
        match self {
            KvArg::F32 => KvType::F32,
            KvArg::Bf16 => KvType::Bf16,
            KvArg::Q8_0 => KvType::Q8_0,
        }
    }
}

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
    let cp = ColdPlan::new(a)?;
    // experts read in place take whole pages (counted so even where every expert fits)
    let page = if cp.cold != ColdExperts::Host { IN_PLACE_PAGE } else { 1 };
    let lb = LayerBytes::from_tensors_paged(tensors, c.n_experts, layer_state(c, ctx, a.kv_type.kv_type().bytes()), page);
    let shares = split(&lb, c.n_experts, stats.as_ref(), &budgets, GPU_MARGIN, policy)?;
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
}

impl ColdPlan {
    pub fn new(a: &ModelArgs) -> Result<ColdPlan> {
        let path = DeviceRates::cache_path();
        let (rates, source) = match (path.as_ref().map(|f| DeviceRates::load(f)).transpose()?.flatten(), &path) {
            (Some(r), Some(f)) => (r, format!("rates from {}", f.display())),
            _ => (DeviceRates::DEFAULT, "default rates; `mxr bench --calibrate-devices` measures this machine's".into()),
        };
        let (cold, why) = cold_mode(a, &rates);
        Ok(ColdPlan { rates, source, cold, why })
    }
}

/// How the cold experts are computed (--cold-experts), and why, in words.
pub fn cold_mode(a: &ModelArgs, rates: &DeviceRates) -> (ColdExperts, String) {
    match a.cold_experts {
        ColdArg::Cpu => (ColdExperts::Host, "--cold-experts cpu".into()),
        ColdArg::InPlace => (ColdExperts::InPlace, "--cold-experts in-place".into()),
        ColdArg::Mixed => (ColdExperts::Mixed, "--cold-experts mixed".into()),
        ColdArg::Auto if a.cpu_moe || a.n_cpu_moe.is_some() => {
            (ColdExperts::Host, format!("{}: llama.cpp's meaning", if a.cpu_moe { "--cpu-moe" } else { "--n-cpu-moe" }))
        }
        ColdArg::Auto => {
            let how = if rates.reads_in_place() { ColdExperts::InPlace } else { ColdExperts::Host };
            (
                how,
                format!(
                    "the GPU reads a cold expert in place at {:.1} GB/s, the CPU computes one at {:.1} GB/s",
                    rates.in_place_gbps, rates.cpu_expert_gbps
                ),
            )
        }
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
    if g.in_place_bytes > 0 && g.offloaded {
        eprintln!(
            "cold experts: {:.2} GiB in page-locked host memory mapped into the expert stacks; each layer the CPU computes as many of the chosen ones as finish with the rest read in place by the GPU ({:.1} against {:.1} GB/s; {why})",
            g.in_place_bytes as f64 / (1u64 << 30) as f64,
            g.rates.cpu_expert_gbps,
            g.rates.in_place_gbps
        );
    } else if g.in_place_bytes > 0 {
        eprintln!(
            "cold experts: read in place by the GPU over PCIe from {:.2} GiB of page-locked host memory mapped into the expert stacks ({why})",
            g.in_place_bytes as f64 / (1u64 << 30) as f64
        );
    } else {
        eprintln!("cold experts: the CPU computes them, or a batch copies them to the GPU where that is faster ({why}; {source})");
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

/// Where the experts go on this GPU (see mxr_models::placement), and the routing
/// statistics it used. Where cold experts will be read in place, every expert matrix takes
/// whole pages on the GPU, and the placement counts them so.
fn placement(a: &ModelArgs, model: &Model, gpu: &Gpu, ctx: usize, cold: ColdExperts) -> Result<(Placement, Option<ExpertStats>)> {
    let c = &model.config;
    let stats = expert_stats(a, c)?;
    let policy = expert_policy(a, || gpu_budget(a, gpu))?;
    let kv = a.kv_type.kv_type().bytes();
    let place = |page: u64| {
        plan(&Sizes::of_paged(model, ctx, kv, GPU_MARGIN, page), c.n_experts, stats.as_ref(), policy).map_err(|e| {
            match a.kv_type {
                // the cheapest fix first: the same context in half the memory
                KvArg::F32 => anyhow::anyhow!("{e}; or --kv-type bf16 (half the KV cache)"),
                KvArg::Bf16 => anyhow::anyhow!("{e}; or --kv-type q8_0 (the KV cache in 56% of the memory)"),
                KvArg::Q8_0 => anyhow::anyhow!(e),
            }
        })
    };
    let mut p = place(1)?;
    if cold != ColdExperts::Host && p.host_experts > 0 {
        p = place(IN_PLACE_PAGE)?;
    }
    Ok((p, stats))
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (default: from the clock; printed on stderr).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn sampler(&self) -> (Sampler, u64) {
        let seed = self
            .seed
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        let cfg = SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        };
        (Sampler::new(cfg), seed)
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompt text (else -f FILE, --prompt-tokens, or standard input).
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short, long, conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
    /// The prompt as token ids: 1,2,3.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "file"])]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub n_predict: usize,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// System prompt (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Write float32 logits of every prompt position, shape [prompt tokens, vocab], to this .npy.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Prompt tokens evaluated per forward call (bounds activation memory).
    #[arg(long, default_value_t = 512)]
    pub batch_size: usize,
}

pub struct Loaded {
    /// Declared (and so dropped) before the model: a GPU backend may hold page locks on
    /// the model's mapping, released before the mapping goes.
    pub backend: Backend,
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub threads: Threads,
    pub ctx: usize,
}

impl Loaded {
    pub fn new_state(&self) -> Result<State> {
        Ok(self.backend.new_state(&self.model, self.ctx)?)
    }

    /// The model on `tokens`; non-finite logits (NaN or infinite weights, overflow) are an
    /// error rather than garbage text.
    pub fn forward(&self, state: &mut State, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.forward_with(state, tokens, which, |l| l.to_vec())
    }

    /// [`Loaded::forward`], handing the logits to `f` where they lie (a GPU's decoded
    /// token: the page-locked buffer its graph wrote) instead of returning a copy; `f` runs
    /// only on finite logits.
    pub fn forward_with<R>(&self, state: &mut State, tokens: &[u32], which: Logits, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let checked = self.backend.forward_with(&self.model, state, tokens, which, |out| {
            // every call, decode included (a GPU's decode step has looked on the device)
            let logits = out.logits;
            match out.first_non_finite() {
                Some(i) => Err((logits.get(i).copied().unwrap_or(f32::NAN), i, logits.len())),
                None => Ok(f(logits)),
            }
        })?;
        let vocab = self.model.config.vocab_size.max(1);
        checked.map_err(|(v, i, len)| {
            anyhow::anyhow!(
                "the model produced a non-finite logit ({v} for token {} at position {}): are its weights finite? `mxr inspect --check` finds NaN and infinity",
                i % vocab,
                state.pos().saturating_sub(len.div_ceil(vocab)) + i / vocab
            )
        })
    }
}

/// Puts the model on the device `--device` names (auto: a GPU if one is usable).
fn backend(a: &ModelArgs, model: &Model, threads: Threads, ctx: usize) -> Result<Backend> {
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
    let cp = ColdPlan::new(a)?;
    let (p, stats) = match placement(a, model, &gpu, ctx, cp.cold) {
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

/// Opens the model, prints the model and device lines, checks the device choice.
pub fn load(a: &ModelArgs) -> Result<Loaded> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => crate::nano::default_model()?,
    };
    let model = Model::open(&path).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = TextTokenizer::from_gguf(model.file.header()).with_context(|| format!("tokenizer of {}", path.display()))?;
    let threads = Threads(a.threads.unwrap_or_else(|| Threads::all().0).max(1));
    let c = &model.config;
    let ctx = if a.ctx_size == 0 { c.context_length } else { a.ctx_size };
    let h = model.file.header();
    let (params, bytes): (u64, u64) = h.tensors().iter().fold((0, 0), |(p, b), t| (p + t.n_elements, b + t.n_bytes));
    let state_mib = c.layers.iter().filter(|k| **k == mxr_models::LayerKind::Lightning).count() * c.n_heads * c.head_dim * c.head_dim * 4;
    let kv_elems = c.layers.iter().filter(|k| **k == mxr_models::LayerKind::Softmax).count() * 2 * c.kv_dim();
    eprintln!(
        "model: {} layers {}, {:.2}M params, {:.2} GiB, {:.2} bits/weight, ctx {ctx}, lightning state {:.1} MiB, KV {} elements/token",
        c.n_layers,
        PatternSummary(&c.layers),
        params as f64 / 1e6,
        bytes as f64 / (1u64 << 30) as f64,
        bytes as f64 * 8.0 / params.max(1) as f64,
        state_mib as f64 / (1u64 << 20) as f64,
        kv_elems
    );
    let backend = backend(a, &model, threads, ctx)?;
    match &backend {
        Backend::Cpu(t) => eprintln!("device: cpu, {} threads (ggml kernels), KV cache f32 ({} B/token)", t.0, kv_elems * 4),
        Backend::Cuda(g) => {
            eprintln!("device: {}, KV cache {} ({} B/token)", g.gpu.info(), g.kv_type.name(), kv_elems as f64 * g.kv_type.bytes())
        }
        Backend::Split(m) => {
            let t = m.parts[0].kv_type;
            eprintln!("device: {} GPUs, layers split, KV cache {} ({} B/token)", m.parts.len(), t.name(), kv_elems as f64 * t.bytes())
        }
    }
    Ok(Loaded { model, tokenizer, threads, ctx, backend })
}

fn prompt_text(a: &RunArgs) -> Result<String> {
    if let Some(p) = &a.prompt {
        return Ok(p.clone());
    }
    if let Some(f) = &a.file {
        return std::fs::read_to_string(f).with_context(|| format!("reading prompt file {}", f.display()));
    }
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).context("reading the prompt from standard input (not valid UTF-8?)")?;
    Ok(s)
}

pub fn run(a: RunArgs) -> Result<()> {
    let l = load(&a.model)?;
    let tokens = match &a.prompt_tokens {
        Some(t) => t.clone(),
        None => {
            let mut text = prompt_text(&a)?;
            if a.chat {
                let template = l.tokenizer.chat_template.as_deref().context("the model has no chat template (tokenizer.chat_template)")?;
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(Message::new("system", s));
                }
                msgs.push(Message::new("user", &text));
                text = render(template, &msgs, true)?;
            }
            l.tokenizer.encode(&text)?
        }
    };
    if tokens.is_empty() {
        bail!("the prompt is empty: give text with -p, -f or standard input, or --prompt-tokens");
    }
    if tokens.len() + a.n_predict > l.ctx {
        bail!("prompt ({} tokens) + -n {} exceeds the context of {} tokens (raise --ctx-size)", tokens.len(), a.n_predict, l.ctx);
    }
    let c = &l.model.config;
    let stop = Interrupt::install()?;
    let mut session = l.new_state()?;
    let started = Instant::now();
    let mut dump = Vec::new();
    let mut last = Vec::new();
    let mut read = 0;
    for chunk in tokens.chunks(a.batch_size.max(1)) {
        if stop.requested() {
            let what = if a.dump_logits.is_some() { "; no logits written" } else { "" };
            return Err(Interrupted(format!("while reading the prompt ({read} of {} tokens read{what})", tokens.len())).into());
        }
        read += chunk.len();
        let which = if a.dump_logits.is_some() { Logits::All } else { Logits::Last };
        let logits = l.forward(&mut session, chunk, which)?;
        last = logits[logits.len() - c.vocab_size..].to_vec();
        if a.dump_logits.is_some() {
            dump.extend_from_slice(&logits);
        }
    }
    let prompt_s = started.elapsed().as_secs_f64();
    if let Some(path) = &a.dump_logits {
        crate::npy::write_f32(path, &[tokens.len(), c.vocab_size], &dump)?;
        eprintln!("wrote logits [{}, {}] to {}", tokens.len(), c.vocab_size, path.display());
    }
    let (mut sampler, seed) = a.sampling.sampler();
    let mut history = tokens.clone();
    let mut stream = StreamDecoder::new();
    let mut out = std::io::stdout().lock();
    let gen_start = Instant::now();
    let mut generated = 0;
    // the token drawn from the last forward pass's logits, where they lie (a GPU's decode
    // step: its page-locked buffer), so that they are not copied first
    let mut drawn = None;
    while generated < a.n_predict {
        if stop.requested() {
            writeln!(out).ok();
            return Err(Interrupted(format!("after {generated} generated tokens")).into());
        }
        let next = match drawn.take() {
            Some(t) => t,
            None => sampler.sample(&last, &history, &l.tokenizer.suppress),
        };
        generated += 1;
        if l.tokenizer.stop.contains(&next) {
            break;
        }
        history.push(next);
        let text = stream.push(&l.tokenizer, next)?;
        out.write_all(text.as_bytes()).and_then(|_| out.flush()).context("writing to standard output")?;
        if generated == a.n_predict {
            break;
        }
        drawn = Some(l.forward_with(&mut session, &[next], Logits::Last, |x| sampler.sample(x, &history, &l.tokenizer.suppress))?);
    }
    if a.n_predict > 0 {
        writeln!(out).ok();
    }
    let gen_s = gen_start.elapsed().as_secs_f64();
    eprintln!(
        "prompt: {} tokens in {:.1} ms ({:.1} tokens/s); generation: {} tokens in {:.1} ms ({:.1} tokens/s); seed {seed}",
        tokens.len(),
        prompt_s * 1e3,
        tokens.len() as f64 / prompt_s.max(1e-9),
        generated,
        gen_s * 1e3,
        generated as f64 / gen_s.max(1e-9)
    );
    Ok(())
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

    #[test]
    fn cold_experts_auto_keeps_llama_cpp_meanings_and_follows_the_rates() {
        let fast = DeviceRates { in_place_gbps: 48.0, cpu_expert_gbps: 40.0, ..DeviceRates::DEFAULT };
        let slow = DeviceRates { in_place_gbps: 12.0, ..fast };
        assert_eq!(cold_mode(&args(&[]), &fast).0, ColdExperts::InPlace);
        assert!(cold_mode(&args(&[]), &fast).1.contains("in place at 48.0 GB/s"));
        assert_eq!(cold_mode(&args(&[]), &slow).0, ColdExperts::Host);
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
