//! The sampler: greedy is argmax, seeds reproduce, filters cut what they should.

use mxr::sampler::{Sampler, SamplerConfig};

fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplerConfig {
    SamplerConfig { temperature, top_k, top_p, min_p, repeat_penalty: 1.0, repeat_last_n: 64, seed }
}

const LOGITS: [f32; 6] = [1.0, 3.0, 2.5, -1.0, 0.0, 2.9];

#[test]
fn greedy_and_top_k_1_pick_the_argmax() {
    assert_eq!(Sampler::new(cfg(0.0, 0, 1.0, 0.0, 1)).sample(&LOGITS, &[], &[]), 1);
    for seed in 0..20 {
        assert_eq!(Sampler::new(cfg(1.0, 1, 1.0, 0.0, seed)).sample(&LOGITS, &[], &[]), 1);
    }
}

#[test]
fn suppressed_tokens_are_never_chosen() {
    assert_eq!(Sampler::new(cfg(0.0, 0, 1.0, 0.0, 1)).sample(&LOGITS, &[], &[1]), 5);
    let mut s = Sampler::new(cfg(5.0, 0, 1.0, 0.0, 3));
    for _ in 0..500 {
        assert_ne!(s.sample(&LOGITS, &[], &[1, 2]), 1);
    }
}

#[test]
fn same_seed_same_draws_and_filters_hold() {
    let draws = |seed| {
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0, seed));
        (0..64).map(|_| s.sample(&LOGITS, &[], &[])).collect::<Vec<_>>()
    };
    assert_eq!(draws(7), draws(7));
    assert_ne!(draws(7), draws(8));
    // top-k 2: only tokens 1 and 5.
    let mut s = Sampler::new(cfg(1.0, 2, 1.0, 0.0, 9));
    assert!((0..300).all(|_| [1, 5].contains(&s.sample(&LOGITS, &[], &[]))));
    // min-p 0.5 at temperature 1: p(2) / p(1) = e^-0.5 = 0.61 stays, p(0) / p(1) = e^-2 goes.
    let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.5, 9));
    assert!((0..300).all(|_| [1, 2, 5].contains(&s.sample(&LOGITS, &[], &[]))));
    // top-p 0.3: token 1 alone holds more than 30% of the mass.
    let mut s = Sampler::new(cfg(1.0, 0, 0.3, 0.0, 9));
    assert!((0..300).all(|_| s.sample(&LOGITS, &[], &[]) == 1));
}

#[test]
fn repetition_penalty_moves_away_from_recent_tokens() {
    let mut c = cfg(0.0, 0, 1.0, 0.0, 1);
    c.repeat_penalty = 1.5;
    // 3.0 / 1.5 = 2.0 < 2.9: token 5 wins once token 1 was just used.
    assert_eq!(Sampler::new(c).sample(&LOGITS, &[1], &[]), 5);
}

/// The sampler as it was before top-k by selection: the whole vocabulary sorted each draw.
fn sorted_reference(c: &SamplerConfig, rng: &mut u64, l: &[f32]) -> u32 {
    let mut idx: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
    idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    if c.top_k > 0 {
        idx.truncate(c.top_k);
    }
    let max = l[idx[0]];
    let mut p: Vec<f64> = idx.iter().map(|&i| (((l[i] - max) / c.temperature) as f64).exp()).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    if c.top_p < 1.0 {
        let mut acc = 0.0;
        if let Some(k) = p.iter().position(|&x| {
            acc += x;
            acc >= c.top_p as f64
        }) {
            idx.truncate(k + 1);
            p.truncate(k + 1);
        }
    }
    if c.min_p > 0.0 {
        let floor = p[0] * c.min_p as f64;
        let keep = p.iter().take_while(|&&x| x >= floor).count().max(1);
        idx.truncate(keep);
        p.truncate(keep);
    }
    // the sampler's SplitMix64 draw
    *rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *rng;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
    let total: f64 = p.iter().sum();
    let mut r = u * total;
    for (i, &x) in idx.iter().zip(&p) {
        r -= x;
        if r <= 0.0 {
            return *i as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

#[test]
fn top_k_by_selection_draws_what_a_full_sort_draws() {
    // a large vocabulary with many ties (values on a coarse grid) and a few non-finite ones
    let n = 20_000;
    let l: Vec<f32> = (0..n)
        .map(|i| match i % 997 {
            5 => f32::NAN,
            7 => f32::NEG_INFINITY,
            _ => ((i * 7919 % 1013) as f32 / 50.0).floor() * 0.5,
        })
        .collect();
    for (t, k, top_p, min_p) in
        [(0.8, 40, 0.95, 0.05), (1.0, 1, 1.0, 0.0), (1.5, 500, 1.0, 0.0), (0.7, 3, 0.5, 0.0), (1.0, 0, 0.9, 0.1), (2.0, n + 5, 1.0, 0.0)]
    {
        for seed in [1u64, 2, 99] {
            let c = cfg(t, k, top_p, min_p, seed);
            let mut s = Sampler::new(c.clone());
            let mut rng = seed ^ 0x9E37_79B9_7F4A_7C15;
            let got: Vec<u32> = (0..200).map(|_| s.sample(&l, &[], &[])).collect();
            let want: Vec<u32> = (0..200).map(|_| sorted_reference(&c, &mut rng, &l)).collect();
            assert_eq!(got, want, "temperature {t}, top-k {k}, top-p {top_p}, min-p {min_p}, seed {seed}");
        }
    }
}

#[test]
fn greedy_is_the_first_of_the_largest() {
    // the loop greedy decoding used before: move on only to a strictly larger value
    let reference = |l: &[f32]| l.iter().enumerate().fold(0, |b, (i, v)| if *v > l[b] { i } else { b }) as u32;
    let greedy = |l: &[f32]| Sampler::new(cfg(0.0, 40, 1.0, 0.0, 1)).sample(l, &[], &[]);
    let n = 1000;
    let base: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 / 100.0).floor()).collect();
    let mut cases: Vec<Vec<f32>> = vec![base.clone(), vec![], vec![f32::NAN; 5], vec![f32::NEG_INFINITY; 40], vec![0.0, -0.0, 0.0]];
    for at in [0, 1, 15, 16, 17, 500, n - 1] {
        for v in [f32::NAN, f32::INFINITY, 1e9, -0.0] {
            let mut x = base.clone();
            x[at] = v;
            cases.push(x);
        }
    }
    for (c, l) in cases.iter().enumerate() {
        assert_eq!(greedy(l), reference(l), "case {c}");
    }
}
