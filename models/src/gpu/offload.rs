//! The MoE block when some experts stay in host memory (issue 7): the GPU routes, then
//! the token's choices split into resident experts (GPU, matrix-vector or grouped
//! tensor-core products on the compacted stacks) and host experts (CPU, ggml's kernels on
//! the mapped file). The GPU part is queued first and runs while the CPU computes; the
//! host results are uploaded into the same per-(token, choice) rows and one kernel
//! combines them with the routing weights.

use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::{CudaSlice, CudaView, GpuMatrix};

use super::{GpuLayer, GpuModel, MATVEC_MAX_TOKENS};
use crate::forward::ops::{linear, silu};
use crate::offload_cost::ColdChoice;
use crate::placement::{rebalance, Swap};
use crate::{Model, ModelError};

impl GpuModel {
    /// As [`GpuModel::moe`], with `slot[e]` giving expert e's place in the layer's GPU stacks
    /// (None: in host memory, computed from `host`'s layer `l`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe_offload(
        &self,
        host: &Model,
        l: usize,
        layer: &GpuLayer,
        slot: &[Option<u32>],
        x: &CudaView<'_, f32>,
        n: usize,
        counts: &mut CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>, ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, h, k) = (c.dim, c.hidden_dim, c.n_experts_used);
        let (ids, weights) = self.route(layer, x, n, counts)?;
        // (pair, slot) on the GPU; pairs per host expert
        let (mut hot, mut hot_slots) = (Vec::new(), Vec::new());
        let mut cold: Vec<Vec<usize>> = vec![Vec::new(); c.n_experts];
        for (p, e) in self.chosen_experts(&ids)?.into_iter().enumerate() {
            match slot[e] {
                Some(s) => {
                    hot.push(p as i32);
                    hot_slots.push(s as i32);
                }
                None => cold[e].push(p),
            }
        }
        let any_cold = cold.iter().any(|v| !v.is_empty());
        let xh = if any_cold { g.download(&x.slice(..n * d))? } else { Vec::new() };
        let mut y = g.zeros::<f32>(n * k * d)?;
        // The cost model picks, per host expert and batch, the CPU or a copy to the GPU.
        let hl = &host.layers[l];
        let bytes = |t: &crate::model::Tensor, first: usize, n: usize| host.rows(t, first, n).data.len() as u64;
        let flops = 2.0 * 3.0 * d as f64 * h as f64;
        let mut copy: Vec<usize> = Vec::new();
        let qtype = host.matrix(&hl.gate_exps).qtype;
        // copies straight from the page-locked mapping (types kept as in the file) go at the
        // pinned rate
        let direct = mxr_kernels::cuda::matrix::as_in_file(qtype) && self.pinned_bytes() > 0;
        let rates = if direct { self.rates.pinned() } else { self.rates };
        let (mut cold_bytes, mut on_cpu) = (0, 0);
        for (e, ps) in cold.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            let b = bytes(&hl.gate_exps, e * h, h) + bytes(&hl.up_exps, e * h, h) + bytes(&hl.down_exps, e * d, d);
            cold_bytes += b;
            if rates.choose(b, ps.len(), flops) == ColdChoice::CopyToGpu {
                copy.push(e);
            } else {
                on_cpu += 1;
            }
        }
        self.cold_bytes.fetch_add(cold_bytes, std::sync::atomic::Ordering::Relaxed);
        self.cpu_experts.fetch_add(on_cpu, std::sync::atomic::Ordering::Relaxed);
        // The copied experts' stacks: gate, up and down rows per expert.
        let parts = [(&hl.gate_exps, h), (&hl.up_exps, h), (&hl.down_exps, d)];
        // Straight from the page-locked mapping: the stacks are allocated before the resident
        // products are queued, so that their copies on the side stream wait for the
        // allocation only, and run beside those products.
        let empty = |(t, rows): (&crate::model::Tensor, usize)| -> Result<GpuMatrix, ModelError> {
            let m = host.rows(t, 0, rows);
            Ok(GpuMatrix::empty(g, m.qtype, copy.len(), rows, m.cols)?)
        };
        let direct = if direct && !copy.is_empty() { Some([empty(parts[0])?, empty(parts[1])?, empty(parts[2])?]) } else { None };
        // GPU part: queued now, runs while the copies and the CPU work below.
        let mats = layer.experts();
        self.pairs_on_gpu(mats, &hot, &hot_slots, x, &mut y)?;
        if !copy.is_empty() {
            // the routed cold experts' weights, once for this batch, then the same grouped
            // products as resident experts
            let [gm, um, dm] = match direct {
                Some(mut stacks) => {
                    for (m, (t, rows)) in stacks.iter_mut().zip(parts) {
                        for (i, &e) in copy.iter().enumerate() {
                            m.copy_expert_side(g, i, host.rows(t, e * rows, rows).data)?;
                        }
                    }
                    stacks
                }
                None => {
                    let upload = |(t, rows): (&crate::model::Tensor, usize)| -> Result<GpuMatrix, ModelError> {
                        let m = host.rows(t, 0, rows);
                        let data: Vec<u8> = copy.iter().flat_map(|&e| host.rows(t, e * rows, rows).data.iter().copied()).collect();
                        Ok(GpuMatrix::upload(g, m.qtype, copy.len(), rows, m.cols, &data)?)
                    };
                    [upload(parts[0])?, upload(parts[1])?, upload(parts[2])?]
                }
            };
            // the same products (and arithmetic) as resident experts of a batch this size
            let (mut pairs, mut slots) = (Vec::new(), Vec::new());
            for (i, &e) in copy.iter().enumerate() {
                pairs.extend(cold[e].iter().map(|&p| p as i32));
                slots.extend(std::iter::repeat_n(i as i32, cold[e].len()));
            }
            self.pairs_on_gpu([&gm, &um, &dm], &pairs, &slots, x, &mut y)?;
            self.copied_experts.fetch_add(copy.len() as u64, std::sync::atomic::Ordering::Relaxed);
            for &e in &copy {
                cold[e].clear();
            }
        }
        // CPU part: each remaining host expert over its tokens, ggml's kernels on the mapped weights.
        if cold.iter().any(|v| !v.is_empty()) {
            let threads = Threads::all();
            let (mut rows, mut out) = (Vec::new(), Vec::new());
            for (e, ps) in cold.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
                let m = ps.len();
                let xs: Vec<f32> = ps.iter().flat_map(|&p| xh[(p / k) * d..(p / k + 1) * d].iter().copied()).collect();
                let gate = linear(&host.rows(&hl.gate_exps, e * h, h), &xs, m, threads)?;
                let up = linear(&host.rows(&hl.up_exps, e * h, h), &xs, m, threads)?;
                let act: Vec<f32> = gate.iter().zip(&up).map(|(&a, &b)| silu(a) * b).collect();
                out.extend(linear(&host.rows(&hl.down_exps, e * d, d), &act, m, threads)?);
                rows.extend(ps.iter().map(|&p| p as i32));
            }
            let (yc, idx) = (g.upload(&out)?, g.upload(&rows)?);
            g.scatter_rows(&yc.as_view(), &idx.as_view(), rows.len(), d, &mut y.as_view_mut())?;
        }
        let mut out = g.alloc::<f32>(n * d)?;
        g.moe_combine(&y.as_view(), &weights.as_view(), n, k, d, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// Expert products for the (token, choice) pairs `pairs` (row p reads token p / k),
    /// pair i by stack entry slots[i] of `mats`; outputs go to row p of y. Up to
    /// MATVEC_MAX_TOKENS * k pairs: the matrix-vector kernels (int8 activations); more:
    /// tensor-core products grouped by entry.
    fn pairs_on_gpu(
        &self,
        mats: [&GpuMatrix; 3],
        pairs: &[i32],
        slots: &[i32],
        x: &CudaView<'_, f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, k, m) = (c.dim, c.n_experts_used, pairs.len());
        if m == 0 {
            return Ok(());
        }
        let idx = g.upload(pairs)?;
        let mut xs = g.alloc::<f32>(m * d)?;
        g.gather_rows(x, &idx.as_view(), k, m, d, &mut xs.as_view_mut())?;
        let mut ys = g.alloc::<f32>(m * d)?;
        if m <= MATVEC_MAX_TOKENS * k {
            let sl = g.upload(slots)?;
            self.experts_matvec(mats, &sl, &xs.as_view(), None, m, 1, m, &mut ys.as_view_mut())?;
        } else {
            // grouped by entry: the rows of xs that go to each expert of the stack
            let mut by_slot: Vec<Vec<i32>> = vec![Vec::new(); mats[0].n_experts];
            for (i, &s) in slots.iter().enumerate() {
                by_slot[s as usize].push(i as i32);
            }
            self.experts_grouped(mats, &by_slot, &xs.as_view(), 1, &mut ys.as_view_mut())?;
        }
        g.scatter_rows(&ys.as_view(), &idx.as_view(), m, d, &mut y.as_view_mut())?;
        Ok(())
    }
}

impl GpuModel {
    /// Whether expert `e` of layer `l` is on the GPU.
    pub fn resident(&self, l: usize, e: usize) -> bool {
        self.layers.get(l).is_some_and(|layer| layer.slot.as_ref().is_none_or(|s| s.get(e).is_some_and(Option::is_some)))
    }

    /// `--expert-rebalance`: moves the most used host experts onto the GPU in place of the
    /// least used resident ones (see [`crate::placement::rebalance`]), by the routing
    /// counts `counts[layer][expert]`; `host` supplies the weights. Same memory, same
    /// number of experts per layer. Returns the exchanges made.
    pub fn rebalance(&mut self, host: &Model, counts: &[Vec<u64>], margin: f64) -> Result<Vec<Swap>, ModelError> {
        let (d, h) = (self.config.dim, self.config.hidden_dim);
        let on_gpu: Vec<Vec<bool>> = self
            .layers
            .iter()
            .map(|l| l.slot.as_ref().map_or_else(|| vec![true; self.config.n_experts], |s| s.iter().map(Option::is_some).collect()))
            .collect();
        let swaps = rebalance(&on_gpu, counts, margin);
        for sw in &swaps {
            let hl = &host.layers[sw.layer];
            let layer = &mut self.layers[sw.layer];
            let Some(slot) = layer.slot.as_mut() else { continue };
            let Some(s) = slot[sw.demote] else { continue };
            let e = sw.promote;
            layer.gate_exps.write_expert(&self.gpu, s as usize, host.rows(&hl.gate_exps, e * h, h).data)?;
            layer.up_exps.write_expert(&self.gpu, s as usize, host.rows(&hl.up_exps, e * h, h).data)?;
            layer.down_exps.write_expert(&self.gpu, s as usize, host.rows(&hl.down_exps, e * d, d).data)?;
            slot[sw.demote] = None;
            slot[e] = Some(s);
        }
        Ok(swaps)
    }
}
