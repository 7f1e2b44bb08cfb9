//! The MoE block when some experts stay in host memory (issue 7): the GPU routes, then
//! the token's choices split into resident experts (GPU, matrix-vector or grouped
//! tensor-core products on the compacted stacks) and host experts (CPU, ggml's kernels on
//! the mapped file). The GPU part is queued first and runs while the CPU computes; the
//! host results are uploaded into the same per-(token, choice) rows and one kernel
//! combines them with the routing weights.

use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::{quantized, CudaSlice, CudaView};

use super::{GpuLayer, GpuModel, MATVEC_MAX_TOKENS};
use crate::forward::ops::{linear, silu};
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
        let host_ids = g.download(&ids.as_view())?;
        // (pair, slot) on the GPU; pairs per host expert
        let (mut hot, mut hot_slots) = (Vec::new(), Vec::new());
        let mut cold: Vec<Vec<usize>> = vec![Vec::new(); c.n_experts];
        for (p, &e) in host_ids.iter().enumerate() {
            let e = usize::try_from(e)
                .ok()
                .filter(|&e| e < c.n_experts)
                .ok_or_else(|| ModelError::Input(format!("GPU router chose expert {e}")))?;
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
        // GPU part: queued now, runs while the CPU works below.
        if !hot.is_empty() {
            let m = hot.len();
            let idx = g.upload(&hot)?;
            let mut xs = g.alloc::<f32>(m * d)?;
            g.gather_rows(x, &idx.as_view(), k, m, d, &mut xs.as_view_mut())?;
            let mut ys = g.alloc::<f32>(m * d)?;
            if m <= MATVEC_MAX_TOKENS * k {
                let sl = g.upload(&hot_slots)?;
                let mut gate = g.alloc::<f32>(m * h)?;
                let mut up = g.alloc::<f32>(m * h)?;
                let act = if quantized(layer.gate_exps.qtype) { Some(g.quantize_act(&xs.as_view(), m, d)?) } else { None };
                g.matvec_with(&layer.gate_exps, Some(&sl), &xs.as_view(), act.as_ref(), 1, m, &mut gate.as_view_mut())?;
                g.matvec_with(&layer.up_exps, Some(&sl), &xs.as_view(), act.as_ref(), 1, m, &mut up.as_view_mut())?;
                let mut a = g.alloc::<f32>(m * h)?;
                g.swiglu(&gate.as_view(), &up.as_view(), &mut a.as_view_mut())?;
                g.matvec(&layer.down_exps, Some(&sl), &a.as_view(), 1, m, &mut ys.as_view_mut())?;
            } else {
                // grouped by slot: the rows of xs that go to each resident expert
                let mut by_slot: Vec<Vec<i32>> = vec![Vec::new(); layer.gate_exps.n_experts];
                for (i, &s) in hot_slots.iter().enumerate() {
                    by_slot[s as usize].push(i as i32);
                }
                let most = by_slot.iter().map(Vec::len).max().unwrap_or(0);
                let (mut xe, mut gate, mut up, mut a, mut ye) = (
                    g.alloc::<f32>(most * d)?,
                    g.alloc::<f32>(most * h)?,
                    g.alloc::<f32>(most * h)?,
                    g.alloc::<f32>(most * h)?,
                    g.alloc::<f32>(most * d)?,
                );
                for (s, rows) in by_slot.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                    let r = rows.len();
                    let ri = g.upload(rows)?;
                    g.gather_rows(&xs.as_view(), &ri.as_view(), 1, r, d, &mut xe.as_view_mut())?;
                    let mut xb = super::Bf16Input::default();
                    self.gemm_with(&layer.gate_exps, s, &xe.as_view(), &mut xb, r, &mut gate.slice_mut(..r * h))?;
                    self.gemm_with(&layer.up_exps, s, &xe.as_view(), &mut xb, r, &mut up.slice_mut(..r * h))?;
                    g.swiglu(&gate.slice(..r * h), &up.slice(..r * h), &mut a.slice_mut(..r * h))?;
                    self.gemm(&layer.down_exps, s, &a.as_view(), r, &mut ye.slice_mut(..r * d))?;
                    g.scatter_rows(&ye.as_view(), &ri.as_view(), r, d, &mut ys.as_view_mut())?;
                }
            }
            g.scatter_rows(&ys.as_view(), &idx.as_view(), m, d, &mut y.as_view_mut())?;
        }
        // CPU part: each host expert over its tokens, ggml's kernels on the mapped weights.
        if any_cold {
            let hl = &host.layers[l];
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
}
