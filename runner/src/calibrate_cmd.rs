//! `mxr calibrate`: how often the router picks each expert on a text, per layer, written as
//! JSON for placement (`--expert-stats`): the GPU keeps the most used experts when it cannot
//! hold them all.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use mxr_models::forward::Logits;
use mxr_models::placement::ExpertStats;

use crate::run_cmd::{load, ModelArgs};

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to route.
    #[arg(short, long)]
    pub file: PathBuf,
    /// Where to write the statistics (JSON).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Tokens per window (each window starts a fresh sequence).
    #[arg(long = "ctx", default_value_t = 512)]
    pub window: usize,
    /// Route at most this many tokens (0 = the whole text).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    if a.window == 0 {
        bail!("--ctx must be at least 1 token");
    }
    let l = load(&a.model)?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut ids = l.tokenizer.encode(&text)?;
    if a.max_tokens > 0 {
        ids.truncate(a.max_tokens);
    }
    if ids.is_empty() {
        bail!("{} has no tokens to route", a.file.display());
    }
    let c = &l.model.config;
    let mut counts = vec![vec![0u64; c.n_experts]; c.n_layers];
    let started = Instant::now();
    for w in ids.chunks(a.window) {
        let mut st = l.new_state()?;
        for chunk in w.chunks(512) {
            l.forward(&mut st, chunk, Logits::Last)?;
        }
        let s = l.backend.to_session(&st)?;
        for (acc, layer) in counts.iter_mut().zip(&s.expert_counts) {
            acc.iter_mut().zip(layer).for_each(|(a, &b)| *a += b);
        }
    }
    let stats = ExpertStats { tokens: ids.len() as u64, counts };
    let tmp = a.output.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&stats.to_json())? + "\n")
        .and_then(|_| std::fs::rename(&tmp, &a.output))
        .with_context(|| format!("writing {}", a.output.display()))?;
    // How concentrated the routing is: the share of choices the top quarter of experts takes.
    let quarter = c.n_experts.div_ceil(4);
    let shares: Vec<String> = stats
        .counts
        .iter()
        .map(|row| {
            let mut r = row.clone();
            r.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = r.iter().sum();
            format!("{:.0}%", 100.0 * r[..quarter].iter().sum::<u64>() as f64 / total.max(1) as f64)
        })
        .collect();
    eprintln!(
        "routed {} tokens in {:.1} s; top {quarter} of {} experts take per layer: {}",
        stats.tokens,
        started.elapsed().as_secs_f64(),
        c.n_experts,
        shares.join(" ")
    );
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
