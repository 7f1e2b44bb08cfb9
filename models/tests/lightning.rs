//! Lightning attention: the blocked computation equals the token-by-token recurrence
//! S_t = λ S_{t-1} + k_tᵀ v_t, o_t = q_t S_t for any block size, and carries its state.

use mxr_kernels::cpu::Threads;
use mxr_models::forward::lightning::{attend, slopes};
use mxr_quant::reference::stats::{diff, Rng};

/// The recurrence, in f64, one head at a time.
fn recurrence(qkv: &[f32], n: usize, hd: usize, s: &[f64]) -> Vec<f64> {
    let heads = s.len();
    let mut out = vec![0f64; n * heads * hd];
    for h in 0..heads {
        let lambda = (-s[h]).exp();
        let mut st = vec![0f64; hd * hd];
        for t in 0..n {
            let base = t * heads * 3 * hd + h * 3 * hd;
            let (q, k, v) = (&qkv[base..base + hd], &qkv[base + hd..base + 2 * hd], &qkv[base + 2 * hd..base + 3 * hd]);
            for a in 0..hd {
                for b in 0..hd {
                    st[a * hd + b] = lambda * st[a * hd + b] + k[a] as f64 * v[b] as f64;
                }
            }
            for b in 0..hd {
                out[(t * heads + h) * hd + b] = (0..hd).map(|a| q[a] as f64 * st[a * hd + b]).sum();
            }
        }
    }
    out
}

#[test]
fn blocked_equals_recurrence_for_any_block_size() {
    let (n, hd, heads) = (97, 16, 4);
    let qkv = Rng::new(3).normals(n * heads * 3 * hd, 0.5);
    // Layer 0 of 3: the fastest decays (s up to 0.84) and slowest (s = 1/16) both appear.
    let s = slopes(heads, 0, 3);
    let want = recurrence(&qkv, n, hd, &s);
    for block in [1, 7, 16, 64, 97, 256] {
        let mut state = vec![0f32; heads * hd * hd];
        let got = attend(&qkv, n, hd, &s, &mut state, block, Threads(2)).unwrap();
        let d = diff(&got, &want);
        assert!(d.nmse < 1e-10, "block {block}: {d}");
    }
}

#[test]
fn state_carries_across_calls() {
    let (n, hd, heads) = (50, 8, 2);
    let qkv = Rng::new(4).normals(n * heads * 3 * hd, 0.5);
    let s = slopes(heads, 1, 4);
    let mut whole_state = vec![0f32; heads * hd * hd];
    let whole = attend(&qkv, n, hd, &s, &mut whole_state, 16, Threads(1)).unwrap();
    let mut state = vec![0f32; heads * hd * hd];
    let split = 21 * heads * 3 * hd;
    let mut parts = attend(&qkv[..split], 21, hd, &s, &mut state, 16, Threads(1)).unwrap();
    parts.extend(attend(&qkv[split..], n - 21, hd, &s, &mut state, 5, Threads(1)).unwrap());
    assert!(diff(&parts, &whole).max_abs < 1e-5);
    assert!(diff(&state, &whole_state).max_abs < 1e-5);
}

#[test]
fn slopes_follow_alibi_and_the_layer_factor() {
    // 64 heads: s_h = 2^(-(h+1)/8); layer 0 factor 1 + 1e-5, last layer 1e-5.
    let s = slopes(64, 0, 80);
    assert!((s[0] - 2f64.powf(-1.0 / 8.0) * (1.0 + 1e-5)).abs() < 1e-15);
    assert!((s[63] - (1.0 / 256.0) * (1.0 + 1e-5)).abs() < 1e-15);
    let last = slopes(64, 79, 80);
    assert!((last[0] / s[0] - 1e-5 / (1.0 + 1e-5)).abs() < 1e-12);
}
