//! `mxr run --prompts FILE`: many prompts, one per line, each completed as `mxr run -p`
//! completes one (sequence i samples with seed + i), printed as JSON lines in the file's
//! order. On one GPU up to `--parallel` sequences decode side by side, each on a lane of its
//! own: whichever step ends first is sampled and launched again, so the GPU runs one
//! sequence's attention, resident experts and lm_head while another's step waits for cold
//! experts on the CPU (issue 7; `mxr bench --parallel` measures the same loop). On the CPU
//! the sequences decode in one pass a step (`decode_many`: each weight read once for all of
//! them). A new prompt takes the place of a sequence that ends; its prefill runs once the
//! steps in flight are done. With several GPUs, or `--parallel 1`, the sequences run one
//! after another.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mxr_models::engine::{Backend, State};
use mxr_models::forward::Logits;

use crate::interrupt::{Interrupt, Interrupted};
use crate::run_cmd::{load, prompt_tokens, take_token, Loaded, RunArgs};
use crate::sampler::Sampler;
use crate::tokenizer::StreamDecoder;

/// At most this many sequences side by side unless --parallel says otherwise.
pub const DEFAULT_PARALLEL: usize = 8;

/// The prompts of a --prompts file: its non-blank lines, `\n` read as a new line and `\\`
/// as a backslash (any other backslash stays), each with its line number.
pub fn parse_prompts(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let mut out = String::with_capacity(l.len());
            let mut chars = l.chars().peekable();
            while let Some(c) = chars.next() {
                match (c, chars.peek()) {
                    ('\\', Some('n')) => {
                        out.push('\n');
                        chars.next();
                    }
                    ('\\', Some('\\')) => {
                        out.push('\\');
                        chars.next();
                    }
                    _ => out.push(c),
                }
            }
            (i + 1, out)
        })
        .collect()
}

fn read_prompts(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading prompts file {}", path.display()))?;
    let prompts = parse_prompts(&text);
    if prompts.is_empty() {
        bail!("{}: no prompts (one a line; blank lines are skipped)", path.display());
    }
    Ok(prompts)
}

/// How the sequences' decode steps run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// one GPU: side by side, each on a lane of its own
    Lanes,
    /// the CPU: all of them in one pass
    OnePass,
    /// one after another
    InTurn,
}

/// One prompt's sequence while it is being completed.
struct Seq {
    index: usize,
    prompt: String,
    prompt_len: usize,
    state: State,
    sampler: Sampler,
    /// prompt and generated tokens (the repetition penalty's window)
    history: Vec<u32>,
    stream: StreamDecoder,
    text: String,
    generated: usize,
    /// drawn from the latest logits, not taken yet
    drawn: Option<u32>,
    /// a step launched on the sequence's lane whose logits are not taken yet
    in_flight: bool,
    /// the token of the next step, for the pass over every sequence (`Way::OnePass`)
    queued: Option<u32>,
    finish: Option<&'static str>,
}

impl Seq {
    /// Takes the drawn token as run does: a stop token ends the sequence, else it is the
    /// reply's next; true when the sequence goes on.
    fn take(&mut self, l: &Loaded, next: u32, n_predict: usize) -> Result<bool> {
        self.generated += 1;
        let Some(text) = take_token(l, &mut self.stream, &mut self.history, next)? else {
            self.finish = Some("stop");
            return Ok(false);
        };
        self.text += &text;
        if self.generated == n_predict {
            self.finish = Some("length");
            return Ok(false);
        }
        Ok(true)
    }

    /// The next step: launched on the lane, queued for the pass over every sequence, or
    /// run now and its token drawn.
    fn step(&mut self, l: &Loaded, token: u32, way: Way) -> Result<()> {
        match way {
            Way::Lanes => {
                l.decode_start(&mut self.state, token)?;
                self.in_flight = true;
            }
            Way::OnePass => self.queued = Some(token),
            Way::InTurn => self.drawn = Some(self.draw_after(l, token)?),
        }
        Ok(())
    }

    /// Decodes `token` alone and draws the next.
    fn draw_after(&mut self, l: &Loaded, token: u32) -> Result<u32> {
        let (sampler, history, suppress) = (&mut self.sampler, &self.history, &l.tokenizer.suppress);
        l.forward_with(&mut self.state, &[token], Logits::Last, |x| sampler.sample(x, history, suppress))
    }

    /// The logits of the step in flight, drawn from.
    fn land(&mut self, l: &Loaded) -> Result<()> {
        let (sampler, history, suppress) = (&mut self.sampler, &self.history, &l.tokenizer.suppress);
        self.drawn = Some(l.decode_finish(&mut self.state, |x| sampler.sample(x, history, suppress))?);
        self.in_flight = false;
        Ok(())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "index": self.index,
            "prompt": self.prompt,
            "completion": self.text,
            "prompt_tokens": self.prompt_len,
            // a stop token ends the completion without being part of it
            "completion_tokens": self.generated - usize::from(self.finish == Some("stop")),
            "finish_reason": self.finish,
        })
    }
}

pub fn run(mut a: RunArgs) -> Result<()> {
    let path = a.prompts.clone().context("--prompts FILE")?;
    let lines = read_prompts(&path)?;
    if a.parallel == Some(0) {
        bail!("--parallel must be at least 1");
    }
    let asked = a.parallel.unwrap_or(lines.len().min(DEFAULT_PARALLEL)).min(lines.len());
    // decides the way of cold experts and the room for states (several sequences' KV)
    a.model.side_by_side = asked;
    let l = load(&a.model)?;
    let (p, way) = match (&l.backend, a.parallel) {
        (Backend::Split(_), Some(n)) if n > 1 => {
            bail!("--parallel decodes sequences side by side on one GPU or in one pass on the CPU; this run is on {}", l.backend.name())
        }
        (Backend::Split(_), _) => (1, Way::InTurn),
        _ if asked == 1 => (1, Way::InTurn),
        (Backend::Cuda(_), _) => (asked, Way::Lanes),
        (Backend::Cpu(_), _) => (asked, Way::OnePass),
    };
    let mut waiting = VecDeque::new();
    for (index, (line, text)) in lines.into_iter().enumerate() {
        let tokens = prompt_tokens(&l, &a, &text)?;
        if tokens.is_empty() {
            bail!("{} line {line}: the prompt has no tokens", path.display());
        }
        if tokens.len() + a.n_predict > l.ctx {
            bail!(
                "{} line {line}: prompt ({} tokens) + -n {} exceeds the context of {} tokens (raise --ctx-size)",
                path.display(),
                tokens.len(),
                a.n_predict,
                l.ctx
            );
        }
        waiting.push_back((index, text, tokens));
    }
    let total = waiting.len();
    let (_, seed) = a.sampling.sampler();
    let how = match way {
        Way::Lanes => format!("{p} sequences side by side"),
        Way::OnePass => format!("{p} sequences in one pass a step"),
        Way::InTurn => "one sequence at a time".into(),
    };
    eprintln!("{total} prompts, {how}; seed {seed} (sequence i: seed + i)");
    let stop = Interrupt::install()?;
    let started = Instant::now();
    let (mut prefill_s, mut prompt_tokens_read, mut generated) = (0.0, 0, 0);
    let mut active: Vec<Seq> = Vec::new();
    // finished, waiting for those before them to be printed
    let mut done: BTreeMap<usize, serde_json::Value> = BTreeMap::new();
    let mut printed = 0;
    let mut out = std::io::stdout().lock();
    while printed < total {
        if stop.requested() {
            return Err(Interrupted(format!("after {printed} of {total} sequences were printed")).into());
        }
        if active.len() < p && !waiting.is_empty() {
            // prefills run on the GPU's main stream: first the steps in flight end
            for s in active.iter_mut().filter(|s| s.in_flight) {
                s.land(&l)?;
            }
            while active.len() < p {
                let Some((index, prompt, tokens)) = waiting.pop_front() else { break };
                let t = Instant::now();
                let mut state = if way == Way::Lanes { l.new_lane_state()? } else { l.new_state()? };
                let mut last = Vec::new();
                for chunk in tokens.chunks(a.batch_size.max(1)) {
                    if stop.requested() {
                        return Err(
                            Interrupted(format!("reading prompt {index}, after {printed} of {total} sequences were printed")).into()
                        );
                    }
                    last = l.forward(&mut state, chunk, Logits::Last)?;
                }
                prefill_s += t.elapsed().as_secs_f64();
                prompt_tokens_read += tokens.len();
                let mut sampler = a.sampling.sampler_seeded(seed.wrapping_add(index as u64));
                let vocab = l.model.config.vocab_size;
                let last = last
                    .get(last.len().saturating_sub(vocab)..)
                    .filter(|v| v.len() == vocab)
                    .with_context(|| format!("prompt {index} gave {} logits, not the vocabulary's {vocab}", last.len()))?;
                let first = (a.n_predict > 0).then(|| sampler.sample(last, &tokens, &l.tokenizer.suppress));
                active.push(Seq {
                    index,
                    prompt,
                    prompt_len: tokens.len(),
                    state,
                    sampler,
                    history: tokens,
                    stream: StreamDecoder::new(),
                    text: String::new(),
                    generated: 0,
                    drawn: first,
                    in_flight: false,
                    queued: None,
                    finish: (a.n_predict == 0).then_some("length"),
                });
            }
        }
        // every drawn token taken, and the sequences that go on stepped
        let mut took = false;
        for s in active.iter_mut() {
            if let Some(t) = s.drawn.take() {
                took = true;
                if s.take(&l, t, a.n_predict)? {
                    s.step(&l, t, way)?;
                }
            }
        }
        // the CPU: every queued step in one pass
        let (mut states, mut queued, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for s in active.iter_mut() {
            if let Some(t) = s.queued.take() {
                states.push(&mut s.state);
                queued.push(t);
                owners.push(s.index);
            }
        }
        if !queued.is_empty() {
            let logits = l.decode_many(&mut states, &queued)?;
            let vocab = l.model.config.vocab_size;
            for (row, index) in logits.chunks(vocab).zip(owners) {
                if let Some(s) = active.iter_mut().find(|s| s.index == index) {
                    s.drawn = Some(s.sampler.sample(row, &s.history, &l.tokenizer.suppress));
                }
            }
            took = true;
        }
        for s in active.iter().filter(|s| s.finish.is_some()) {
            generated += s.generated;
            done.insert(s.index, s.json());
        }
        active.retain(|s| s.finish.is_none());
        while let Some(line) = done.remove(&printed) {
            writeln!(out, "{line}").and_then(|_| out.flush()).context("writing to standard output")?;
            printed += 1;
        }
        // the steps that are done give their tokens
        for s in active.iter_mut().filter(|s| s.in_flight) {
            if l.decode_ready(&s.state)? {
                s.land(&l)?;
                took = true;
            }
        }
        if !took {
            std::hint::spin_loop();
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let gen_s = (wall - prefill_s).max(1e-9);
    eprintln!(
        "{total} sequences: prompts {prompt_tokens_read} tokens in {:.1} ms ({:.1} tokens/s); generation: {generated} tokens in {:.1} ms ({:.1} tokens/s, all sequences together)",
        prefill_s * 1e3,
        prompt_tokens_read as f64 / prefill_s.max(1e-9),
        gen_s * 1e3,
        generated as f64 / gen_s
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_prompts;

    #[test]
    fn prompts_are_the_non_blank_lines_with_escapes_read() {
        let p = parse_prompts("ROMEO:\\nWhat light\n\n  \nback\\\\slash \\t kept\r\nlast");
        assert_eq!(p, [(1, "ROMEO:\nWhat light".to_string()), (4, "back\\slash \\t kept".to_string()), (5, "last".to_string())]);
    }
}
