//! `mxr plan`: where a model goes on given GPUs and host memory, before anything is loaded:
//! weights by kind and type, KV cache per token, lightning state, activations, the expert
//! offload split, and whether it fits. For a file (`-m`) the sizes are the file's; for the
//! real MiniMax-Text-01 (`--preset minimax-text-01`) they are computed from its shapes and the
//! precision policy of `mxr convert` (matrices `--type`, experts `--expert-type`; router and
//! norms F32; embeddings and lm_head BF16). The KV cache and states are sized as the GPU
//! backend keeps them (`--kv-type`; the lightning state is always f32).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::run_cmd::ColdArg;
use mxr_models::config::minimax_text_01;
use mxr_models::layer_split::{split, GpuShare, LayerBytes};
use mxr_models::names::{self, blk};
use mxr_models::offload_cost::{mixed_reads_copy, DecodeWay, DeviceRates};
use mxr_models::placement::{layer_state, plan_paged, ExpertStats, Placement, Policy, IN_PLACE_PAGE};
use mxr_models::{Config, LayerKind, Model};
use mxr_quant::QType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// MiniMax-Text-01 as released: 80 layers, 32 experts, 456 B parameters.
    #[value(name = "minimax-text-01")]
    MinimaxText01,
}

#[derive(Args)]
pub struct PlanArgs {
    /// A GGUF file to plan for (its own tensor sizes).
    #[arg(short, long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A released model's shapes, at the types given by --type / --expert-type.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Context in tokens (KV cache).
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Matrix type of the preset's attention (and experts, unless --expert-type).
    #[arg(long = "type", default_value = "q8_0")]
    pub wtype: String,
    /// Matrix type of the preset's experts.
    #[arg(long)]
    pub expert_type: Option<String>,
    /// KV cache element type: bf16 (the runner's default), f32 or q8_0, as `mxr run
    /// --kv-type` takes them.
    #[arg(long, default_value = "bf16")]
    pub kv_type: String,
    /// The GPUs: NxH100 or NxH200 (e.g. 1xH200, 4xH100), or none.
    #[arg(long, default_value = "1xH200")]
    pub gpus: String,
    /// Memory per GPU to plan with, GiB (default: the card's).
    #[arg(long)]
    pub gpu_mem: Option<f64>,
    /// Host memory for experts left off the GPUs, GiB (default: this machine's).
    #[arg(long)]
    pub host_mem: Option<f64>,
    /// Routing statistics (`mxr calibrate`) to pick the experts that stay on the GPUs.
    #[arg(long)]
    pub expert_stats: Option<PathBuf>,
    /// Prompt tokens per forward call (activation memory).
    #[arg(long, default_value_t = 512)]
    pub batch_size: usize,
    /// How the runner will compute experts left in host memory (`mxr run --cold-experts`):
    /// read in place by the GPU, whose stacks then keep each expert matrix in whole 2 MiB
    /// pages (placement counts them so), or on the CPU. auto: as `mxr run` picks from the
    /// rates `mxr bench --calibrate-devices` saved (or the defaults).
    #[arg(long, value_enum, default_value_t = ColdArg::Auto)]
    pub cold_experts: ColdArg,
    /// Sequences decoded side by side (`mxr run --prompts --parallel`, `mxr bench
    /// --parallel`): each keeps its own KV cache and lightning states, and above one auto
    /// shares cold experts between the GPU and the CPU (mixed) where one sequence would
    /// read them in place.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// One JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

const GIB: f64 = (1u64 << 30) as f64;
/// Kept free per GPU for activations, scratch and cuBLAS (as `mxr run` plans).
const MARGIN: u64 = 2 << 30;

/// One tensor: name, parameters, bytes.
struct Item {
    name: String,
    params: u64,
    bytes: u64,
}

fn matrix(name: String, rows: usize, cols: usize, q: QType) -> Result<Item> {
    let row = q.row_bytes(cols).with_context(|| format!("{name}: {cols} columns are not whole {q} blocks"))?;
    Ok(Item { name, params: (rows * cols) as u64, bytes: (rows * row) as u64 })
}

/// The tensors of a model with config `c` as `mxr convert` writes them.
fn preset_tensors(c: &Config, wt: QType, et: QType) -> Result<Vec<Item>> {
    let (d, a, kv, h, e, v) = (c.dim, c.attn_dim(), c.kv_dim(), c.hidden_dim, c.n_experts, c.vocab_size);
    let f32v = |name: String, n: usize| Item { name, params: n as u64, bytes: 4 * n as u64 };
    let mut t = vec![matrix(names::TOKEN_EMBD.into(), v, d, QType::BF16)?, matrix(names::OUTPUT.into(), v, d, QType::BF16)?];
    t.push(f32v(names::OUTPUT_NORM.into(), d));
    for (l, kind) in c.layers.iter().enumerate() {
        match kind {
            LayerKind::Lightning => {
                t.push(matrix(blk(l, blk::ATTN_QKV), 3 * a, d, wt)?);
                t.push(matrix(blk(l, blk::ATTN_GATE), a, d, wt)?);
                t.push(f32v(blk(l, blk::ATTN_NORM_2), a));
            }
            LayerKind::Softmax => {
                t.push(matrix(blk(l, blk::ATTN_Q), a, d, wt)?);
                t.push(matrix(blk(l, blk::ATTN_K), kv, d, wt)?);
                t.push(matrix(blk(l, blk::ATTN_V), kv, d, wt)?);
            }
        }
        t.push(matrix(blk(l, blk::ATTN_OUTPUT), d, a, wt)?);
        t.push(f32v(blk(l, blk::ATTN_NORM), d));
        t.push(f32v(blk(l, blk::FFN_NORM), d));
        t.push(Item { name: blk(l, blk::FFN_GATE_INP), params: (d * e) as u64, bytes: (4 * d * e) as u64 });
        t.push(matrix(blk(l, blk::FFN_GATE_EXPS), e * h, d, et)?);
        t.push(matrix(blk(l, blk::FFN_UP_EXPS), e * h, d, et)?);
        t.push(matrix(blk(l, blk::FFN_DOWN_EXPS), e * d, h, et)?);
    }
    Ok(t)
}

fn kind(name: &str) -> &'static str {
    if name.contains("_exps") {
        "experts"
    } else if name.contains("ffn_gate_inp") {
        "router"
    } else if name.contains("norm") {
        "norms"
    } else if name == names::TOKEN_EMBD {
        "embeddings"
    } else if name == names::OUTPUT {
        "lm_head"
    } else {
        "attention"
    }
}

/// Card memory as nvidia-smi reports it.
fn card(name: &str) -> Result<(usize, u64)> {
    if name.eq_ignore_ascii_case("none") {
        return Ok((0, 0));
    }
    let (n, kind) = name.split_once(['x', 'X']).with_context(|| format!("--gpus {name}: write NxH100 or NxH200"))?;
    let n: usize = n.parse().ok().filter(|&n| n > 0).with_context(|| format!("--gpus {name}: {n} is not a GPU count"))?;
    let mib: u64 = match kind.to_ascii_uppercase().as_str() {
        "H100" => 81_559,
        "H200" => 143_771,
        other => bail!("--gpus {name}: unknown card {other} (H100 or H200)"),
    };
    Ok((n, mib << 20))
}

/// This machine's memory (MemTotal), None where /proc/meminfo cannot tell.
pub(crate) fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: PlanArgs) -> Result<()> {
    // whether mixed's CPU share reads the page-locked copy of the cold experts (their types)
    let (c, items, source, file, reads_copy) = match (&a.model, a.preset) {
        (Some(p), _) => {
            let m = Model::open(p).with_context(|| format!("loading {}", p.display()))?;
            let items =
                m.file.header().tensors().iter().map(|t| Item { name: t.name.clone(), params: t.n_elements, bytes: t.n_bytes }).collect();
            let reads_copy = mixed_reads_copy(m.expert_types());
            (m.config.clone(), items, p.display().to_string(), Some(m), reads_copy)
        }
        (None, Some(Preset::MinimaxText01)) => {
            let wt = QType::parse(&a.wtype).with_context(|| format!("--type {}: not a weight type", a.wtype))?;
            let et = match &a.expert_type {
                Some(t) => QType::parse(t).with_context(|| format!("--expert-type {t}: not a weight type"))?,
                None => wt,
            };
            let c = minimax_text_01();
            let items = preset_tensors(&c, wt, et)?;
            (
                c,
                items,
                format!("MiniMax-Text-01 (preset; matrices {wt}, experts {et}, embeddings/lm_head BF16, router/norms F32)"),
                None,
                mixed_reads_copy([et]),
            )
        }
        (None, None) => bail!("give a model file (-m) or --preset minimax-text-01"),
    };
    // the runner's own sizes (mxr_kernels::cuda::KvType::bytes; q8_0 keeps each block's
    // scale as 4 bytes, 36 per 32 values)
    let kv_elem = match a.kv_type.to_ascii_lowercase().as_str() {
        "f32" => 4.0,
        "bf16" | "f16" => 2.0,
        "q8_0" => 36.0 / 32.0,
        other => bail!("--kv-type {other}: f32, bf16 or q8_0"),
    };
    // weights by kind
    let mut by_kind: Vec<(&str, u64, u64)> =
        ["attention", "router", "norms", "experts", "embeddings", "lm_head"].iter().map(|k| (*k, 0, 0)).collect();
    for it in &items {
        let k = kind(&it.name);
        if let Some(e) = by_kind.iter_mut().find(|e| e.0 == k) {
            e.1 += it.params;
            e.2 += it.bytes;
        }
    }
    let get = |k: &str| by_kind.iter().find(|e| e.0 == k).map_or((0, 0), |e| (e.1, e.2));
    let params: u64 = items.iter().map(|i| i.params).sum();
    let bytes: u64 = items.iter().map(|i| i.bytes).sum();
    // attention, router, norms and the chosen experts; embeddings and lm_head excluded
    let active = get("attention").0 + get("router").0 + get("norms").0 + get("experts").0 * c.n_experts_used as u64 / c.n_experts as u64;
    let n_soft = c.layers.iter().filter(|k| **k == LayerKind::Softmax).count();
    let n_light = c.n_layers - n_soft;
    let kv_per_token = n_soft as f64 * 2.0 * c.kv_dim() as f64 * kv_elem;
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    // every sequence side by side keeps its own
    let seqs = a.parallel as u64;
    let kv = (kv_per_token * a.ctx as f64) as u64 * seqs;
    let state = (n_light * c.n_heads * c.head_dim * c.head_dim * 4) as u64 * seqs;
    let b = a.batch_size.max(1);
    let act = (b
        * (c.dim * 4 * 4
            + 3 * c.attn_dim() * 4 * 2
            + c.attn_dim() * 4 * 3
            + c.n_experts_used * c.hidden_dim * 4 * 4
            + c.n_experts_used * c.dim * 4 * 2)) as u64
        + 2 * (3 * c.attn_dim() * c.dim) as u64;
    let (n_gpus, card_bytes) = card(&a.gpus)?;
    let per_gpu = match a.gpu_mem {
        Some(g) if g > 0.0 && g.is_finite() => (g * GIB) as u64,
        Some(g) => bail!("--gpu-mem {g}: give a positive number of GiB"),
        None => card_bytes,
    };
    let host = match a.host_mem {
        Some(h) if h > 0.0 && h.is_finite() => (h * GIB) as u64,
        Some(h) => bail!("--host-mem {h}: give a positive number of GiB"),
        None => host_memory().unwrap_or(0),
    };
    let stats = match (&a.expert_stats, &file) {
        (Some(p), _) => {
            let j: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                    .with_context(|| format!("{} is not JSON", p.display()))?;
            Some(ExpertStats::from_json(&j, &c)?)
        }
        _ => None,
    };
    // one GPU: the planner mxr run uses; several: contiguous layers per GPU (issue 10),
    // each GPU placing its own layers' experts
    let (rates, rates_source) = match a.cold_experts {
        // (mixed: for its share of each cold expert, which sets its host memory)
        ColdArg::Auto | ColdArg::Mixed => {
            let (r, path) = DeviceRates::saved()?;
            (Some(r), path.map(|p| format!("rates from {}", p.display())))
        }
        _ => (None, None),
    };
    let mut in_place = match a.cold_experts {
        ColdArg::Cpu => false,
        ColdArg::InPlace | ColdArg::Mixed => true,
        ColdArg::Auto => rates.is_some_and(|r| r.in_place_gbps > 0.0),
    };
    let layer_bytes = |page: u64| {
        let states = layer_state(&c, a.ctx, kv_elem).into_iter().map(|b| b * seqs).collect();
        LayerBytes::from_tensors_paged(items.iter().map(|i| (i.name.as_str(), i.bytes)), c.n_experts, states, page)
    };
    // as the runner: a split counts experts in pages when they will be read in place, one
    // GPU only where some expert stays in host memory
    let plan_for = |in_place: bool| {
        let page = if in_place { IN_PLACE_PAGE } else { 1 };
        let shares = (n_gpus > 1)
            .then(|| split(&layer_bytes(page), c.n_experts, stats.as_ref(), &vec![per_gpu; n_gpus], MARGIN, Policy::Budget(per_gpu)));
        let placement = match &shares {
            Some(Ok(sh)) => Some(Ok(merge(sh))),
            Some(Err(e)) => Some(Err(mxr_models::ModelError::Input(e.to_string()))),
            None if n_gpus == 0 => None,
            None => {
                Some(plan_paged(|page| layer_bytes(page).sizes(MARGIN), c.n_experts, stats.as_ref(), Policy::Budget(per_gpu), in_place))
            }
        };
        (shares, placement)
    };
    let (mut shares, mut placement) = plan_for(in_place);
    // auto, as the runner settles it: in place unless mixed or the CPU's way decodes the
    // expected cold experts sooner; the figures it weighed: (rates, cold bytes a token,
    // host layers). Mixed keeps in place's placement.
    let mut mixed = a.cold_experts == ColdArg::Mixed;
    let mut weighed = None;
    let mut not_mixed = None;
    // (a way asked for is kept: mixed reads the rates only for its host memory)
    if let (Some(r), Some(Ok(p)), true) = (rates.filter(|_| a.cold_experts == ColdArg::Auto), &placement, in_place) {
        let cold = p.expected_cold_bytes(stats.as_ref(), &layer_bytes(1).sizes(MARGIN).expert, c.n_experts_used);
        if p.host_layers() > 0 {
            weighed = Some((r, cold, p.host_layers()));
            // mixed only where the host holds what it needs of its cold experts
            let need = r.mixed_host_bytes(p.host_experts, reads_copy);
            let mixed_fits = host == 0 || need <= host;
            if !mixed_fits {
                not_mixed = Some(format!(
                    "; not mixed: it would hold {:.1} GiB of host memory, more than the host's {:.1}",
                    need as f64 / GIB,
                    host as f64 / GIB
                ));
            }
            match r.decode_way_for(cold, p.host_layers(), mixed_fits, a.parallel) {
                DecodeWay::InPlace => {}
                DecodeWay::Mixed => mixed = true,
                DecodeWay::Cpu => {
                    in_place = false;
                    (shares, placement) = plan_for(false);
                }
            }
        }
    }
    let (gpu_fit, host_experts, experts_on_gpu) = match &placement {
        Some(Ok(p)) => (true, p.host_experts, p.experts_on_gpu()),
        Some(Err(_)) => (false, get("experts").1, 0),
        None => (false, get("experts").1, 0),
    };
    // mixed holds the page-locked copy the GPU reads and, where the CPU cannot read that
    // copy (types repacked for the GPU), the file's pages of the CPU's share too
    let host_need = match rates.filter(|_| mixed) {
        Some(r) => r.mixed_host_bytes(host_experts, reads_copy),
        None => host_experts,
    };
    let fits = n_gpus == 0 && bytes + state + kv <= host || gpu_fit && host_need <= host;
    if a.json {
        let mut j = serde_json::json!({
            "source": source, "params": params, "active_params": active, "weight_bytes": bytes,
            "weights": by_kind.iter().map(|(k, p, b)| serde_json::json!({"kind": k, "params": p, "bytes": b})).collect::<Vec<_>>(),
            "kv_bytes_per_token": kv_per_token, "ctx": a.ctx, "parallel": a.parallel, "kv_bytes": kv, "lightning_state_bytes": state,
            "activation_bytes": act, "gpus": n_gpus, "gpu_bytes_each": per_gpu, "host_bytes": host,
            "experts_on_gpu": experts_on_gpu, "experts": c.n_layers * c.n_experts, "host_expert_bytes": host_experts, "fits": fits,
            "host_bytes_needed": host_need,
            "cold_experts": if mixed { "mixed" } else if in_place { "in-place" } else { "cpu" },
        });
        if let Some(Err(e)) = &placement {
            j["gpu_error"] = serde_json::json!(e.to_string());
        }
        if let Some((r, cold, layers)) = weighed {
            j["auto"] = serde_json::json!({
                "cold_bytes_per_token": cold, "host_layers": layers,
                "decode_ms_in_place": r.in_place_seconds(cold) * 1e3,
                "decode_ms_cpu": r.decode_cpu_seconds(cold, layers) * 1e3,
                "decode_ms_mixed": r.decode_mixed_seconds(cold, layers) * 1e3,
            });
        }
        if let Some(Ok(sh)) = &shares {
            j["split"] = serde_json::json!(sh
                .iter()
                .enumerate()
                .map(|(g, s)| serde_json::json!({
                    "gpu": g, "first_layer": s.layers.start, "last_layer": s.layers.end - 1,
                    "resident_bytes": s.placement.resident, "experts_on_gpu": s.placement.experts_on_gpu(),
                    "gpu_expert_bytes": s.placement.gpu_experts, "host_expert_bytes": s.placement.host_experts,
                }))
                .collect::<Vec<_>>());
        }
        println!("{j}");
        return Ok(());
    }
    let g = |b: u64| b as f64 / GIB;
    println!("{source}");
    println!(
        "parameters {:.3} B, {:.2} B active per token (lm_head excluded); weights {:.2} GiB",
        params as f64 / 1e9,
        active as f64 / 1e9,
        g(bytes)
    );
    for (k, p, b) in &by_kind {
        println!("  {k:<10} {:>9.3} B params {:>9.2} GiB", *p as f64 / 1e9, g(*b));
    }
    let per_seq = if a.parallel > 1 { format!(" x {} sequences", a.parallel) } else { String::new() };
    println!(
        "KV cache {:.0} B/token ({}) x {} tokens{per_seq} = {:.2} GiB; lightning state {:.0} MiB (f32{}); activations ~{:.2} GiB at {} tokens per call (in the {:.0} GiB margin per GPU)",
        kv_per_token,
        a.kv_type,
        a.ctx,
        g(kv),
        state as f64 / (1u64 << 20) as f64,
        if a.parallel > 1 { ", every sequence's" } else { "" },
        g(act),
        b,
        g(MARGIN)
    );
    match &placement {
        None => println!("no GPU: everything in host memory, {:.2} GiB needed of {:.2} GiB", g(bytes + state + kv), g(host)),
        Some(Ok(p)) => {
            println!("{} x {:.1} GiB: {p}", n_gpus, g(per_gpu));
            if p.host_experts > 0 {
                println!(
                    "cold experts: {}",
                    if mixed {
                        "shared: the GPU reads part of each chosen one in place over PCIe while the CPU computes the rest (each expert matrix in whole 2 MiB pages on the GPU)"
                    } else if in_place {
                        "read in place by the GPU over PCIe (each expert matrix in whole 2 MiB pages on the GPU)"
                    } else {
                        "computed by the CPU, or copied to the GPU for a long batch"
                    }
                );
                if let Some((r, cold, layers)) = weighed {
                    let spread = if stats.is_some() { "by the statistics" } else { "with choices spread evenly" };
                    println!(
                        "  (auto, {spread}: {}{}; {})",
                        r.decode_comparison(cold, layers),
                        not_mixed.as_deref().unwrap_or(""),
                        rates_source.as_deref().unwrap_or("default rates")
                    );
                }
            }
            for (i, s) in shares.iter().flatten().flatten().enumerate() {
                println!("  {}", share_line(i, s));
            }
        }
        Some(Err(e)) => println!("{} x {:.1} GiB: {e}", n_gpus, g(per_gpu)),
    }
    if host > 0 {
        if host_need > host_experts {
            println!(
                "host memory {:.1} GiB; experts kept there {:.2} GiB, and {:.2} GiB more of the file's pages that the CPU reads for its share (mixed)",
                g(host),
                g(host_experts),
                g(host_need - host_experts)
            );
        } else {
            println!("host memory {:.1} GiB; experts kept there {:.2} GiB", g(host), g(host_experts));
        }
    }
    println!("{}", if fits { "fits" } else { "does NOT fit" });
    Ok(())
}

/// One placement from the GPUs' shares: each layer's row from the GPU that holds it.
fn merge(shares: &[GpuShare]) -> Placement {
    let n = shares.first().map_or(0, |s| s.placement.on_gpu.len());
    let mut on_gpu = vec![Vec::new(); n];
    for s in shares {
        for l in s.layers.clone() {
            on_gpu[l] = s.placement.on_gpu[l].clone();
        }
    }
    Placement {
        on_gpu,
        resident: shares.iter().map(|s| s.placement.resident).sum(),
        gpu_experts: shares.iter().map(|s| s.placement.gpu_experts).sum(),
        host_experts: shares.iter().map(|s| s.placement.host_experts).sum(),
    }
}

/// One GPU's share of a layer split, as `mxr plan` prints it and `mxr run --gpus` prints
/// what it placed: the same line, so that the two can be compared.
pub fn share_line(i: usize, s: &mxr_models::layer_split::GpuShare) -> String {
    let g = |b: u64| b as f64 / GIB;
    format!(
        "GPU {i}: layers {}-{}, weights + KV/state {:.2} GiB, {} experts {:.2} GiB, host {:.2} GiB",
        s.layers.start,
        s.layers.end - 1,
        g(s.placement.resident),
        s.placement.experts_on_gpu(),
        g(s.placement.gpu_experts),
        g(s.placement.host_experts)
    )
}
