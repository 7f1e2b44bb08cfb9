//! mxr's CPU forward pass against transformers' float32 logits on the golden fixtures
//! (tests/reference/make_fixtures.py): F32 conversions must match tightly (max abs diff
//! <= 1e-3, same top-1 everywhere), quantized ones loosely; and the session must give the
//! same logits whether the tokens come at once, in chunks, or one by one.

use std::path::PathBuf;

use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_e2e::{npy, repo_root, temp_path};
use mxr_kernels::cpu::Threads;
use mxr_models::forward::{decode_many, forward, Logits};
use mxr_models::{Model, Session};
use mxr_quant::reference::stats::diff;
use mxr_quant::QType;

fn golden(case: &str) -> PathBuf {
    repo_root().join("tests/fixtures/golden").join(case)
}

fn model(case: &str, q: QType) -> Model {
    let out = temp_path("fwd", &format!("{case}.gguf"));
    convert(&golden(case), &out, &ConvertOptions::new(TypePlan::uniform(q)), &|_| {}).unwrap();
    Model::open(&out).unwrap()
}

fn reference(case: &str) -> (Vec<u32>, usize, Vec<f32>) {
    let tokens: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(golden(case).join("tokens.json")).unwrap()).unwrap();
    let (shape, logits) = npy::read_f32(&golden(case).join("logits.npy")).unwrap();
    (tokens, shape[1], logits)
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold(0, |best, (i, v)| if *v > x[best] { i } else { best })
}

fn top1_agreement(got: &[f32], want: &[f32], vocab: usize) -> f64 {
    let same = got.chunks(vocab).zip(want.chunks(vocab)).filter(|(g, w)| argmax(g) == argmax(w)).count();
    same as f64 / (want.len() / vocab) as f64
}

#[test]
fn f32_conversions_match_transformers() {
    for case in ["equal-alpha", "distinct-alpha"] {
        let (tokens, vocab, want) = reference(case);
        let m = model(case, QType::F32);
        let mut s = Session::new(&m.config);
        let got = forward(&m, &mut s, &tokens, Logits::All, Threads(2)).unwrap();
        let d = diff(&got, &want);
        eprintln!("{case} F32: {d}");
        assert!(d.max_abs <= 1e-3 && d.nan_mismatches == 0, "{case}: {d}");
        assert_eq!(top1_agreement(&got, &want, vocab), 1.0, "{case}: top-1");
    }
}

#[test]
fn quantized_conversions_stay_close() {
    // Loose bounds: Q8_0 keeps ~0.4% relative weight error, Q4_0 ~7%. Near-tied router
    // choices flip under that noise, which moves single logits a lot (max abs diff ~1.6 for
    // Q8_0) while the whole stays close (NMSE ~1e-3, top-1 ~97%). The fixture's rows (64)
    // are too short for Q4_K/Q6_K blocks, which fall back to Q8_0.
    for (q, max_nmse, min_top1) in [(QType::Q8_0, 2e-3, 0.95), (QType::Q4_0, 5e-2, 0.70)] {
        let (tokens, vocab, want) = reference("equal-alpha");
        let m = model("equal-alpha", q);
        let got = forward(&m, &mut Session::new(&m.config), &tokens, Logits::All, Threads(2)).unwrap();
        let d = diff(&got, &want);
        let top1 = top1_agreement(&got, &want, vocab);
        eprintln!("{q}: {d}, top-1 {top1:.3}");
        assert!(d.nmse <= max_nmse && top1 >= min_top1, "{q}: {d}, top-1 {top1}");
    }
}

#[test]
fn chunked_prefill_and_decode_equal_one_pass() {
    let (tokens, vocab, _) = reference("distinct-alpha");
    let tokens = &tokens[..300];
    let m = model("distinct-alpha", QType::F32);
    let all = forward(&m, &mut Session::new(&m.config), tokens, Logits::All, Threads(2)).unwrap();
    // Chunks of uneven sizes, then single-token decode steps, in one session.
    let mut s = Session::new(&m.config);
    let mut got = Vec::new();
    let mut at = 0;
    for n in [1, 70, 129, 60] {
        got.extend(forward(&m, &mut s, &tokens[at..at + n], Logits::All, Threads(3)).unwrap());
        at += n;
    }
    while at < tokens.len() {
        got.extend(forward(&m, &mut s, &tokens[at..at + 1], Logits::Last, Threads(1)).unwrap());
        at += 1;
    }
    assert_eq!(s.pos, tokens.len());
    let d = diff(&got, &all);
    assert!(d.max_abs <= 1e-4, "chunked vs one pass: {d}");
    assert_eq!(top1_agreement(&got, &all, vocab), 1.0);
}

/// Several sequences decoded in one pass (`decode_many`: the products over all their rows,
/// attention per sequence) give each sequence's logits and state bit for bit as it decodes
/// alone: three prompts of different lengths, then greedy steps, at two weight types.
#[test]
fn decoding_several_sequences_at_once_equals_each_alone() {
    let (tokens, vocab, _) = reference("distinct-alpha");
    let prompts = [&tokens[..3], &tokens[10..41], &tokens[50..51]];
    for q in [QType::F32, QType::Q8_0] {
        let m = model("distinct-alpha", q);
        let prefilled = |p: &[u32]| {
            let mut s = Session::new(&m.config);
            let last = forward(&m, &mut s, p, Logits::Last, Threads(2)).unwrap();
            (s, argmax(&last) as u32)
        };
        let (mut alone, mut next): (Vec<Session>, Vec<u32>) = prompts.iter().map(|p| prefilled(p)).unzip();
        let mut together: Vec<Session> = alone.clone();
        let mut next_together = next.clone();
        for step in 0..5 {
            let rows: Vec<Vec<f32>> =
                alone.iter_mut().zip(&next).map(|(s, &t)| forward(&m, s, &[t], Logits::Last, Threads(2)).unwrap()).collect();
            let mut refs: Vec<&mut Session> = together.iter_mut().collect();
            let got = decode_many(&m, &mut refs, &next_together, Threads(3)).unwrap();
            assert_eq!(got.len(), prompts.len() * vocab);
            for (i, (row, want)) in got.chunks(vocab).zip(&rows).enumerate() {
                assert!(row == want.as_slice(), "{q:?}, step {step}, sequence {i}: logits differ");
            }
            next = rows.iter().map(|r| argmax(r) as u32).collect();
            next_together = got.chunks(vocab).map(|r| argmax(r) as u32).collect();
        }
        for (a, b) in alone.iter().zip(&together) {
            assert_eq!((a.pos, &a.tokens, &a.expert_counts, &a.lightning), (b.pos, &b.tokens, &b.expert_counts, &b.lightning));
            assert!(a.kv.iter().zip(&b.kv).all(|(x, y)| x.k == y.k && x.v == y.v));
        }
        // a token per sequence, no more and no less
        let mut refs: Vec<&mut Session> = together.iter_mut().collect();
        assert!(decode_many(&m, &mut refs, &[1, 2], Threads(1)).is_err());
    }
}

#[test]
fn saved_session_resumes_exactly() {
    let (tokens, _, _) = reference("equal-alpha");
    let m = model("equal-alpha", QType::F32);
    let mut s = Session::new(&m.config);
    forward(&m, &mut s, &tokens[..200], Logits::Last, Threads(2)).unwrap();
    let path = temp_path("session", "s.mxrs");
    s.save(&m, &path, b"{\"messages\": []}").unwrap();
    let (mut loaded, extra) = Session::load(&m, &path).unwrap();
    assert_eq!((loaded.pos, &loaded.tokens[..], &extra[..]), (200, &tokens[..200], &b"{\"messages\": []}"[..]));
    let a = forward(&m, &mut s, &tokens[200..220], Logits::All, Threads(2)).unwrap();
    let b = forward(&m, &mut loaded, &tokens[200..220], Logits::All, Threads(2)).unwrap();
    assert_eq!(a, b, "a resumed session continues bit for bit");
    // Another model refuses it; a damaged file is an error, not a panic.
    let other = model("distinct-alpha", QType::F32);
    assert!(Session::load(&other, &path).unwrap_err().to_string().contains("different model"));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Session::load(&m, &path).unwrap_err().to_string().contains("truncated"));
}
