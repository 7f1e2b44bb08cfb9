//! A layer's experts computed on the CPU from the mapped file (mxr_models::experts): the
//! CPU forward's MoE and the GPU placements' cold experts share this code.

use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_e2e::{repo_root, temp_path};
use mxr_kernels::cpu::Threads;
use mxr_models::experts::HostExperts;
use mxr_models::Model;
use mxr_quant::QType;

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// On nano's F32 weights, expert e's output is down · (silu(gate · x) * (up · x)) with the
/// rows of expert e (checked against plain loops for the first and the last expert of each
/// layer); a split of the hidden units into two parts adds up to the whole; an expert or a
/// part outside the tensor is an error, not a panic.
#[test]
fn host_experts_compute_each_expert_and_its_parts() {
    let gguf = temp_path("host-experts", "nano-f32.gguf");
    convert(&repo_root().join("nano/checkpoint"), &gguf, &ConvertOptions::new(TypePlan::uniform(QType::F32)), &|_| {}).unwrap();
    let m = Model::open(&gguf).unwrap();
    let c = &m.config;
    let (d, h) = (c.dim, c.hidden_dim);
    let x: Vec<f32> = (0..2 * d).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.7).collect();
    for layer in &m.layers {
        let ex = HostExperts::of(&m, layer);
        for e in [0, c.n_experts - 1] {
            let mut y = vec![0f32; 2 * d];
            ex.ffn(e, 0..h, &x, 2, &mut y, Threads(2)).unwrap();
            let gate = floats(m.rows(&layer.gate_exps, e * h, h).data);
            let up = floats(m.rows(&layer.up_exps, e * h, h).data);
            let down = floats(m.rows(&layer.down_exps, e * d, d).data);
            for t in 0..2 {
                let xt = &x[t * d..(t + 1) * d];
                let act: Vec<f64> = (0..h)
                    .map(|j| {
                        let dot = |w: &[f32]| w[j * d..(j + 1) * d].iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                        let g = dot(&gate);
                        g / (1.0 + (-g).exp()) * dot(&up)
                    })
                    .collect();
                for r in 0..d {
                    let want: f64 = down[r * h..(r + 1) * h].iter().zip(&act).map(|(a, b)| *a as f64 * b).sum();
                    let got = y[t * d + r] as f64;
                    assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "expert {e} row {r} token {t}: {got} against {want}");
                }
            }
            // hidden units 0..h1 and h1..h add up to the whole
            let h1 = h / 3;
            let (mut a, mut b) = (vec![0f32; 2 * d], vec![0f32; 2 * d]);
            ex.ffn(e, 0..h1, &x, 2, &mut a, Threads(1)).unwrap();
            ex.ffn(e, h1..h, &x, 2, &mut b, Threads(3)).unwrap();
            for ((p, q), w) in a.iter().zip(&b).zip(&y) {
                assert!((p + q - w).abs() <= 1e-5 * (1.0 + w.abs()), "parts {p} + {q} against {w}");
            }
        }
        let mut y = vec![0f32; d];
        let err = ex.ffn(c.n_experts, 0..h, &x[..d], 1, &mut y, Threads(1)).unwrap_err().to_string();
        assert!(err.contains(&format!("expert {} lies outside its tensor", c.n_experts)), "{err}");
        let err = ex.ffn(0, 0..h + 1, &x[..d], 1, &mut y, Threads(1)).unwrap_err().to_string();
        assert!(err.contains(&format!("hidden units 0..{} of an expert's {h}", h + 1)), "{err}");
    }
}
