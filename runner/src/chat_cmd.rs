//! `mxr chat`: an interactive REPL over one [`Session`]. Each turn renders the whole
//! conversation with the chat template; the text the session has already consumed (earlier
//! renderings plus the replies as generated) is a prefix of it, so only the rest is
//! tokenized and fed: history is never re-read. Ctrl-C stops the reply being generated and returns to the prompt; Ctrl-D or
//! /exit leaves. A line ending in `\` continues on the next line.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use mxr_models::engine::{Backend, State};
use mxr_models::forward::Logits;
use mxr_models::Session;
use rustyline::error::ReadlineError;
use serde_json::json;

use crate::interrupt::Interrupt;
use crate::run_cmd::{load, Loaded, ModelArgs, SamplingArgs};
use crate::sampler::Sampler;
use crate::template::{render, Message};
use crate::tokenizer::StreamDecoder;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long, default_value_t = 1024)]
    pub n_predict: usize,
    /// With experts in host memory: after each reply, move the experts this process has
    /// used most onto the GPU in place of the least used resident ones (same memory).
    #[arg(long)]
    pub expert_rebalance: bool,
}

/// The REPL's commands, with one help text.
pub const COMMANDS: &[(&str, &str)] = &[
    ("/help", "show this help"),
    ("/reset", "forget the conversation (keeps the system prompt)"),
    ("/system TEXT", "set the system prompt and start over"),
    ("/stats", "tokens in context, speed of the last reply"),
    ("/save FILE", "save the conversation and the model state"),
    ("/load FILE", "resume a conversation saved with /save"),
    ("/exit", "leave (also Ctrl-D)"),
];

/// Routing counts, [layer][expert].
type Counts = Vec<Vec<u64>>;

struct Chat {
    l: Loaded,
    sampler: Sampler,
    session: State,
    system: Option<String>,
    messages: Vec<Message>,
    /// The text the session has consumed: rendered prompts and generated replies.
    seen: String,
    n_predict: usize,
    last: Option<(usize, f64, usize, f64)>,
    interrupted: Interrupt,
    /// `--expert-rebalance`: routing counts over this process's life, and the current
    /// session's counts when last read.
    rebalance: Option<(Counts, Counts)>,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let l = load(&a.model)?;
    let (sampler, seed) = a.sampling.sampler();
    eprintln!("seed {seed}; /help for commands");
    let interrupted = Interrupt::install()?;
    let session = l.new_state()?;
    let mut chat = Chat {
        l,
        sampler,
        session,
        system: a.system,
        messages: Vec::new(),
        seen: String::new(),
        n_predict: a.n_predict,
        last: None,
        interrupted,
        rebalance: None,
    };
    if a.expert_rebalance {
        match &chat.l.backend {
            Backend::Cuda(g) if g.offloaded || g.in_place_bytes > 0 => {
                let zeros = vec![vec![0u64; chat.l.model.config.n_experts]; chat.l.model.config.n_layers];
                chat.rebalance = Some((zeros.clone(), zeros));
            }
            Backend::Split(m) if m.parts.iter().any(|p| p.offloaded || p.in_place_bytes > 0) => {
                eprintln!("--expert-rebalance: not yet for a model split over several GPUs; experts stay where they were placed")
            }
            _ => eprintln!("--expert-rebalance: every expert is on one device; nothing to rebalance"),
        }
    }
    let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
    loop {
        let mut input = String::new();
        let mut prompt = "> ";
        loop {
            match rl.readline(prompt) {
                Ok(line) => {
                    if let Some(head) = line.strip_suffix('\\') {
                        input.push_str(head);
                        input.push('\n');
                        prompt = "... ";
                        continue;
                    }
                    input.push_str(&line);
                    break;
                }
                Err(ReadlineError::Interrupted) => {
                    input.clear();
                    break;
                }
                Err(ReadlineError::Eof) => return Ok(()),
                // the line was read and is dropped; the next one is read as usual
                Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    eprintln!("(that line is not valid UTF-8; it was ignored)");
                    input.clear();
                    prompt = "> ";
                }
                Err(e) => return Err(anyhow::anyhow!("reading input: {e}")),
            }
        }
        let text = input.trim();
        if text.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(text);
        match chat.command(text) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
}

impl Chat {
    /// Handles one input; Ok(true) means leave.
    fn command(&mut self, text: &str) -> Result<bool> {
        let (cmd, arg) = text.split_once(' ').map_or((text, ""), |(c, a)| (c, a.trim()));
        match cmd {
            "/exit" | "/quit" => return Ok(true),
            "/help" => COMMANDS.iter().for_each(|(c, h)| eprintln!("  {c:<14} {h}")),
            "/reset" => self.reset()?,
            "/system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_string());
                self.reset()?;
            }
            "/stats" => self.stats(),
            "/save" => self.save(Path::new(arg))?,
            "/load" => self.load_file(Path::new(arg))?,
            c if c.starts_with('/') => eprintln!("unknown command {c}; /help lists them"),
            _ => self.turn(text)?,
        }
        Ok(false)
    }

    fn reset(&mut self) -> Result<()> {
        self.messages.clear();
        self.seen.clear();
        self.session = self.l.new_state()?;
        eprintln!("(conversation cleared)");
        Ok(())
    }

    fn stats(&self) {
        eprintln!("context: {} of {} tokens; {} messages", self.session.pos(), self.l.ctx, self.messages.len());
        if let Some((np, ps, ng, gs)) = self.last {
            eprintln!(
                "last reply: prompt {np} tokens at {:.1} tokens/s, {ng} tokens generated at {:.1} tokens/s",
                np as f64 / ps.max(1e-9),
                ng as f64 / gs.max(1e-9)
            );
        }
    }

    fn conversation(&self) -> Vec<Message> {
        self.system.iter().map(|s| Message::new("system", s)).chain(self.messages.iter().cloned()).collect()
    }

    fn turn(&mut self, text: &str) -> Result<()> {
        let template = self.l.tokenizer.chat_template.clone().context("the model has no chat template")?;
        self.messages.push(Message::new("user", text));
        let rendered = render(&template, &self.conversation(), true)?;
        // Only the text the session has not consumed (all of it if the template rewrote history).
        let new = match rendered.strip_prefix(self.seen.as_str()) {
            Some(rest) => self.l.tokenizer.encode(rest)?,
            None => {
                self.session = self.l.new_state()?;
                self.l.tokenizer.encode(&rendered)?
            }
        };
        if self.session.pos() + new.len() + self.n_predict.min(64) > self.l.ctx {
            self.messages.pop();
            anyhow::bail!(
                "the conversation ({} tokens) would overflow the context of {}: /reset or raise --ctx-size",
                self.session.pos() + new.len(),
                self.l.ctx
            );
        }
        self.seen = rendered;
        let c = &self.l.model.config;
        let started = Instant::now();
        let mut logits = Vec::new();
        self.interrupted.clear();
        for chunk in new.chunks(512) {
            if self.interrupted.take() {
                // Ctrl-C during a long prompt: the session holds part of it, so drop the
                // turn and the session; the next turn reads the conversation anew.
                self.messages.pop();
                self.seen.clear();
                self.session = self.l.new_state()?;
                eprintln!("(interrupted while reading the prompt; this turn was dropped)");
                return Ok(());
            }
            logits = self.l.forward(&mut self.session, chunk, Logits::Last)?;
        }
        if logits.is_empty() {
            logits = vec![0.0; c.vocab_size];
        }
        let prompt_s = started.elapsed().as_secs_f64();
        let (mut reply, mut stream, mut n, mut reply_done) = (String::new(), StreamDecoder::new(), 0, false);
        let gen_start = Instant::now();
        let mut out = std::io::stdout().lock();
        // the token drawn from the last forward pass's logits where they lie (a GPU's decode
        // step: its page-locked buffer) rather than from a copy; drawn only where the loop
        // goes on, so that the sampler's draws are those of drawing at the loop's top
        let mut drawn = None;
        while n < self.n_predict && self.session.pos() < self.l.ctx {
            if self.interrupted.take() {
                write!(out, " [stopped]").ok();
                break;
            }
            let next = match drawn.take() {
                Some(t) => t,
                None => self.sampler.sample(&logits, self.session.tokens(), &self.l.tokenizer.suppress),
            };
            n += 1;
            let is_stop = self.l.tokenizer.stop.contains(&next);
            let goes_on = !is_stop && n < self.n_predict && self.session.pos() + 1 < self.l.ctx;
            // the penalty's window of the history the next draw sees
            let tokens = self.session.tokens();
            let mut recent = tokens[tokens.len().saturating_sub(self.sampler.window())..].to_vec();
            recent.push(next);
            let (sampler, suppress) = (&mut self.sampler, &self.l.tokenizer.suppress);
            drawn =
                self.l.forward_with(&mut self.session, &[next], Logits::Last, |x| goes_on.then(|| sampler.sample(x, &recent, suppress)))?;
            if is_stop {
                self.seen.push_str(&reply);
                reply_done = true;
                self.seen.push_str(&self.l.tokenizer.decode(&[next])?);
                break;
            }
            let piece = stream.push(&self.l.tokenizer, next)?;
            reply.push_str(&piece);
            out.write_all(piece.as_bytes()).and_then(|_| out.flush()).context("writing the reply")?;
        }
        writeln!(out).ok();
        if !reply_done {
            self.seen.push_str(&reply);
        }
        self.last = Some((new.len(), prompt_s, n, gen_start.elapsed().as_secs_f64()));
        self.messages.push(Message::new("assistant", &reply));
        self.rebalance_experts()
    }

    /// `--expert-rebalance`, between requests: adds this session's new routing counts to
    /// the process's totals and exchanges experts between host and GPU by them.
    fn rebalance_experts(&mut self) -> Result<()> {
        let Some((total, last)) = self.rebalance.as_mut() else { return Ok(()) };
        let now = self.l.backend.expert_counts(&self.session)?;
        for ((t, l), n) in total.iter_mut().zip(last.iter()).zip(&now) {
            for ((t, &l), &n) in t.iter_mut().zip(l).zip(n) {
                // a new session (reset, reload) starts its counts again from zero
                *t += if n >= l { n - l } else { n };
            }
        }
        *last = now;
        let Backend::Cuda(g) = &mut self.l.backend else { return Ok(()) };
        let swaps = g.rebalance(&self.l.model, total, 0.25)?;
        if !swaps.is_empty() {
            let moved: Vec<String> = swaps.iter().map(|s| format!("{}:{}<-{}", s.layer, s.demote, s.promote)).collect();
            eprintln!("(expert rebalance: {} experts moved to the GPU, layer:out<-in {})", swaps.len(), moved.join(" "));
        }
        Ok(())
    }

    fn save(&self, path: &Path) -> Result<()> {
        anyhow::ensure!(!path.as_os_str().is_empty(), "/save needs a file name");
        let msgs: Vec<_> = self.messages.iter().map(|m| json!({"role": m.role, "text": m.text})).collect();
        let extra = json!({"system": self.system, "messages": msgs, "seen": self.seen}).to_string();
        self.l.backend.to_session(&self.session)?.save(&self.l.model, path, extra.as_bytes())?;
        eprintln!("(saved {} tokens to {})", self.session.pos(), path.display());
        Ok(())
    }

    fn load_file(&mut self, path: &Path) -> Result<()> {
        anyhow::ensure!(!path.as_os_str().is_empty(), "/load needs a file name");
        let (session, extra) = Session::load(&self.l.model, path)?;
        let j: serde_json::Value = serde_json::from_slice(&extra).context("the saved conversation is not valid JSON")?;
        let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
        self.messages = j["messages"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(|m| Message::new(&text(m, "role"), &text(m, "text")))
            .collect();
        self.system = j["system"].as_str().map(str::to_string);
        self.seen = text(&j, "seen");
        self.session = self.l.backend.from_session(session, self.l.ctx)?;
        eprintln!("(resumed {} messages, {} tokens)", self.messages.len(), self.session.pos());
        Ok(())
    }
}
