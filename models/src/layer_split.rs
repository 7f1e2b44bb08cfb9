//! Several GPUs (issue 10): contiguous layers per GPU, balanced by bytes in proportion to
//! each GPU's budget; the embeddings go with the first GPU, the final norm and lm_head with
//! the last; each layer's KV cache and lightning state live with it. Within each GPU the
//! experts of its layers are placed as on one GPU ([`crate::placement::plan`]): the most used
//! first, the rest in host memory for the CPU.

use std::ops::Range;

use crate::placement::{expert_layer, plan, ExpertStats, Placement, Policy, Sizes};
use crate::ModelError;

/// Bytes of a model by where they go.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerBytes {
    /// Per layer: weights that are not experts (attention, norms, router).
    pub non_expert: Vec<u64>,
    /// Per layer: one expert (gate + up + down).
    pub expert: Vec<u64>,
    /// Per layer: KV cache and lightning state for the context asked for.
    pub state: Vec<u64>,
    /// The token embeddings (first GPU).
    pub first: u64,
    /// The final norm and lm_head (last GPU).
    pub last: u64,
}

/// The layer of a tensor `blk.{l}.*`.
fn block(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

impl LayerBytes {
    /// From (tensor name, bytes) pairs in GGUF naming; `state[l]` is layer l's KV cache or
    /// lightning state.
    pub fn from_tensors<'a>(tensors: impl IntoIterator<Item = (&'a str, u64)>, n_experts: usize, state: Vec<u64>) -> LayerBytes {
        Self::from_tensors_paged(tensors, n_experts, state, 1)
    }

    /// [`LayerBytes::from_tensors`] with each expert's share of each expert tensor rounded
    /// up to whole `page`s, as the GPU keeps experts when cold ones are read in place (each
    /// expert matrix in its own pages: [`crate::placement::IN_PLACE_PAGE`]).
    pub fn from_tensors_paged<'a>(
        tensors: impl IntoIterator<Item = (&'a str, u64)>,
        n_experts: usize,
        state: Vec<u64>,
        page: u64,
    ) -> LayerBytes {
        let n = state.len();
        let (mut non_expert, mut expert) = (vec![0u64; n], vec![0u64; n]);
        let (mut first, mut last) = (0, 0);
        for (name, bytes) in tensors {
            match (expert_layer(name), block(name)) {
                (Some(l), _) if l < n => expert[l] += (bytes / n_experts.max(1) as u64).div_ceil(page.max(1)) * page.max(1),
                (None, Some(l)) if l < n => non_expert[l] += bytes,
                _ if name.starts_with("token_embd") => first += bytes,
                _ => last += bytes,
            }
        }
        LayerBytes { non_expert, expert, state, first, last }
    }

    /// The one-GPU view: everything that is not an expert together, experts per layer.
    pub fn sizes(&self, margin: u64) -> Sizes {
        Sizes {
            non_expert: self.first + self.last + self.non_expert.iter().sum::<u64>(),
            expert: self.expert.clone(),
            state: self.state.iter().sum(),
            margin,
        }
    }

    fn layer_total(&self, l: usize, n_experts: usize) -> u64 {
        self.non_expert[l] + self.state[l] + self.expert[l] * n_experts as u64
    }
}

/// One GPU's share: its layers and the placement of their experts.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuShare {
    pub layers: Range<usize>,
    pub budget: u64,
    /// on_gpu rows of layers outside `layers` are all false.
    pub placement: Placement,
}

/// Splits the layers over GPUs with these byte budgets (each including `margin`). Layers
/// are cut where the running total of bytes (embeddings and lm_head included) crosses each
/// GPU's share of the total, in proportion to its budget; every GPU gets at least one layer.
/// Then each GPU places its layers' experts within its budget (`policy` as for one GPU,
/// `Policy::Budget` taken per GPU). An error names the GPU whose fixed part does not fit.
pub fn split(
    lb: &LayerBytes,
    n_experts: usize,
    stats: Option<&ExpertStats>,
    budgets: &[u64],
    margin: u64,
    policy: Policy,
) -> Result<Vec<GpuShare>, ModelError> {
    let n_layers = lb.non_expert.len();
    let n_gpus = budgets.len();
    if n_gpus == 0 || n_gpus > n_layers {
        return Err(ModelError::Input(format!("{n_gpus} GPUs for {n_layers} layers: give between 1 and {n_layers}")));
    }
    // cut points: GPU g ends where the running bytes pass its cumulative share
    let total: u64 = lb.first + lb.last + (0..n_layers).map(|l| lb.layer_total(l, n_experts)).sum::<u64>();
    let all_budget: u64 = budgets.iter().sum::<u64>().max(1);
    let mut ends = Vec::with_capacity(n_gpus);
    let (mut run, mut l) = (lb.first, 0usize);
    let mut share = 0u64;
    for (g, &b) in budgets.iter().enumerate() {
        share += b;
        if g + 1 == n_gpus {
            ends.push(n_layers);
            break;
        }
        let target = (total as u128 * share as u128 / all_budget as u128) as u64;
        let start = l;
        // take layers while the next one brings the total closer to the target, leaving
        // at least one layer for each GPU after this one
        while l < n_layers - (n_gpus - 1 - g) {
            let next = run + lb.layer_total(l, n_experts);
            if l > start && next.abs_diff(target) > run.abs_diff(target) {
                break;
            }
            run = next;
            l += 1;
        }
        ends.push(l);
    }
    let mut shares = Vec::with_capacity(n_gpus);
    let mut begin = 0;
    for (g, (&end, &budget)) in ends.iter().zip(budgets).enumerate() {
        let layers = begin..end;
        begin = end;
        let inside = |l: usize| layers.contains(&l);
        let mut non_expert: u64 = layers.clone().map(|l| lb.non_expert[l]).sum();
        if g == 0 {
            non_expert += lb.first;
        }
        if g + 1 == n_gpus {
            non_expert += lb.last;
        }
        // experts of other GPUs' layers cost nothing here and are dropped after planning
        let expert: Vec<u64> = (0..n_layers).map(|l| if inside(l) { lb.expert[l] } else { 0 }).collect();
        let sizes = Sizes { non_expert, expert, state: layers.clone().map(|l| lb.state[l]).sum(), margin };
        let policy = match policy {
            Policy::Budget(_) => Policy::Budget(budget),
            p => p,
        };
        let mut p = plan(&sizes, n_experts, stats, policy)
            .map_err(|e| ModelError::Input(format!("GPU {g} (layers {}-{}): {e}", layers.start, layers.end - 1)))?;
        for (l, row) in p.on_gpu.iter_mut().enumerate() {
            if !inside(l) {
                row.iter_mut().for_each(|x| *x = false);
            }
        }
        shares.push(GpuShare { layers, budget, placement: p });
    }
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8 layers: non-expert 10, one expert 5, 4 experts, state 1 (so 31 per layer);
    /// embeddings 40, lm_head 40.
    fn bytes() -> LayerBytes {
        LayerBytes { non_expert: vec![10; 8], expert: vec![5; 8], state: vec![1; 8], first: 40, last: 40 }
    }

    #[test]
    fn layers_are_contiguous_and_balanced_with_embeddings_first_and_lm_head_last() {
        // 8 x 31 + 80 = 328 bytes over two equal GPUs: 164 each. GPU 0 holds the
        // embeddings (40) + 4 layers (124) = 164; GPU 1 the other 4 + lm_head.
        let s = split(&bytes(), 4, None, &[400, 400], 0, Policy::Budget(0)).unwrap();
        assert_eq!(s.iter().map(|g| g.layers.clone()).collect::<Vec<_>>(), vec![0..4, 4..8]);
        assert_eq!(s[0].placement.resident, 40 + 4 * 10 + 4, "embeddings with the first GPU");
        assert_eq!(s[1].placement.resident, 40 + 4 * 10 + 4, "lm_head with the last GPU");
        // everything fits: every expert of a GPU's own layers is on it, no other layer's
        for (g, share) in s.iter().enumerate() {
            for (l, row) in share.placement.on_gpu.iter().enumerate() {
                assert_eq!(row.iter().all(|&x| x), share.layers.contains(&l), "GPU {g} layer {l}");
            }
            assert_eq!(share.placement.host_experts, 0);
        }
        // a GPU with twice the budget takes about twice the bytes
        let s = split(&bytes(), 4, None, &[200, 100], 0, Policy::Budget(0)).unwrap();
        assert_eq!(s[0].layers, 0..6, "40 + 6 x 31 = 226 is the running total nearest 2/3 of 328 (218)");
        // four GPUs, one layer each at least
        let s = split(&bytes(), 4, None, &[1000; 4], 0, Policy::Budget(0)).unwrap();
        assert_eq!(s.iter().map(|g| g.layers.len()).sum::<usize>(), 8);
        assert!(s.iter().all(|g| !g.layers.is_empty()));
        assert!(split(&bytes(), 4, None, &[10; 9], 0, Policy::Budget(0)).is_err(), "more GPUs than layers");
    }

    #[test]
    fn experts_that_do_not_fit_a_gpu_stay_in_host_memory_per_gpu() {
        // GPU budgets of 110: fixed part 84 (40 + 40 + 4) leaves 26, five experts of 5
        let s = split(&bytes(), 4, None, &[110, 110], 0, Policy::Budget(0)).unwrap();
        for share in &s {
            assert_eq!(share.placement.experts_on_gpu(), 5);
            assert_eq!(share.placement.gpu_experts, 25);
            assert_eq!(share.placement.host_experts, (16 - 5) * 5);
        }
        // a budget below the fixed part names the GPU: 110 : 60 puts layers 0-5 on GPU 0
        // (40 + 6 x 31 = 226, nearest 11/17 of 328); GPU 1's fixed part is 2 x 11 + 40 = 62
        let e = split(&bytes(), 4, None, &[110, 60], 0, Policy::Budget(0)).unwrap_err().to_string();
        assert!(e.contains("GPU 1 (layers 6-7)"), "{e}");
        // --cpu-moe on every GPU
        let s = split(&bytes(), 4, None, &[110, 110], 0, Policy::CpuMoe).unwrap();
        assert!(s.iter().all(|g| g.placement.experts_on_gpu() == 0));
    }

    #[test]
    fn tensors_are_counted_where_they_go() {
        let t = [
            ("token_embd.weight", 100),
            ("blk.0.attn_q.weight", 7),
            ("blk.0.ffn_gate_exps.weight", 40),
            ("blk.1.attn_norm.weight", 3),
            ("output_norm.weight", 2),
            ("output.weight", 50),
        ];
        let lb = LayerBytes::from_tensors(t, 4, vec![9, 8]);
        assert_eq!(lb, LayerBytes { non_expert: vec![7, 3], expert: vec![10, 0], state: vec![9, 8], first: 100, last: 52 });
        // in pages of 8: each expert's 10 bytes of that tensor take 16; others unchanged
        let paged = LayerBytes::from_tensors_paged(t, 4, vec![9, 8], 8);
        assert_eq!(paged, LayerBytes { expert: vec![16, 0], ..lb.clone() });
        // two expert tensors in a layer are paged each (gate 10 -> 16, up 9 -> 16, not 19 -> 24)
        let two = [("blk.0.ffn_gate_exps.weight", 40), ("blk.0.ffn_up_exps.weight", 36)];
        assert_eq!(LayerBytes::from_tensors_paged(two, 4, vec![0], 8).expert, vec![32]);
        assert_eq!(LayerBytes::from_tensors_paged(two, 4, vec![0], 1).expert, vec![19]);
    }
}
