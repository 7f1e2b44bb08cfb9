//! `mxr bench`: llama-bench-style throughput. `-p` prompt sizes (prefill tokens/s, MFU
//! against the card's bf16 tensor-core peak), `-n` generated tokens (decode tokens/s,
//! ms/token, bytes read per token, GB/s and the share of the card's measured copy
//! bandwidth); each test runs `--reps` times after a warm-up, and the table shows the
//! mean ± standard deviation. `--profile` adds a table per test of one more pass, timed per
//! stage of the forward pass by events on the GPU's stream and by the host's clock.
//! `--depth` measures the prefill to a context depth and decode at that depth.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use mxr_kernels::cpu::Threads;
use mxr_models::engine::{Backend, State};
use mxr_models::forward::Logits;
use mxr_models::gpu::{GpuModel, Profile};
use mxr_models::{LayerKind, Model};

use crate::run_cmd::{load, Loaded, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt sizes to prefill (0 or empty: none).
    #[arg(short = 'p', long = "n-prompt", value_delimiter = ',', default_value = "512")]
    pub n_prompt: Vec<usize>,
    /// Tokens to generate, one at a time (0: no decode test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub reps: usize,
    /// Prompt tokens per forward call.
    #[arg(short = 'b', long, default_value_t = 4096)]
    pub batch_size: usize,
    /// Context depths (llama-bench's -d): for each, prefill that many tokens in -b chunks
    /// (reported as ppD, the time to reach the depth) and then decode -n tokens there
    /// (reported as "tgN @ dD"). Each repetition starts from an empty context.
    #[arg(short = 'd', long = "depth", value_delimiter = ',')]
    pub depth: Vec<usize>,
    /// Sequences the decode test runs at once, reported as "tgN xP" in tokens/s of all P,
    /// each decoding -n tokens. One GPU: side by side, each sequence's steps on a stream of
    /// its own, so that one sequence's GPU work overlaps another's wait for its cold experts
    /// on the CPU. The CPU: in one pass a step, each weight read once for all of them.
    /// Above 1, --cold-experts auto takes mixed where one sequence would read in place,
    /// and each sequence's KV cache and states count against --gpu-mem.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Print JSON records instead of the table.
    #[arg(long)]
    pub json: bool,
    /// One more pass per test, timed per stage (embedding, lightning and softmax attention,
    /// MoE router and experts, lm_head): GPU time by events on its stream, and host time
    /// issuing work or blocked on the GPU (GPU only).
    #[arg(long)]
    pub profile: bool,
    /// After the tests, decode -n more tokens and time each kernel of the decode step's
    /// graph as it runs (one GPU): per kernel, its share of the step. Builds the kernels
    /// with time stamps (MXR_TIMELINE=1), which the run's other figures then include.
    #[arg(long)]
    pub timeline: bool,
    /// Time the decode kernels alone on the real model's shapes (no model needed).
    #[arg(long)]
    pub kernels: bool,
    /// With --kernels: only this group (matvec, lightning, attention, or host: a decode
    /// graph's exchange with the host worker of cold experts).
    #[arg(long, requires = "kernels", value_parser = ["matvec", "lightning", "attention", "host"])]
    pub kernel_group: Option<String>,
    /// Measure what the cold-expert cost model needs (host memory and PCIe bandwidth, the
    /// CPU expert kernels' rates) and save it for later runs (no model needed).
    #[arg(long)]
    pub calibrate_devices: bool,
    /// bf16 tensor-core peak of the card in TFLOP/s for MFU (default: 790 for H100/H200,
    /// the rate a large cuBLAS bf16 GEMM sustains there).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

/// Per-token work of the model: bytes a decode step reads, FLOPs a prefill token costs.
struct Work {
    /// Weights read per decoded token: attention, router, the chosen experts, lm_head.
    decode_weight_bytes: f64,
    /// Lightning states read and written per decoded token.
    state_bytes: f64,
    /// KV bytes per token of depth (read once per decoded token).
    kv_bytes_per_pos: f64,
    /// 2 x active matrix parameters (lm_head excluded) + lightning state math, per token.
    flops_per_token: f64,
    /// Softmax attention FLOPs per (query, key) pair.
    attn_flops_per_pair: f64,
}

/// `kv_elem`: bytes per KV cache element on the backend that runs (f32 on the CPU).
fn work(m: &Model, kv_elem: f64) -> Work {
    let c = &m.config;
    let h = m.file.header();
    let tensor = |name: &str| h.tensor(name).map(|t| (t.n_bytes as f64, t.n_elements as f64)).unwrap_or((0.0, 0.0));
    let (mut bytes, mut params) = (0f64, 0f64);
    for t in h.tensors() {
        let name = t.name.as_str();
        if !name.starts_with("blk.") || t.dims.len() < 2 {
            continue;
        }
        let share = if name.contains("_exps") { c.n_experts_used as f64 / c.n_experts as f64 } else { 1.0 };
        bytes += t.n_bytes as f64 * share;
        params += t.n_elements as f64 * share;
    }
    let out = if h.tensor(mxr_models::names::OUTPUT).is_some() {
        tensor(mxr_models::names::OUTPUT)
    } else {
        tensor(mxr_models::names::TOKEN_EMBD)
    };
    let n_light = c.layers.iter().filter(|k| **k == LayerKind::Lightning).count() as f64;
    let n_soft = c.layers.len() as f64 - n_light;
    let state = (c.n_heads * c.head_dim * c.head_dim) as f64;
    Work {
        decode_weight_bytes: bytes + out.0,
        state_bytes: n_light * state * 4.0 * 2.0,
        kv_bytes_per_pos: n_soft * (2 * c.kv_dim()) as f64 * kv_elem,
        flops_per_token: 2.0 * params + n_light * 4.0 * state,
        attn_flops_per_pair: n_soft * 4.0 * (c.n_heads * c.head_dim) as f64,
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// The token ids a test draws from: the vocabulary less the ids the model never produces
/// (all-zero embedding rows, `tokenizer.ggml.suppress_tokens`). A synthetic slice has real
/// embeddings only for the tokens of its corpus; on a zero row every layer sees zeros and
/// routes every token to the same (tied) experts, which no real text does.
fn token_pool(l: &Loaded) -> Vec<u32> {
    let suppressed: std::collections::HashSet<u32> = l.tokenizer.suppress.iter().copied().collect();
    let pool: Vec<u32> = (0..l.model.config.vocab_size as u32).filter(|t| !suppressed.contains(t)).collect();
    if pool.is_empty() {
        (0..l.model.config.vocab_size as u32).collect()
    } else {
        pool
    }
}

/// Deterministic token ids spread over `pool`.
fn tokens(n: usize, pool: &[u32], seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            pool[(s % pool.len().max(1) as u64) as usize]
        })
        .collect()
}

struct Record {
    test: String,
    tokens: usize,
    seconds: Vec<f64>,
    /// decode: bytes read per token; prefill: FLOPs per token
    per_token: f64,
    profile: Option<Profile>,
    /// GPU: mean seconds per repetition the host spent blocked on the GPU and launching
    /// graphs; the rest of the repetition's time it spent issuing other work.
    host_wait: Option<HostTime>,
    /// With experts in host memory: the cold experts this test read, per token.
    cold: Option<Cold>,
}

/// Cold experts (in host memory) used per token of a test, and the host's read rate that
/// bounds them (issue 7's bound: decode cannot beat cold bytes / host bandwidth).
#[derive(Clone, Copy)]
struct Cold {
    copied: f64,
    shared: f64,
    on_cpu: f64,
    /// Read in place by the GPU (counted on one more, untimed, run of the test).
    in_place: f64,
    bytes: f64,
    host_gbps: f64,
}

/// Cold-expert counters so far: [copied, shared, on the CPU, bytes, read in place (mixed)],
/// None without offload.
fn cold_counts(l: &Loaded) -> Option<[u64; 5]> {
    use std::sync::atomic::Ordering::Relaxed;
    match &l.backend {
        Backend::Cuda(g) if g.offloaded => Some([
            g.copied_experts.load(Relaxed),
            g.shared_experts.load(Relaxed),
            g.cpu_experts.load(Relaxed),
            g.cold_bytes.load(Relaxed),
            g.in_place_experts.load(Relaxed),
        ]),
        _ => None,
    }
}

/// The cold experts per token between two readings of [`cold_counts`].
fn cold_per_token(l: &Loaded, before: Option<[u64; 5]>, tokens: usize) -> Option<Cold> {
    let (a, b) = (before?, cold_counts(l)?);
    let host_gbps = match &l.backend {
        Backend::Cuda(g) => g.rates.host_read_gbps,
        _ => return None,
    };
    let per = |x: u64, y: u64| (y - x) as f64 / tokens.max(1) as f64;
    Some(Cold {
        copied: per(a[0], b[0]),
        shared: per(a[1], b[1]),
        on_cpu: per(a[2], b[2]),
        in_place: per(a[4], b[4]),
        bytes: per(a[3], b[3]),
        host_gbps,
    })
}

/// The GPU model, where every cold expert is read in place (no host path).
fn in_place_model(l: &Loaded) -> Option<&GpuModel> {
    match &l.backend {
        Backend::Cuda(g) if g.in_place_bytes > 0 && !g.offloaded => Some(g),
        _ => None,
    }
}

/// With cold experts read in place, the routing never reaches the host while a test runs:
/// the choices of one more (untimed) decode of the first repetition's `n` tokens, counted
/// on the GPU, give the cold experts per token. None for any other backend.
fn in_place_cold(l: &Loaded, pool: &[u32], n: usize) -> Result<Option<Cold>> {
    let Some(g) = in_place_model(l).filter(|_| n > 0) else { return Ok(None) };
    let mut st = l.new_state()?;
    for &id in &tokens(n, pool, 1000) {
        l.forward_with(&mut st, &[id], Logits::Last, |_| ())?;
    }
    let counts = l.backend.expert_counts(&st)?;
    Ok(g.in_place_cold_use(&counts).map(|(choices, bytes)| Cold {
        copied: 0.0,
        shared: 0.0,
        on_cpu: 0.0,
        in_place: choices as f64 / n as f64,
        bytes: bytes as f64 / n as f64,
        host_gbps: g.rates.host_read_gbps,
    }))
}

/// Seconds of host time on the GPU's account: blocked on it, and launching its graphs.
#[derive(Clone, Copy)]
struct HostTime {
    wait: f64,
    launch: f64,
    /// the host worker answering the decode graphs' host calls (cold experts on the CPU)
    worker: f64,
}

/// The host's time on the GPUs so far (None on the CPU).
fn waited(l: &Loaded) -> Option<HostTime> {
    let gpus: Vec<&mxr_kernels::cuda::Gpu> = match &l.backend {
        Backend::Cuda(g) => vec![&g.gpu],
        Backend::Split(m) => m.parts.iter().map(|p| &p.gpu).collect(),
        Backend::Cpu(_) => return None,
    };
    Some(HostTime {
        wait: gpus.iter().map(|g| g.host_waited()).sum(),
        launch: gpus.iter().map(|g| g.host_launching()).sum(),
        worker: gpus.iter().map(|g| g.host_worker_busy()).sum(),
    })
}

/// Mean host time per repetition between two readings of [`waited`].
fn wait_per_rep(before: Option<HostTime>, after: Option<HostTime>, reps: usize) -> Option<HostTime> {
    let (b, a, n) = (before?, after?, reps.max(1) as f64);
    Some(HostTime { wait: (a.wait - b.wait) / n, launch: (a.launch - b.launch) / n, worker: (a.worker - b.worker) / n })
}

fn prefill(l: &Loaded, pool: &[u32], n: usize, batch: usize, rep: usize) -> Result<f64> {
    let ids = tokens(n, pool, rep as u64 + 1);
    let mut st = l.new_state()?;
    let t = Instant::now();
    for chunk in ids.chunks(batch.max(1)) {
        l.forward_with(&mut st, chunk, Logits::Last, |_| ())?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to prefill `depth` tokens from an empty context, then seconds to decode `n`
/// tokens after them.
fn at_depth(l: &Loaded, pool: &[u32], depth: usize, n: usize, batch: usize, rep: usize) -> Result<(f64, f64)> {
    let ids = tokens(depth + n, pool, 2000 + rep as u64);
    let mut st = l.new_state()?;
    let t = Instant::now();
    for chunk in ids[..depth].chunks(batch.max(1)) {
        l.forward_with(&mut st, chunk, Logits::Last, |_| ())?;
    }
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for &id in &ids[depth..] {
        l.forward_with(&mut st, &[id], Logits::Last, |_| ())?;
    }
    Ok((prefill, t.elapsed().as_secs_f64()))
}

fn decode(l: &Loaded, pool: &[u32], n: usize, rep: usize) -> Result<f64> {
    let ids = tokens(n, pool, 1000 + rep as u64);
    let mut st = l.new_state()?;
    let t = Instant::now();
    for &id in &ids {
        l.forward_with(&mut st, &[id], Logits::Last, |_| ())?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds for `p` sequences to decode `n` tokens each in one pass a step (the CPU: each
/// weight read once for all of them).
fn decode_in_one_pass(l: &Loaded, pool: &[u32], n: usize, p: usize, rep: usize) -> Result<f64> {
    let ids: Vec<Vec<u32>> = (0..p).map(|s| tokens(n, pool, 1000 + (rep * p + s) as u64)).collect();
    let mut states = (0..p).map(|_| l.new_state()).collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    for i in 0..n {
        let step: Vec<u32> = ids.iter().map(|s| s[i]).collect();
        let mut refs: Vec<&mut State> = states.iter_mut().collect();
        l.decode_many(&mut refs, &step)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds for `p` sequences to decode `n` tokens each side by side: a sequence's next
/// step is launched as soon as its last one is done, while the others' run.
fn decode_side_by_side(l: &Loaded, pool: &[u32], n: usize, p: usize, rep: usize) -> Result<f64> {
    let ids: Vec<Vec<u32>> = (0..p).map(|s| tokens(n, pool, 1000 + (rep * p + s) as u64)).collect();
    let mut states = (0..p).map(|_| l.new_lane_state()).collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    for (st, ids) in states.iter_mut().zip(&ids) {
        l.decode_start(st, ids[0])?;
    }
    // the next token of each sequence; a sequence whose step is done is launched again at
    // once, whichever it is (taking them in turn would hold one that ends early)
    let mut next = vec![1; p];
    let mut left = p;
    // polling until some step is done counts as the host blocked on the GPU
    let gpu = match &l.backend {
        Backend::Cuda(g) => Some(&g.gpu),
        _ => None,
    };
    let mut idle: Option<Instant> = None;
    while left > 0 {
        let mut took = false;
        for ((st, ids), i) in states.iter_mut().zip(&ids).zip(next.iter_mut()) {
            if *i > n || !l.decode_ready(st)? {
                continue;
            }
            l.decode_finish(st, |_| ())?;
            match ids.get(*i) {
                Some(&id) => l.decode_start(st, id)?,
                None => left -= 1,
            }
            *i += 1;
            took = true;
        }
        if !took {
            idle.get_or_insert_with(Instant::now);
            std::hint::spin_loop();
        } else if let (Some(since), Some(g)) = (idle.take(), gpu) {
            g.waited(since);
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.kernels {
        return crate::kernel_bench::run(&mxr_kernels::cuda::Gpu::open(0)?, a.kernel_group.as_deref());
    }
    if a.calibrate_devices {
        return crate::calibrate_devices::run(Threads(a.model.threads.unwrap_or_else(|| Threads::all().0).max(1)));
    }
    let mut margs = a.model.clone();
    let deepest = a.depth.iter().copied().max().map_or(0, |d| d + a.n_gen);
    let longest = a.n_prompt.iter().copied().max().unwrap_or(0).max(a.n_gen).max(deepest);
    margs.ctx_size = margs.ctx_size.max(longest);
    margs.side_by_side = a.parallel;
    if a.timeline {
        // read when the GPU opens: every kernel then stamps its start (kernels/src/cuda/timeline.rs)
        std::env::set_var("MXR_TIMELINE", "1");
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if a.parallel > 1 && a.profile {
        bail!("--profile times one sequence's stages (without decode graphs): leave out --parallel");
    }
    let l = load(&margs)?;
    if a.parallel > 1 && matches!(l.backend, Backend::Split(_)) {
        bail!("--parallel decodes sequences side by side on one GPU or in one pass on the CPU; this run is on {}", l.backend.name());
    }
    if a.timeline {
        crate::bench_timeline::gpu(&l)?;
    }
    let kv_elem = match &l.backend {
        Backend::Cuda(g) => g.kv_type.bytes(),
        Backend::Split(m) => m.parts[0].kv_type.bytes(),
        Backend::Cpu(_) => 4.0,
    };
    let w = work(&l.model, kv_elem);
    let c = &l.model.config;
    // a split model runs its parts one after another: bandwidth and peak are one card's
    let card = match &l.backend {
        Backend::Cuda(g) => Some(&g.gpu),
        Backend::Split(m) => Some(&m.parts[0].gpu),
        Backend::Cpu(_) => None,
    };
    let (bandwidth, peak, device) = match (&l.backend, card) {
        (_, Some(gpu)) => {
            let bw = gpu.copy_bandwidth(1 << 30, 5)?;
            let name = gpu.info().name.clone();
            let peak = a.peak_tflops.unwrap_or(if name.contains("H100") || name.contains("H200") { 790.0 } else { 0.0 });
            (Some(bw), peak * 1e12, l.backend.name())
        }
        (_, None) => (None, a.peak_tflops.unwrap_or(0.0) * 1e12, l.backend.name()),
    };
    let profiling = |on: bool| match &l.backend {
        Backend::Cuda(g) => g.set_profiling(on),
        Backend::Split(m) => m.parts.iter().for_each(|p| p.set_profiling(on)),
        Backend::Cpu(_) => {}
    };
    let take = || -> Result<Option<Profile>> {
        Ok(match &l.backend {
            Backend::Cuda(g) => Some(g.take_profile()?),
            // the parts' stages summed by name; spans and gaps added up
            Backend::Split(m) => {
                let mut all = Profile::default();
                for p in &m.parts {
                    let one = p.take_profile()?;
                    all.span += one.span;
                    all.between += one.between;
                    for st in one.stages {
                        match all.stages.iter_mut().find(|s| s.name == st.name) {
                            Some(s) => {
                                s.calls += st.calls;
                                s.gpu += st.gpu;
                                s.host += st.host;
                                s.blocked += st.blocked;
                            }
                            None => all.stages.push(st),
                        }
                    }
                }
                Some(all)
            }
            Backend::Cpu(_) => None,
        })
    };
    let pool = token_pool(&l);
    let mut records = Vec::new();
    for &n in a.n_prompt.iter().filter(|&&n| n > 0) {
        // warm-up at the full size, as llama-bench does: kernels compiled, scratch buffers
        // and the memory pool grown, cuBLAS's choices for these shapes made
        prefill(&l, &pool, n, a.batch_size, 0)?;
        let (w0, c0) = (waited(&l), cold_counts(&l));
        let seconds = (0..a.reps).map(|r| prefill(&l, &pool, n, a.batch_size, r)).collect::<Result<Vec<_>>>()?;
        let host_wait = wait_per_rep(w0, waited(&l), a.reps);
        let cold = cold_per_token(&l, c0, n * a.reps);
        let mut profile = None;
        if a.profile {
            profiling(true);
            prefill(&l, &pool, n, a.batch_size, 0)?;
            profile = take()?;
            profiling(false);
        }
        // average causal depth n/2 for the softmax layers
        let per_token = w.flops_per_token + w.attn_flops_per_pair * n as f64 / 2.0;
        records.push(Record { test: format!("pp{n}"), tokens: n, seconds, per_token, profile, host_wait, cold });
    }
    let p = a.parallel;
    let decode_test = |n: usize, rep: usize| match (&l.backend, p) {
        (_, 1) => decode(&l, &pool, n, rep),
        (Backend::Cpu(_), _) => decode_in_one_pass(&l, &pool, n, p, rep),
        _ => decode_side_by_side(&l, &pool, n, p, rep),
    };
    if a.n_gen > 0 {
        decode_test(2, 0)?;
        let (w0, c0) = (waited(&l), cold_counts(&l));
        let seconds = (0..a.reps).map(|r| decode_test(a.n_gen, r)).collect::<Result<Vec<_>>>()?;
        let host_wait = wait_per_rep(w0, waited(&l), a.reps);
        let cold = match cold_per_token(&l, c0, a.n_gen * p * a.reps) {
            Some(c) => Some(c),
            None => in_place_cold(&l, &pool, a.n_gen)?,
        };
        let mut profile = None;
        if a.profile {
            profiling(true);
            decode(&l, &pool, a.n_gen, 0)?;
            profile = take()?;
            profiling(false);
        }
        let per_token = w.decode_weight_bytes + w.state_bytes + w.kv_bytes_per_pos * a.n_gen as f64 / 2.0;
        let test = if p > 1 { format!("tg{} x{p}", a.n_gen) } else { format!("tg{}", a.n_gen) };
        records.push(Record { test, tokens: a.n_gen * p, seconds, per_token, profile, host_wait, cold });
    }
    let timeline = if a.timeline { Some(crate::bench_timeline::measure(&l, &tokens(a.n_gen.max(2) + 1, &pool, 4242))?) } else { None };
    for &d in a.depth.iter().filter(|&&d| d > 0) {
        // warm-up: kernels and buffers for these shapes (a full-size one would cost as much
        // as a repetition at a million tokens)
        at_depth(&l, &pool, d.min(4096), a.n_gen.min(2), a.batch_size, 0)?;
        let runs = (0..a.reps).map(|r| at_depth(&l, &pool, d, a.n_gen, a.batch_size, r)).collect::<Result<Vec<_>>>()?;
        let per_token = w.flops_per_token + w.attn_flops_per_pair * d as f64 / 2.0;
        records.push(Record {
            test: format!("pp{d}"),
            tokens: d,
            seconds: runs.iter().map(|r| r.0).collect(),
            per_token,
            profile: None,
            host_wait: None,
            cold: None,
        });
        if a.n_gen > 0 {
            let per_token = w.decode_weight_bytes + w.state_bytes + w.kv_bytes_per_pos * (d as f64 + a.n_gen as f64 / 2.0);
            let seconds = runs.iter().map(|r| r.1).collect();
            records.push(Record {
                test: format!("tg{} @ d{d}", a.n_gen),
                tokens: a.n_gen,
                seconds,
                per_token,
                profile: None,
                host_wait: None,
                cold: None,
            });
        }
    }
    let h = l.model.file.header();
    let (params, size): (u64, u64) = h.tensors().iter().fold((0, 0), |(p, b), t| (p + t.n_elements, b + t.n_bytes));
    let model_name = format!("minimax-01 {}L {}x{}E", c.n_layers, c.n_experts, c.n_experts_used);
    let commit = env!("MXR_COMMIT");
    if a.json {
        for r in &records {
            let rates: Vec<f64> = r.seconds.iter().map(|s| r.tokens as f64 / s).collect();
            let (ts, sd) = mean_sd(&rates);
            let mut j = serde_json::json!({
                "model": model_name, "model_size": size, "model_n_params": params, "device": device, "commit": commit,
                "test": r.test, "n_tokens": r.tokens, "reps": r.seconds.len(), "seconds": r.seconds, "avg_ts": ts, "stddev_ts": sd,
                "ms_per_token": 1e3 / ts,
            });
            if let Some((_, d)) = r.test.split_once(" @ d") {
                j["depth"] = serde_json::json!(d.parse::<usize>().unwrap_or(0));
            }
            if r.test.starts_with("tg") {
                j["bytes_per_token"] = serde_json::json!(r.per_token);
                j["gb_per_s"] = serde_json::json!(r.per_token * ts / 1e9);
                if let Some(bw) = bandwidth {
                    j["copy_bandwidth_gb_per_s"] = serde_json::json!(bw / 1e9);
                    j["bandwidth_fraction"] = serde_json::json!(r.per_token * ts / bw);
                }
            } else {
                j["flops_per_token"] = serde_json::json!(r.per_token);
                if peak > 0.0 {
                    j["mfu"] = serde_json::json!(r.per_token * ts / peak);
                }
            }
            if let Some(w) = r.host_wait {
                j["host_wait_seconds"] = serde_json::json!(w.wait);
                j["host_launch_seconds"] = serde_json::json!(w.launch);
                j["host_worker_seconds"] = serde_json::json!(w.worker);
            }
            if let Some(c) = r.cold {
                j["cold_experts"] = serde_json::json!({"copied_per_token": c.copied, "shared_per_token": c.shared, "on_cpu_per_token": c.on_cpu, "in_place_per_token": c.in_place,
                    "bytes_per_token": c.bytes, "host_read_gb_per_s": c.host_gbps, "host_bound_seconds_per_token": c.bytes / (c.host_gbps * 1e9)});
            }
            if let Some(p) = &r.profile {
                let stages: Vec<serde_json::Value> = p
                    .stages
                    .iter()
                    .map(|s| {
                        serde_json::json!({"stage": s.name, "calls": s.calls, "gpu_seconds": s.gpu,
                            "host_seconds": s.host, "host_blocked_seconds": s.blocked})
                    })
                    .collect();
                j["profile"] = serde_json::json!({"gpu_span_seconds": p.span, "gpu_between_stages_seconds": p.between, "stages": stages});
            }
            println!("{j}");
        }
        if let Some(t) = &timeline {
            t.print(true);
        }
        return Ok(());
    }
    println!("mxr {} (commit {commit}); device: {device}", env!("CARGO_PKG_VERSION"));
    if let Some(bw) = bandwidth {
        println!("measured device copy bandwidth {:.0} GB/s; bf16 peak for MFU {:.0} TFLOP/s", bw / 1e9, peak / 1e12);
    }
    println!("| model | size | params | test | t/s | ms/token | GB/token | GB/s | % BW | MFU |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &records {
        let rates: Vec<f64> = r.seconds.iter().map(|s| r.tokens as f64 / s).collect();
        let (ts, sd) = mean_sd(&rates);
        let (gbt, gbs, bw, mfu) = if r.test.starts_with("tg") {
            let gbs = r.per_token * ts / 1e9;
            (
                format!("{:.2}", r.per_token / 1e9),
                format!("{gbs:.0}"),
                bandwidth.map_or("-".into(), |b| format!("{:.0}%", 100.0 * gbs * 1e9 / b)),
                "-".into(),
            )
        } else {
            ("-".into(), "-".into(), "-".into(), if peak > 0.0 { format!("{:.1}%", 100.0 * r.per_token * ts / peak) } else { "-".into() })
        };
        println!(
            "| {model_name} | {:.2} GiB | {:.2} B | {} | {ts:.2} ± {sd:.2} | {:.3} | {gbt} | {gbs} | {bw} | {mfu} |",
            size as f64 / (1u64 << 30) as f64,
            params as f64 / 1e9,
            r.test,
            1e3 / ts
        );
    }
    for r in &records {
        if let Some(w) = r.host_wait {
            let mean = r.seconds.iter().sum::<f64>() / r.seconds.len().max(1) as f64;
            println!(
                "host {}: blocked on the GPU {:.2} ms of {:.2} ms per repetition ({:.0}%), launching graphs {:.2} ms ({:.0}%); issuing other work the rest",
                r.test,
                w.wait * 1e3,
                mean * 1e3,
                100.0 * w.wait / mean.max(1e-12),
                w.launch * 1e3,
                100.0 * w.launch / mean.max(1e-12)
            );
            if w.worker > 0.0 {
                println!(
                    "host worker {}: computing cold experts {:.2} ms of {:.2} ms per repetition ({:.0}%)",
                    r.test,
                    w.worker * 1e3,
                    mean * 1e3,
                    100.0 * w.worker / mean.max(1e-12)
                );
            }
        }
    }
    for r in &records {
        match r.cold {
            Some(c) if in_place_model(&l).is_some() => println!(
                "cold experts {}: {:.2} per token read in place by the GPU (counted on one more run of the first repetition), {:.1} MB per token: at least {:.3} ms at the host's {:.1} GB/s",
                r.test,
                c.in_place,
                c.bytes / 1e6,
                c.bytes / (c.host_gbps * 1e9) * 1e3,
                c.host_gbps
            ),
            Some(c) => println!(
                "cold experts {}: {:.2} per token ({:.2} copied to the GPU, {:.2} shared by the GPU and the CPU, {:.2} on the CPU, {:.2} read in place), {:.1} MB per token: at least {:.3} ms at the host's {:.1} GB/s",
                r.test,
                c.copied + c.shared + c.on_cpu + c.in_place,
                c.copied,
                c.shared,
                c.on_cpu,
                c.in_place,
                c.bytes / 1e6,
                c.bytes / (c.host_gbps * 1e9) * 1e3,
                c.host_gbps
            ),
            None => {}
        }
    }
    // on a GPU: how much of the file the process still maps (the GPU and page-locked copies
    // serve the rest)
    if !matches!(l.backend, Backend::Cpu(_)) {
        if let Some(resident) = crate::host_memory::file_resident_bytes(l.model.file.path()) {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            let locked = match &l.backend {
                Backend::Cuda(g) if g.offloaded || g.in_place_bytes > 0 => {
                    format!("; page-locked for cold experts: {:.2} GiB", gib((g.in_place_bytes + g.pinned_bytes()) as f64))
                }
                _ => String::new(),
            };
            println!(
                "host memory after the runs: {:.2} GiB of the model file's {:.2} GiB mapped in{locked}",
                gib(resident as f64),
                gib(l.model.file.bytes().len() as f64)
            );
        }
    }
    if let Some(g) = in_place_model(&l) {
        println!(
            "cold experts: read in place by the GPU from {:.2} GiB of page-locked host pages mapped into the expert stacks",
            g.in_place_bytes as f64 / (1u64 << 30) as f64
        );
    }
    for r in &records {
        if let Some(p) = &r.profile {
            print_profile(&r.test, p);
        }
    }
    if let Some(t) = &timeline {
        t.print(false);
    }
    Ok(())
}

/// One profiled pass of a test: per stage, the main stream's time from the stage's first to
/// its last work (idle gaps inside included), the host's time in it and the part of that it
/// was blocked on the GPU. GPU time well above the host's issuing time means the GPU is the
/// bound there; the other way round, the host.
fn print_profile(test: &str, p: &Profile) {
    let gpu: f64 = p.stages.iter().map(|s| s.gpu).sum();
    println!(
        "profile {test} (one pass): main stream {:.2} ms from first to last stage, {:.2} ms of it between stages",
        p.span * 1e3,
        p.between * 1e3
    );
    println!("| stage | calls | GPU ms | GPU % | host ms | host blocked ms | host issuing ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &p.stages {
        println!(
            "| {} | {} | {:.2} | {:.0}% | {:.2} | {:.2} | {:.2} |",
            s.name,
            s.calls,
            s.gpu * 1e3,
            100.0 * s.gpu / gpu.max(1e-12),
            s.host * 1e3,
            s.blocked * 1e3,
            (s.host - s.blocked).max(0.0) * 1e3
        );
    }
}
