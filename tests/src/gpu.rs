//! Helpers of the GPU end-to-end tests (tests/tests/gpu_forward.rs, gpu_offload.rs): the
//! models they run, converted from a checkpoint, on the GPU, and how their logits compare.

use std::path::Path;

use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_kernels::cuda::{Gpu, KvType};
use mxr_models::forward::Logits;
use mxr_models::gpu::split::{SplitModel, SplitSession};
use mxr_models::gpu::{GpuModel, GpuSession};
use mxr_models::Model;
use mxr_quant::QType;

use crate::temp_path;

/// The checkpoint at `src` converted to `q` (a temporary file named after `name`), opened.
pub fn converted(src: &Path, name: &str, q: QType) -> Model {
    let out = temp_path("gpu-fwd", &format!("{name}-{q}.gguf"));
    convert(src, &out, &ConvertOptions::new(TypePlan::uniform(q)), &|_| {}).unwrap();
    Model::open(&out).unwrap()
}

pub fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold(0, |best, (i, v)| if *v > x[best] { i } else { best })
}

/// Of the rows of `vocab` logits in a and b: how many have the same top-1, and how many
/// there are.
pub fn top1_same(a: &[f32], b: &[f32], vocab: usize) -> (usize, usize) {
    let same = a.chunks(vocab).zip(b.chunks(vocab)).filter(|(x, y)| argmax(x) == argmax(y)).count();
    (same, a.len() / vocab)
}

/// The model on the GPU with f32 KV caches (exact attention, the CPU's values); the bf16
/// default is checked against it in `bf16_kv_cache_stays_close_to_f32`.
pub fn gpu_model(m: &Model) -> GpuModel {
    gpu_model_kv(m, KvType::F32)
}

pub fn gpu_model_kv(m: &Model, kv: KvType) -> GpuModel {
    let mut g = GpuModel::upload(m, Gpu::open(0).expect("these tests need a GPU")).unwrap();
    g.kv_type = kv;
    g
}

/// `steps` greedy tokens in session `s`, the first fed `next`, each later one the
/// previous step's top-1 (`host`: the mapped model, for experts in host memory): the
/// steps' logits, one row of vocab each.
pub fn greedy_steps(g: &GpuModel, host: &Model, s: &mut GpuSession, next: u32, steps: usize) -> Vec<f32> {
    greedy(next, steps, |t| g.forward_on(Some(host), s, &[t], Logits::Last).unwrap())
}

/// [`greedy_steps`] over the parts of a layer split.
pub fn split_greedy_steps(sm: &SplitModel, host: &Model, s: &mut SplitSession, next: u32, steps: usize) -> Vec<f32> {
    greedy(next, steps, |t| sm.forward(Some(host), s, &[t], Logits::Last).unwrap())
}

/// The logits of `steps` calls of `step`, the first fed `next`, each later one the top-1 of
/// the call before.
fn greedy(mut next: u32, steps: usize, mut step: impl FnMut(u32) -> Vec<f32>) -> Vec<f32> {
    let mut out = Vec::new();
    for _ in 0..steps {
        let l = step(next);
        next = argmax(&l) as u32;
        out.extend(l);
    }
    out
}
