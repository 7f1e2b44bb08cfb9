//! `mxr run`: one prompt in, streamed text out (llama.cpp's `llama-cli -p` conventions),
//! timings on stderr; `--dump-logits` writes every prompt position's logits as .npy.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::KvType;
use mxr_models::engine::{Backend, State};
use mxr_models::forward::Logits;
use mxr_models::layers::PatternSummary;
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
    /// or --n-cpu-moe (llama.cpp's meaning), else in-place unless the measured rates say the
    /// CPU's way decodes a token sooner, counting 0.05 ms a layer for the exchange with the host
    /// (docs/offload.md).
    #[arg(long, value_enum, default_value_t = ColdArg::Auto)]
    pub cold_experts: ColdArg,
    /// Sequences whose decode steps run side by side on the GPU (`mxr bench --parallel`,
    /// `mxr run --prompts`; set by the command, not a flag): above one, auto's in place
    /// turns to mixed, and the placement keeps room for each one's KV cache and states.
    #[arg(skip)]
    pub side_by_side: usize,
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
    /// The sampler of the options and its seed (from the clock unless given).
    pub fn sampler(&self) -> (Sampler, u64) {
        let seed = self
            .seed
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        (self.sampler_seeded(seed), seed)
    }

    /// The sampler of the options with this seed.
    pub fn sampler_seeded(&self, seed: u64) -> Sampler {
        let cfg = SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        };
        Sampler::new(cfg)
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompt text (else -f FILE, --prompt-tokens, --prompts FILE, or standard input).
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short, long, conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
    /// The prompt as token ids: 1,2,3.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "file"])]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Many prompts, one per line (blank lines skipped; \n in a line is a new line, \\ a
    /// backslash): each is completed as -p would (sequence i samples with seed + i) and
    /// printed as a JSON line {"index", "prompt", "completion", "prompt_tokens",
    /// "completion_tokens", "finish_reason"} in the file's order.
    #[arg(long, conflicts_with_all = ["prompt", "file", "prompt_tokens", "dump_logits"])]
    pub prompts: Option<PathBuf>,
    /// With --prompts: sequences decoded at once, each new prompt taking the place of one
    /// that ends (default: up to 8): side by side on one GPU (each one's KV cache and states
    /// count against --gpu-mem), in one pass a step on the CPU (each weight read once for
    /// all). Over several GPUs, and with 1, one after another.
    #[arg(long)]
    pub parallel: Option<usize>,
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
        // every call, decode included (a GPU's decode step has looked on the device)
        let checked = self.backend.forward_with(&self.model, state, tokens, which, |out| finite(out, f))?;
        self.non_finite(state, checked)
    }

    /// An empty sequence whose decode steps may be in flight beside other sequences'
    /// (`mxr bench --parallel`; one GPU).
    pub fn new_lane_state(&self) -> Result<State> {
        Ok(self.backend.new_lane_state(self.ctx)?)
    }

    /// Launches the decode step of `token` without waiting ([`Loaded::decode_finish`]
    /// takes its logits).
    pub fn decode_start(&self, state: &mut State, token: u32) -> Result<()> {
        Ok(self.backend.decode_start(&self.model, state, token)?)
    }

    /// Whether the step [`Loaded::decode_start`] launched is done.
    pub fn decode_ready(&self, state: &State) -> Result<bool> {
        Ok(self.backend.decode_ready(state)?)
    }

    /// The logits of the step [`Loaded::decode_start`] launched, checked as
    /// [`Loaded::forward_with`]'s.
    pub fn decode_finish<R>(&self, state: &mut State, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let checked = self.backend.decode_finish(state, |out| finite(out, f))?;
        self.non_finite(state, checked)
    }

    /// One decode step of several sequences in one pass (the CPU): logits [sequences,
    /// vocab], each row checked as [`Loaded::forward_with`]'s.
    pub fn decode_many(&self, states: &mut [&mut State], tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.backend.decode_many(&self.model, states, tokens)?;
        let vocab = self.model.config.vocab_size.max(1);
        for (row, state) in logits.chunks(vocab).zip(states.iter()) {
            self.non_finite(state, finite(mxr_models::LogitsOut::unchecked(row), |_| ()))?;
        }
        Ok(logits)
    }

    /// A non-finite logit (value, index, count of logits) as an error naming its token and
    /// position.
    fn non_finite<R>(&self, state: &State, checked: std::result::Result<R, (f32, usize, usize)>) -> Result<R> {
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

/// `f` on the logits if they are finite, else (the first non-finite value, its index, the
/// count of logits).
fn finite<R>(out: mxr_models::LogitsOut<'_>, f: impl FnOnce(&[f32]) -> R) -> std::result::Result<R, (f32, usize, usize)> {
    let logits = out.logits;
    match out.first_non_finite() {
        Some(i) => Err((logits.get(i).copied().unwrap_or(f32::NAN), i, logits.len())),
        None => Ok(f(logits)),
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
    let backend = crate::backend::backend(a, &model, threads, ctx)?;
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

/// The tokens of a prompt's text: as it is, or with --chat in the model's chat template as
/// a user turn (after --system's).
pub fn prompt_tokens(l: &Loaded, a: &RunArgs, text: &str) -> Result<Vec<u32>> {
    if !a.chat {
        return l.tokenizer.encode(text);
    }
    let template = l.tokenizer.chat_template.as_deref().context("the model has no chat template (tokenizer.chat_template)")?;
    let mut msgs = Vec::new();
    if let Some(s) = &a.system {
        msgs.push(Message::new("system", s));
    }
    msgs.push(Message::new("user", text));
    l.tokenizer.encode(&render(template, &msgs, true)?)
}

/// A drawn token as a reply takes it: a stop token ends the reply (None); any other joins
/// `history` and gives the text it completes (empty inside a character).
pub fn take_token(l: &Loaded, stream: &mut StreamDecoder, history: &mut Vec<u32>, next: u32) -> Result<Option<String>> {
    if l.tokenizer.stop.contains(&next) {
        return Ok(None);
    }
    history.push(next);
    stream.push(&l.tokenizer, next).map(Some)
}

pub fn run(mut a: RunArgs) -> Result<()> {
    if a.prompts.is_some() {
        return crate::run_many::run(a);
    }
    if a.parallel.is_some() {
        bail!("--parallel decodes the lines of --prompts FILE side by side: give --prompts");
    }
    let l = load(&a.model)?;
    let tokens = match a.prompt_tokens.take() {
        Some(t) => t,
        None => prompt_tokens(&l, &a, &prompt_text(&a)?)?,
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
        let Some(text) = take_token(&l, &mut stream, &mut history, next)? else { break };
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
