//! Choosing the next token from logits, llama.cpp-style: repetition penalty, then top-k,
//! then softmax with temperature, top-p, min-p, and a seeded draw. Temperature 0 is greedy.
//! The same seed and inputs give the same tokens.

use std::borrow::Cow;

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: u64,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = cfg.seed ^ 0x9E37_79B9_7F4A_7C15;
        Sampler { cfg, rng }
    }

    fn uniform(&mut self) -> f64 {
        // SplitMix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The logits the draw sees: `suppress` ids at minus infinity, the penalty applied to
    /// recent tokens; borrowed as they are when neither changes anything.
    fn adjusted<'a>(&self, logits: &'a [f32], history: &[u32], suppress: &[u32]) -> Cow<'a, [f32]> {
        let c = &self.cfg;
        let penalised = if c.repeat_penalty != 1.0 { &history[history.len().saturating_sub(c.repeat_last_n)..] } else { &[] };
        if suppress.is_empty() && penalised.is_empty() {
            return Cow::Borrowed(logits);
        }
        let mut l = logits.to_vec();
        for &s in suppress {
            if let Some(v) = l.get_mut(s as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        let mut seen = penalised.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(v) = l.get_mut(t as usize) {
                *v = if *v > 0.0 { *v / c.repeat_penalty } else { *v * c.repeat_penalty };
            }
        }
        Cow::Owned(l)
    }

    /// How many of the latest tokens of `history` a draw looks at (the penalty's window):
    /// those are all a caller needs to keep.
    pub fn window(&self) -> usize {
        self.cfg.repeat_last_n
    }

    /// The next token. `suppress` ids are never chosen; `history` feeds the penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], suppress: &[u32]) -> u32 {
        let l = self.adjusted(logits, history, suppress);
        let l = &l[..];
        let c = &self.cfg;
        let argmax = || argmax(l);
        if c.temperature <= 0.0 {
            return argmax();
        }
        // the finite logits' ids, most likely first, ties by id: a total order, so the top
        // k are one set in one order
        let mut idx = if c.top_k > 0 { top_k(l, c.top_k) } else { (0..l.len()).filter(|&i| l[i].is_finite()).collect() };
        if idx.is_empty() {
            return argmax();
        }
        idx.sort_unstable_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let max = l[idx[0]];
        let mut p: Vec<f64> = idx.iter().map(|&i| (((l[i] - max) / c.temperature) as f64).exp()).collect();
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        // top-p: the smallest prefix whose mass reaches top_p.
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p.iter().position(|&x| {
                acc += x;
                acc >= c.top_p as f64
            });
            if let Some(k) = keep {
                idx.truncate(k + 1);
                p.truncate(k + 1);
            }
        }
        // min-p: drop tokens below min_p times the most likely one.
        if c.min_p > 0.0 {
            let floor = p[0] * c.min_p as f64;
            let keep = p.iter().take_while(|&&x| x >= floor).count().max(1);
            idx.truncate(keep);
            p.truncate(keep);
        }
        let total: f64 = p.iter().sum();
        let mut r = self.uniform() * total;
        for (i, &x) in idx.iter().zip(&p) {
            r -= x;
            if r <= 0.0 {
                return *i as u32;
            }
        }
        idx[idx.len() - 1] as u32
    }
}

/// The first id of the largest value, moving on from id 0 only to a strictly larger one (a
/// NaN is never larger, so a NaN at 0 stays): the largest value by lanes, which vectorise,
/// then its first place.
fn argmax(l: &[f32]) -> u32 {
    const LANES: usize = 16;
    let Some(&first) = l.first() else { return 0 };
    if first.is_nan() {
        return 0;
    }
    let mut acc = [first; LANES];
    let mut chunks = l.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            if v > *a {
                *a = v;
            }
        }
    }
    let m = acc.iter().chain(chunks.remainder()).fold(first, |m, &v| if v > m { v } else { m });
    l.iter().position(|&v| v == m).unwrap_or(0) as u32
}

/// The ids of the `k` largest finite values of `l` (ties: the smaller id), in no order: one
/// pass against the smallest of the best so far, which a vocabulary of 200,064 rarely
/// beats, instead of a sort of all of it every token.
fn top_k(l: &[f32], k: usize) -> Vec<usize> {
    use std::cmp::{Ordering, Reverse};
    use std::collections::BinaryHeap;
    // larger is better: the value, then the smaller id
    #[derive(PartialEq)]
    struct Key(f32, usize);
    impl Eq for Key {}
    impl Ord for Key {
        fn cmp(&self, o: &Key) -> Ordering {
            self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
        }
    }
    impl PartialOrd for Key {
        fn partial_cmp(&self, o: &Key) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut best: BinaryHeap<Reverse<Key>> = BinaryHeap::with_capacity(k + 1);
    // the smallest value kept, once k are: most values fall below it (a NaN too)
    let mut floor = f32::NEG_INFINITY;
    for (i, &v) in l.iter().enumerate() {
        if v < floor || !v.is_finite() {
            continue;
        }
        if best.len() < k {
            best.push(Reverse(Key(v, i)));
        } else if best.peek().is_some_and(|w| Key(v, i) > w.0) {
            best.pop();
            best.push(Reverse(Key(v, i)));
        }
        if best.len() == k {
            floor = best.peek().map_or(floor, |w| w.0 .0);
        }
    }
    best.into_iter().map(|Reverse(Key(_, i))| i).collect()
}
