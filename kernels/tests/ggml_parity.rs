//! mxr-quant's formats against ggml itself: the type table, quantized bytes (bit-identical
//! to ggml_quantize_chunk) and dequantized values (bit-identical to ggml's to_float), on
//! ugly sizes and awkward data.

use mxr_kernels::cpu::ggml;
use mxr_quant::qtype::GGML_TYPES;
use mxr_quant::reference::{self, stats::Rng};
use mxr_quant::QType;

#[test]
fn type_table_matches_ggml() {
    for t in GGML_TYPES {
        let (block, size, name) = ggml::type_facts(t.id).expect("id below GGML_TYPE_COUNT");
        assert_eq!((block as usize, size, name.as_str()), (t.block_size, t.type_size, t.name), "type id {}", t.id);
    }
    for id in 0..64 {
        if GGML_TYPES.iter().all(|t| t.id != id) {
            if let Some((block, _, _)) = ggml::type_facts(id) {
                assert_eq!(block, 0, "id {id} is a live ggml type missing from GGML_TYPES");
            }
        }
    }
}

/// Data sets that stress the quantizers' branches: smooth, noisy, all-zero blocks, a lone
/// outlier, tiny and huge magnitudes, constant positive runs (Q4_K's min == 0 path),
/// negative-only values and values exactly on rounding boundaries.
fn data_sets(n: usize) -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = Rng::new(n as u64);
    let mut outlier = rng.normals(n, 0.02);
    outlier[n / 3] = 50.0;
    let mut zero_blocks = rng.normals(n, 1.0);
    zero_blocks[..n.min(256)].iter_mut().for_each(|v| *v = 0.0);
    vec![
        ("cos", reference::stats::cos_pattern(n, 0.5)),
        ("normal", rng.normals(n, 1.0)),
        ("zero-blocks", zero_blocks),
        ("outlier", outlier),
        ("tiny", rng.normals(n, 1e-20)),
        ("huge", rng.normals(n, 6e4)),
        ("positive", (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect()),
        ("negative", (0..n).map(|i| -1.0 - (i % 5) as f32).collect()),
        ("halves", (0..n).map(|i| (i as f32 - 16.0) * 0.5).collect()),
    ]
}

/// (rows, blocks per row) pairs: one block, odd counts, a row count not a tile multiple.
const SHAPES: &[(usize, usize)] = &[(1, 1), (3, 3), (7, 5), (2, 24), (65, 1)];

#[test]
fn quantized_bytes_are_bit_identical_to_ggml_quantize_chunk() {
    for q in QType::WEIGHT_TYPES {
        for &(rows, blocks) in SHAPES {
            let n = q.block_size().max(32) * blocks;
            for (name, x) in data_sets(rows * n) {
                let ours: Vec<u8> = x.chunks(n).flat_map(|r| reference::quantize_to_vec(q, r).unwrap()).collect();
                let theirs = ggml::quantize_chunk(q, &x, n).unwrap();
                if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
                    panic!(
                        "{q} {name} {rows}x{n}: first differing byte {i} (block {}): ours {} ggml {}",
                        i / q.type_size(),
                        ours[i],
                        theirs[i]
                    );
                }
                assert_eq!(ours.len(), theirs.len());
            }
        }
    }
}

#[test]
fn q8k_activation_quantizer_is_bit_identical_to_ggml_cpu() {
    let kernel = ggml::DotKernel::new(QType::Q4K).unwrap();
    for (name, x) in data_sets(256 * 6) {
        let ours = reference::quantize_to_vec(QType::Q8K, &x).unwrap();
        let mut theirs = vec![0u8; ours.len()];
        kernel.quantize_activation(&x, &mut theirs).unwrap();
        assert!(ours == theirs, "q8_K {name}");
    }
}

#[test]
fn dequantized_values_are_bit_identical_to_ggml_to_float() {
    let mut rng = Rng::new(3);
    for q in QType::WEIGHT_TYPES {
        let n = q.block_size().max(32) * 7;
        // Quantizer output, plus raw random bytes (every bit pattern a file could hold).
        let mut inputs: Vec<Vec<u8>> = data_sets(n).into_iter().map(|(_, x)| ggml::quantize_chunk(q, &x, n).unwrap()).collect();
        inputs.push((0..q.row_bytes(n).unwrap()).map(|_| rng.next_u64() as u8).collect());
        for bytes in inputs {
            let ours = reference::dequantize_to_vec(q, &bytes, n).unwrap();
            let mut theirs = vec![0f32; n];
            ggml::to_float(q, &bytes, &mut theirs).unwrap();
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{q} element {i}: ours {a} ggml {b}");
            }
        }
    }
}

#[test]
fn f16_and_bf16_conversions_match_ggml_for_every_half_and_many_floats() {
    // Every 16-bit pattern through to_float.
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for q in [QType::F16, QType::BF16] {
        let ours = reference::dequantize_to_vec(q, &all, 65536).unwrap();
        let mut theirs = vec![0f32; 65536];
        ggml::to_float(q, &all, &mut theirs).unwrap();
        assert!(ours.iter().zip(&theirs).all(|(a, b)| a.to_bits() == b.to_bits()), "{q} to_float");
    }
    // Rounding of f32 -> 16 bits: random bit patterns (incl. NaN, inf, subnormals).
    let mut rng = Rng::new(9);
    let x: Vec<f32> = (0..1 << 16).map(|_| f32::from_bits(rng.next_u64() as u32)).collect();
    for q in [QType::F16, QType::BF16] {
        let ours = reference::quantize_to_vec(q, &x).unwrap();
        let theirs = ggml::quantize_chunk(q, &x, x.len()).unwrap();
        assert!(ours == theirs, "{q} from f32");
    }
}
