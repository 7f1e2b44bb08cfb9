//! `mxr convert` and `mxr synth`: the command-line side (options, progress bar, summary)
//! of mxr-convert.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mxr_convert::synth::{synth, tiny_config, Router, SynthOptions};
use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_models::config::{hf::from_hf_json, minimax_text_01};
use mxr_models::layers::pattern_from_interval;
use mxr_models::{Config, LayerKind};
use mxr_quant::QType;

use crate::interrupt::{Interrupt, EXIT_INTERRUPTED};

#[derive(Args)]
pub struct ConvertArgs {
    /// Checkpoint directory: config.json, model.safetensors(.index.json), tokenizer.json.
    pub checkpoint: PathBuf,
    /// Output GGUF file (default: ./<checkpoint name>-<type>.gguf).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Type of the matrices: f32, f16, bf16, q8_0, q4_0, q4_k, q6_k.
    #[arg(long = "type", default_value = "q8_0", value_parser = parse_qtype)]
    pub qtype: QType,
    /// Type of the expert matrices (default: --type).
    #[arg(long, value_parser = parse_qtype)]
    pub expert_type: Option<QType>,
    /// Quantizer threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
}

fn parse_qtype(s: &str) -> Result<QType, String> {
    QType::parse(s).ok_or_else(|| format!("unknown type `{s}` (f32, f16, bf16, q8_0, q4_0, q4_k, q6_k)"))
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style =
        ProgressStyle::with_template("{spinner} {msg:24!} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

/// Peak resident memory of this process (Linux VmHWM), bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

pub fn run_convert(a: ConvertArgs) -> Result<()> {
    let types = TypePlan { weights: a.qtype, experts: a.expert_type.unwrap_or(a.qtype) };
    let name = a.checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let out = a.output.unwrap_or_else(|| PathBuf::from(format!("{name}-{}.gguf", types.experts.to_string().to_lowercase())));
    let mut opts = ConvertOptions::new(types);
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    // Ctrl-C: remove the temporary file the writer fills (NAME.tmp-PID beside the output)
    // and leave; the output itself appears only by the final rename.
    let tmp =
        out.with_file_name(format!("{}.tmp-{}", out.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id()));
    let shown = out.display().to_string();
    Interrupt::install_with(move || {
        let _ = std::fs::remove_file(&tmp);
        eprintln!("\nmxr: interrupted; nothing was written to {shown}");
        std::process::exit(EXIT_INTERRUPTED as i32);
    })?;
    let pb = bar(0, "converting");
    let report = convert(&a.checkpoint, &out, &opts, &|p| {
        if pb.length() != Some(p.input_total) {
            pb.set_length(p.input_total);
        }
        pb.set_position(p.input_done);
        pb.set_message(p.tensor.to_string());
    })
    .with_context(|| format!("converting {}", a.checkpoint.display()));
    pb.finish_and_clear();
    let report = report?;
    for name in &report.unused {
        eprintln!("warning: checkpoint tensor `{name}` is not used");
    }
    if !report.config.llama_cpp_residual_exact() {
        eprintln!("warning: residual alpha/beta differ between sites; llama.cpp reads only minimax-01.residual_scale, mxr reads the exact mxr.residual.* keys");
    }
    let gb = |b: u64| b as f64 / 1e9;
    eprintln!(
        "wrote {} ({} tensors, {:.2} GB from {:.2} GB of input, {} in {:.1} s = {:.2} GB/s of input, {} zero-embedding tokens suppressed)",
        report.output.display(),
        report.tensors,
        gb(report.output_bytes),
        gb(report.input_bytes),
        describe(types),
        report.seconds,
        gb(report.input_bytes) / report.seconds.max(1e-9),
        report.suppressed_tokens
    );
    if let Some(rss) = peak_rss() {
        eprintln!("peak RSS {:.2} GiB", rss as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}

fn describe(t: TypePlan) -> String {
    if t.weights == t.experts {
        format!("{}", t.weights)
    } else {
        format!("{} (experts {})", t.weights, t.experts)
    }
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output checkpoint directory (must not exist).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Starting configuration: minimax-text-01 (the real dimensions) or tiny.
    #[arg(long, default_value = "minimax-text-01")]
    pub preset: String,
    /// Start from this HF config.json instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Layers (pattern by the real rule: softmax every 8th).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Explicit layer pattern, one letter per layer: L lightning, S softmax (e.g. LS).
    #[arg(long)]
    pub pattern: Option<String>,
    #[arg(long)]
    pub experts: Option<usize>,
    #[arg(long)]
    pub experts_used: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    #[arg(long)]
    pub dim: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub head_dim: Option<usize>,
    #[arg(long)]
    pub rotary_dim: Option<usize>,
    /// Expert FFN width.
    #[arg(long)]
    pub ffn: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Largest shard in GB.
    #[arg(long, default_value_t = 5.0)]
    pub shard_gb: f64,
    /// Expert popularity: uniform, or zipf:S (e.g. zipf:1.1).
    #[arg(long, default_value = "uniform")]
    pub router: String,
    /// BPE vocabulary of the generated tokenizer (before its 4 special tokens).
    #[arg(long, default_value_t = 1024)]
    pub tokenizer_vocab: usize,
    #[arg(short, long)]
    pub threads: Option<usize>,
}

fn synth_config(a: &SynthArgs) -> Result<Config> {
    let mut c = match (&a.config, a.preset.as_str()) {
        (Some(p), _) => {
            from_hf_json(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?, &p.display().to_string())?
        }
        (None, "minimax-text-01") => minimax_text_01(),
        (None, "tiny") => tiny_config(),
        (None, other) => bail!("unknown preset `{other}` (minimax-text-01, tiny)"),
    };
    let set = |field: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut c.n_experts, a.experts);
    set(&mut c.n_experts_used, a.experts_used);
    set(&mut c.vocab_size, a.vocab);
    set(&mut c.dim, a.dim);
    set(&mut c.n_heads, a.heads);
    set(&mut c.n_kv_heads, a.kv_heads);
    set(&mut c.head_dim, a.head_dim);
    set(&mut c.rotary_dim, a.rotary_dim);
    set(&mut c.hidden_dim, a.ffn);
    if let Some(n) = a.layers {
        c.n_layers = n;
        c.layers = pattern_from_interval(n, 8);
    }
    if let Some(p) = &a.pattern {
        c.layers = p
            .chars()
            .map(|ch| match ch {
                'L' | 'l' => Ok(LayerKind::Lightning),
                'S' | 's' => Ok(LayerKind::Softmax),
                other => bail!("--pattern: `{other}` is not L (lightning) or S (softmax)"),
            })
            .collect::<Result<_>>()?;
        c.n_layers = c.layers.len();
    }
    c.validate("synth options")?;
    Ok(c)
}

fn parse_router(s: &str) -> Result<Router> {
    match s.split_once(':') {
        None if s == "uniform" => Ok(Router::Uniform),
        Some(("zipf", v)) => Ok(Router::Zipf(v.parse().with_context(|| format!("--router zipf:{v}: not a number"))?)),
        _ => bail!("--router {s}: expected uniform or zipf:S"),
    }
}

pub fn run_synth(a: SynthArgs) -> Result<()> {
    let config = synth_config(&a)?;
    let opts = SynthOptions {
        config,
        seed: a.seed,
        shard_bytes: (a.shard_gb * 1e9) as u64,
        router: parse_router(&a.router)?,
        tokenizer_vocab: a.tokenizer_vocab,
        threads: a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    let started = Instant::now();
    let pb = bar(0, "generating");
    let report = synth(&a.output, &opts, &|done, total| {
        if pb.length() != Some(total) {
            pb.set_length(total);
        }
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let report = report.with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({} tensors, {} shards, {:.2} GB in {:.1} s)",
        display(&report.dir),
        report.tensors,
        report.shards,
        report.bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
