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
