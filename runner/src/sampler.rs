//! Choosing the next token from logits, llama.cpp-style: repetition penalty, then top-k,
//! then softmax with temperature, top-p, min-p, and a seeded draw. Temperature 0 is greedy.
//! The same seed and inputs give the same tokens.

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

    /// The next token. `suppress` ids are never chosen; `history` feeds the penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], suppress: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        for &s in suppress {
            if let Some(v) = l.get_mut(s as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        let c = &self.cfg;
        if c.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / c.repeat_penalty } else { *v * c.repeat_penalty };
                }
            }
        }
        let argmax = || l.iter().enumerate().fold(0, |b, (i, v)| if *v > l[b] { i } else { b }) as u32;
        if c.temperature <= 0.0 {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
        if idx.is_empty() {
            return argmax();
        }
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if c.top_k > 0 {
            idx.truncate(c.top_k);
        }
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
