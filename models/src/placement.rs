//! Where each expert lives when the GPU cannot hold them all: routing statistics
//! ([`ExpertStats`], written by `mxr calibrate`) and the placement plan ([`plan`]).
//!
//! The GPU first takes everything that is not an expert (attention, router, norms,
//! embeddings, lm_head), the KV cache and the lightning states, and a margin for
//! activations; the rest of the budget goes to experts in order of measured popularity
//! (how often the router chose them), across all layers. The experts left over stay in
//! host memory and run on the CPU.

use std::fmt;

use crate::layer_split::LayerBytes;
use crate::{Config, Model, ModelError};

/// The pages a GPU keeps each expert matrix in when cold experts are read in place: the
/// CUDA virtual-memory allocation granularity of current GPUs (2 MiB; the runner's stacks
/// query it, kernels/src/cuda/placed.rs). Placement rounds hot experts up to it.
pub const IN_PLACE_PAGE: u64 = 2 << 20;

/// How often each expert was chosen: counts[layer][expert] over `tokens` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertStats {
    pub tokens: u64,
    pub counts: Vec<Vec<u64>>,
}

impl ExpertStats {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "format": "mxr-expert-stats", "version": 1, "tokens": self.tokens, "counts": self.counts })
    }

    /// Reads stats written by [`ExpertStats::to_json`], checked against the model's shape.
    pub fn from_json(j: &serde_json::Value, c: &Config) -> Result<ExpertStats, ModelError> {
        let bad = |reason: String| ModelError::Input(format!("expert statistics: {reason}"));
        if j["format"] != "mxr-expert-stats" {
            return Err(bad("not an mxr expert-statistics file (no \"format\": \"mxr-expert-stats\")".into()));
        }
        let tokens = j["tokens"].as_u64().ok_or_else(|| bad("\"tokens\" is not a count".into()))?;
        let rows = j["counts"].as_array().ok_or_else(|| bad("\"counts\" is not an array".into()))?;
        if rows.len() != c.n_layers {
            return Err(bad(format!("{} layers, the model has {}", rows.len(), c.n_layers)));
        }
        let mut counts = Vec::with_capacity(rows.len());
        for (l, row) in rows.iter().enumerate() {
            let row = row.as_array().ok_or_else(|| bad(format!("layer {l} is not an array")))?;
            if row.len() != c.n_experts {
                return Err(bad(format!("layer {l} has {} experts, the model {}", row.len(), c.n_experts)));
            }
            counts.push(
                row.iter()
                    .map(|v| v.as_u64().ok_or_else(|| bad(format!("layer {l}: {v} is not a count"))))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        Ok(ExpertStats { tokens, counts })
    }
}

/// What the placement is asked to do (llama.cpp's `--cpu-moe` / `--n-cpu-moe` meanings).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Fill this many bytes of GPU memory.
    Budget(u64),
    /// Every expert on the CPU.
    CpuMoe,
    /// The experts of the first N layers on the CPU, the rest on the GPU.
    NCpuMoe(usize),
}

/// Byte sizes the plan works with.
#[derive(Clone, Debug, PartialEq)]
pub struct Sizes {
    /// Every tensor that is not an expert.
    pub non_expert: u64,
    /// Bytes of one expert (gate + up + down) in each layer.
    pub expert: Vec<u64>,
    /// KV cache and lightning states for the context asked for.
    pub state: u64,
    /// Kept free for activations and scratch.
    pub margin: u64,
}

impl Sizes {
    /// The sizes of `model` with KV room for `ctx` tokens (f32 KV, f32 lightning states,
    /// as the GPU backend keeps them) and `margin` bytes of headroom.
    /// `kv_bytes`: bytes per KV cache element (4 for f32, 2 for bf16).
    pub fn of(model: &Model, ctx: usize, kv_bytes: f64, margin: u64) -> Sizes {
        Self::of_paged(model, ctx, kv_bytes, margin, 1)
    }

    /// [`Sizes::of`] with each expert matrix in whole `page`s (see
    /// [`LayerBytes::from_tensors_paged`]).
    pub fn of_paged(model: &Model, ctx: usize, kv_bytes: f64, margin: u64, page: u64) -> Sizes {
        let c = &model.config;
        let tensors = model.file.header().tensors().iter().map(|t| (t.name.as_str(), t.n_bytes));
        LayerBytes::from_tensors_paged(tensors, c.n_experts, layer_state(c, ctx, kv_bytes), page).sizes(margin)
    }
}

/// Per layer: the lightning state (f32, [heads, hd, hd]) or the KV cache for `ctx` tokens
/// at `kv_elem` bytes an element (fractional for block types: the runner's q8_0 is 36/32).
pub fn layer_state(c: &Config, ctx: usize, kv_elem: f64) -> Vec<u64> {
    c.layers
        .iter()
        .map(|k| match k {
            crate::LayerKind::Lightning => (c.n_heads * c.head_dim * c.head_dim * 4) as u64,
            crate::LayerKind::Softmax => (2.0 * ctx as f64 * c.kv_dim() as f64 * kv_elem) as u64,
        })
        .collect()
}

/// The layer of a stacked expert tensor `blk.{l}.ffn_{gate,up,down}_exps.weight`.
pub fn expert_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (l, t) = rest.split_once('.')?;
    t.contains("_exps").then(|| l.parse().ok()).flatten()
}

#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// on_gpu[layer][expert]
    pub on_gpu: Vec<Vec<bool>>,
    /// Non-expert weights, KV cache and states on the GPU.
    pub resident: u64,
    pub gpu_experts: u64,
    pub host_experts: u64,
}

impl Placement {
    pub fn experts_on_gpu(&self) -> usize {
        self.on_gpu.iter().flatten().filter(|&&g| g).count()
    }

    /// Expected bytes of host experts a decoded token reads, by the routing frequencies
    /// of `stats`: Σ over layers and host experts of (choices of e per token) x bytes of
    /// one expert of that layer. Divided by the host's read bandwidth, it bounds the
    /// decode time from below (issue 7's bound, with the GPU time).
    pub fn cold_bytes_per_token(&self, stats: &ExpertStats, expert_bytes: &[u64]) -> f64 {
        let tokens = stats.tokens.max(1) as f64;
        self.on_gpu
            .iter()
            .zip(&stats.counts)
            .zip(expert_bytes)
            .map(|((row, counts), &b)| {
                row.iter().zip(counts).filter(|(g, _)| !**g).map(|(_, &n)| n as f64 / tokens * b as f64).sum::<f64>()
            })
            .sum()
    }

    /// Cold-expert bytes a decoded token is expected to read: by the routing statistics,
    /// or without them as if each layer's `top_k` choices spread evenly over its experts.
    pub fn expected_cold_bytes(&self, stats: Option<&ExpertStats>, expert_bytes: &[u64], top_k: usize) -> f64 {
        match stats {
            Some(st) => self.cold_bytes_per_token(st, expert_bytes),
            None => self
                .on_gpu
                .iter()
                .zip(expert_bytes)
                .map(|(row, &b)| top_k as f64 * row.iter().filter(|g| !**g).count() as f64 / row.len().max(1) as f64 * b as f64)
                .sum(),
        }
    }

    /// Layers that keep some expert in host memory.
    pub fn host_layers(&self) -> usize {
        self.on_gpu.iter().filter(|row| row.iter().any(|g| !g)).count()
    }

    /// This placement seen from the GPU that runs `layers` only: the other layers count as
    /// holding all their experts (they are not this GPU's to offload).
    pub fn only(&self, layers: std::ops::Range<usize>) -> Placement {
        let on_gpu =
            self.on_gpu.iter().enumerate().map(|(l, row)| if layers.contains(&l) { row.clone() } else { vec![true; row.len()] }).collect();
        Placement { on_gpu, ..self.clone() }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let total: usize = self.on_gpu.iter().map(Vec::len).sum();
        write!(
            f,
            "placement: GPU {:.2} GiB (non-expert weights + state {:.2} GiB, {} of {} experts {:.2} GiB), host {:.2} GiB of experts; per layer",
            gib(self.resident + self.gpu_experts),
            gib(self.resident),
            self.experts_on_gpu(),
            total,
            gib(self.gpu_experts),
            gib(self.host_experts)
        )?;
        // runs of layers with the same count: "0-9:7 10-79:6"
        let counts: Vec<usize> = self.on_gpu.iter().map(|r| r.iter().filter(|&&g| g).count()).collect();
        let mut start = 0;
        for l in 1..=counts.len() {
            if l == counts.len() || counts[l] != counts[start] {
                match l - 1 - start {
                    0 => write!(f, " {start}:{}", counts[start])?,
                    _ => write!(f, " {start}-{}:{}", l - 1, counts[start])?,
                }
                start = l;
            }
        }
        Ok(())
    }
}

/// [`plan`] for a GPU that keeps experts in whole [`IN_PLACE_PAGE`]s when `paged` (cold
/// experts read in place): `sizes(page)` gives the sizes with each expert matrix rounded
/// up to `page` bytes (1: as they are). Planned as they are first, and in pages only when
/// some expert stays in host memory (with every expert on the GPU no stack is placed).
pub fn plan_paged(
    sizes: impl Fn(u64) -> Sizes,
    n_experts: usize,
    stats: Option<&ExpertStats>,
    policy: Policy,
    paged: bool,
) -> Result<Placement, ModelError> {
    let p = plan(&sizes(1), n_experts, stats, policy)?;
    if paged && p.host_experts > 0 {
        plan(&sizes(IN_PLACE_PAGE), n_experts, stats, policy)
    } else {
        Ok(p)
    }
}

/// Places the experts: see the module doc. Without statistics every expert counts the same
/// and the experts go round-robin over the layers (expert 0 of every layer, then 1, ...).
pub fn plan(sizes: &Sizes, n_experts: usize, stats: Option<&ExpertStats>, policy: Policy) -> Result<Placement, ModelError> {
    let n_layers = sizes.expert.len();
    let resident = sizes.non_expert + sizes.state;
    let mut on_gpu = vec![vec![false; n_experts]; n_layers];
    let all: u64 = sizes.expert.iter().map(|&e| e * n_experts as u64).sum();
    let mut gpu = 0u64;
    match policy {
        Policy::CpuMoe => {}
        Policy::NCpuMoe(n) => {
            for (l, row) in on_gpu.iter_mut().enumerate().skip(n) {
                row.iter_mut().for_each(|g| *g = true);
                gpu += sizes.expert[l] * n_experts as u64;
            }
        }
        Policy::Budget(budget) => {
            let fixed = resident + sizes.margin;
            if fixed > budget {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                return Err(ModelError::Input(format!(
                    "a GPU budget of {:.2} GiB does not hold the non-expert weights ({:.2} GiB), the KV cache and states ({:.2} GiB) and the {:.2} GiB margin: \
                     give at least {:.2} GiB (--gpu-mem), a smaller --ctx-size, or run on the CPU",
                    gib(budget),
                    gib(sizes.non_expert),
                    gib(sizes.state),
                    gib(sizes.margin),
                    gib(fixed)
                )));
            }
            let mut left = budget - fixed;
            let mut order: Vec<(usize, usize)> = (0..n_layers).flat_map(|l| (0..n_experts).map(move |e| (l, e))).collect();
            let count = |l: usize, e: usize| stats.map_or(0, |s| s.counts[l][e]);
            // most used first; ties (and no statistics): expert index, then layer
            order.sort_by(|&(la, ea), &(lb, eb)| count(lb, eb).cmp(&count(la, ea)).then(ea.cmp(&eb)).then(la.cmp(&lb)));
            for (l, e) in order {
                if sizes.expert[l] <= left {
                    left -= sizes.expert[l];
                    gpu += sizes.expert[l];
                    on_gpu[l][e] = true;
                }
            }
        }
    }
    Ok(Placement { on_gpu, resident, gpu_experts: gpu, host_experts: all - gpu })
}

/// One exchange of `--expert-rebalance`: expert `promote` takes the GPU slot of `demote`
/// in `layer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swap {
    pub layer: usize,
    pub demote: usize,
    pub promote: usize,
}

/// Exchanges that bring the most used experts onto the GPU, layer by layer, with the same
/// number of experts per layer on the GPU (so the same memory): the least used resident
/// expert gives its slot to the most used host expert while the host expert's count
/// exceeds the resident's by more than `margin` (a fraction: 0.25 = 25% more uses), so
/// that near-ties do not move weights back and forth.
pub fn rebalance(on_gpu: &[Vec<bool>], counts: &[Vec<u64>], margin: f64) -> Vec<Swap> {
    let mut swaps = Vec::new();
    for (layer, (row, cnt)) in on_gpu.iter().zip(counts).enumerate() {
        let count = |e: usize| cnt.get(e).copied().unwrap_or(0);
        let mut resident: Vec<usize> = (0..row.len()).filter(|&e| row[e]).collect();
        let mut host: Vec<usize> = (0..row.len()).filter(|&e| !row[e]).collect();
        resident.sort_by_key(|&e| (count(e), e));
        host.sort_by_key(|&e| (std::cmp::Reverse(count(e)), e));
        for (&d, &p) in resident.iter().zip(&host) {
            if count(p) as f64 <= count(d) as f64 * (1.0 + margin) || count(p) == 0 {
                break;
            }
            swaps.push(Swap { layer, demote: d, promote: p });
        }
    }
    swaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> Sizes {
        Sizes { non_expert: 100, expert: vec![10, 10, 20], state: 20, margin: 5 }
    }

    #[test]
    fn paged_plans_page_only_where_some_expert_stays_on_the_host() {
        let stats = ExpertStats { tokens: 10, counts: vec![vec![1, 9, 0, 0], vec![5, 5, 0, 0], vec![0, 0, 7, 3]] };
        // in pages, the experts take 16, 16 and 32
        let by_page = |page: u64| if page == 1 { sizes() } else { Sizes { expert: vec![16, 16, 32], ..sizes() } };
        // every expert fits as it is: no stack is placed, so no pages
        let all = plan_paged(by_page, 4, Some(&stats), Policy::Budget(300), true).unwrap();
        assert_eq!(all.experts_on_gpu(), 12);
        // some stay on the host: planned in pages, fewer fit (unpaged: 3)
        let some = plan_paged(by_page, 4, Some(&stats), Policy::Budget(170), true).unwrap();
        assert_eq!(some, plan(&by_page(IN_PLACE_PAGE), 4, Some(&stats), Policy::Budget(170)).unwrap());
        assert!(some.experts_on_gpu() < 3, "{some}");
        // not paged: the plain plan
        assert_eq!(
            plan_paged(by_page, 4, Some(&stats), Policy::Budget(170), false).unwrap(),
            plan(&sizes(), 4, Some(&stats), Policy::Budget(170)).unwrap()
        );
    }

    #[test]
    fn budget_fills_with_the_most_used_experts() {
        let stats = ExpertStats { tokens: 10, counts: vec![vec![1, 9, 0, 0], vec![5, 5, 0, 0], vec![0, 0, 7, 3]] };
        // 125 fixed; 45 left: (0,1)=9 -> 10, (2,2)=7 -> 20, (1,0)=5 -> 10, (1,1)=5 would need 10 (only 5 left)
        let p = plan(&sizes(), 4, Some(&stats), Policy::Budget(170)).unwrap();
        assert_eq!(p.on_gpu, vec![vec![false, true, false, false], vec![true, false, false, false], vec![false, false, true, false]]);
        assert_eq!((p.resident, p.gpu_experts, p.host_experts), (120, 40, 160 - 40));
        assert_eq!(p.experts_on_gpu(), 3);
        assert!(p.to_string().ends_with("per layer 0-2:1"), "{p}");
        let q = plan(&sizes(), 4, None, Policy::NCpuMoe(1)).unwrap();
        assert!(q.to_string().ends_with("per layer 0:0 1-2:4"), "{q}");
    }

    #[test]
    fn without_stats_experts_spread_over_layers() {
        let p = plan(&sizes(), 4, None, Policy::Budget(125 + 40)).unwrap();
        // expert 0 of each layer (40 bytes)
        assert_eq!(p.on_gpu.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![true, true, true]);
        assert_eq!(p.experts_on_gpu(), 3);
    }

    #[test]
    fn llama_cpp_policies_and_a_budget_too_small() {
        let p = plan(&sizes(), 4, None, Policy::CpuMoe).unwrap();
        assert_eq!((p.experts_on_gpu(), p.host_experts), (0, 160));
        let p = plan(&sizes(), 4, None, Policy::NCpuMoe(2)).unwrap();
        assert_eq!(p.on_gpu.iter().map(|r| r.iter().filter(|&&g| g).count()).collect::<Vec<_>>(), vec![0, 0, 4]);
        let e = plan(&sizes(), 4, None, Policy::Budget(100)).unwrap_err().to_string();
        assert!(e.contains("does not hold the non-expert weights") && e.contains("--gpu-mem"), "{e}");
    }

    #[test]
    fn expert_layers_from_tensor_names() {
        assert_eq!(expert_layer("blk.12.ffn_up_exps.weight"), Some(12));
        assert_eq!(expert_layer("blk.3.ffn_gate_inp.weight"), None);
        assert_eq!(expert_layer("token_embd.weight"), None);
    }

    #[test]
    fn rebalance_swaps_the_most_used_host_experts_in_and_keeps_counts_per_layer() {
        // layer 0: experts 0, 1 on the GPU; 3 is now the most used, 2 next, 0 rarely used
        let on_gpu = vec![vec![true, true, false, false], vec![true, false, true, false]];
        let counts = vec![vec![1, 50, 40, 90], vec![10, 11, 30, 0]];
        let swaps = rebalance(&on_gpu, &counts, 0.25);
        assert_eq!(
            swaps,
            vec![Swap { layer: 0, demote: 0, promote: 3 }],
            "1 (50 uses) keeps its slot against 2 (40); layer 1: 11 is not 25% above 10"
        );
        // with no margin the near-tie of layer 1 moves too; zero counts never do
        let swaps = rebalance(&on_gpu, &counts, 0.0);
        assert_eq!(swaps, vec![Swap { layer: 0, demote: 0, promote: 3 }, Swap { layer: 1, demote: 0, promote: 1 }]);
        assert!(rebalance(&on_gpu, &[vec![0; 4], vec![0; 4]], 0.0).is_empty());
        // every expert resident, or none: nothing to exchange
        assert!(rebalance(&[vec![true; 4]], &[vec![5, 1, 9, 2]], 0.0).is_empty());
        assert!(rebalance(&[vec![false; 4]], &[vec![5, 1, 9, 2]], 0.0).is_empty());
    }

    #[test]
    fn cold_bytes_per_token_weigh_host_experts_by_their_routing_frequency() {
        // 2 layers of 3 experts, 100 tokens, 2 choices per token per layer
        let stats = ExpertStats { tokens: 100, counts: vec![vec![120, 50, 30], vec![100, 100, 0]] };
        let p = Placement { on_gpu: vec![vec![true, false, false], vec![false, true, true]], resident: 0, gpu_experts: 0, host_experts: 0 };
        // layer 0: experts 1, 2 on the host, 0.8 choices per token x 10 bytes; layer 1:
        // expert 0, 1.0 choice per token x 20 bytes
        assert_eq!(p.cold_bytes_per_token(&stats, &[10, 20]), 8.0 + 20.0);
        let all = Placement { on_gpu: vec![vec![true; 3]; 2], ..p.clone() };
        assert_eq!(all.cold_bytes_per_token(&stats, &[10, 20]), 0.0);
        assert_eq!(p.expected_cold_bytes(Some(&stats), &[10, 20], 2), 28.0);
        // without statistics: 2 choices spread over 3 experts, 2 of 3 (layer 0) and 1 of 3
        // (layer 1) on the host
        assert!((p.expected_cold_bytes(None, &[10, 20], 2) - (2.0 * 2.0 / 3.0 * 10.0 + 2.0 / 3.0 * 20.0)).abs() < 1e-9);
        assert_eq!((p.host_layers(), all.host_layers()), (2, 0));
        // a GPU of a split that runs layer 1 only
        let second = p.only(1..2);
        assert_eq!((second.host_layers(), second.cold_bytes_per_token(&stats, &[10, 20])), (1, 20.0));
    }
}
