//! The MoE block on the GPU (spec section 6). Routing (f32 softmax, top-k, renormalised
//! weights) runs on the device. Few tokens: the experts' matrix-vector products read the
//! expert ids from device memory (no host round trip, so decode can be captured whole).
//! Many tokens: the ids come back to the host, tokens are grouped by expert, and each
//! expert runs three tensor-core products over its tokens; results land in per-(token,
//! choice) rows that one kernel combines with the routing weights.

use mxr_kernels::cuda::{quantized, CudaSlice, CudaView, CudaViewMut, GpuMatrix, Part, QAct};
use mxr_quant::QType;

use super::forward::Pending;
use super::{Bf16Input, GpuLayer, GpuModel, MATVEC_MAX_TOKENS};
use crate::ModelError;

/// The router's output for a batch: expert ids and weights [n, k] (device), and for
/// batches above [`MATVEC_MAX_TOKENS`] the pairs of each expert (host).
pub(crate) struct Routed {
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    groups: Option<Vec<Vec<i32>>>,
}

impl Routed {
    /// The expert ids and weights, [n, k] each.
    pub(crate) fn into_parts(self) -> (CudaSlice<i32>, CudaSlice<f32>) {
        (self.ids, self.weights)
    }
}

impl GpuModel {
    /// The router on the GPU: expert ids and renormalised weights, [n, k] each.
    pub(crate) fn route(
        &self,
        layer: &GpuLayer,
        x: &CudaView<'_, f32>,
        n: usize,
        counts: &mut CudaSlice<u32>,
    ) -> Result<(CudaSlice<i32>, CudaSlice<f32>), ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let k = c.n_experts_used;
        let mut ids = g.alloc::<i32>(n * k)?;
        let mut weights = g.alloc::<f32>(n * k)?;
        // few tokens: the product and the top-k in one kernel
        if n <= MATVEC_MAX_TOKENS && g.route_fused(&layer.router, x, n, k, &mut ids.as_view_mut(), &mut weights.as_view_mut(), counts)? {
            return Ok((ids, weights));
        }
        let logits = self.linear(&layer.router, x, n)?;
        g.route_topk(&logits.as_view(), n, c.n_experts, k, &mut ids.as_view_mut(), &mut weights.as_view_mut(), counts)?;
        Ok((ids, weights))
    }

    /// The MoE's first half (m [n, dim] = Σ_k w_k E_k(x) for each row of x, counts[e] +=
    /// choices of e): the router's choices, and for many tokens the (token, choice)
    /// pairs grouped by expert on the host (which waits for the router).
    pub(crate) fn moe_route(
        &self,
        layer: &GpuLayer,
        x: &CudaView<'_, f32>,
        n: usize,
        counts: &mut CudaSlice<u32>,
    ) -> Result<Routed, ModelError> {
        let (ids, weights) = self.route(layer, x, n, counts)?;
        let groups = if n <= MATVEC_MAX_TOKENS {
            None
        } else {
            let mut pairs: Vec<Vec<i32>> = vec![Vec::new(); self.config.n_experts];
            for (p, e) in self.chosen_experts(&ids)?.into_iter().enumerate() {
                pairs[e].push(p as i32);
            }
            Some(pairs)
        };
        Ok(Routed { ids, weights, groups })
    }

    /// Decode's MoE norm and router in one kernel ([`mxr_kernels::cuda::Gpu::moe_norm_route`]),
    /// where that fusion applies: x becomes the normalised row (alpha x + beta `pending`,
    /// normalised with the layer's MoE norm; a new buffer), and the router's choices and,
    /// with `quantize`, x's int8 form come back. None, with nothing queued and x as it was,
    /// where it does not apply (then the caller runs the norm and the router apart).
    pub(crate) fn norm_route(
        &self,
        layer: &GpuLayer,
        x: &mut CudaSlice<f32>,
        pending: Option<&Pending>,
        quantize: bool,
        counts: &mut CudaSlice<u32>,
    ) -> Result<Option<(Routed, Option<QAct>)>, ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let residual = pending.map(|p| p.residual(0..1, c.dim));
        let eps = c.rms_eps as f32;
        let Some(r) =
            g.moe_norm_route(&x.as_view(), residual.as_ref(), &layer.ffn_norm, eps, quantize, &layer.router, c.n_experts_used, counts)?
        else {
            return Ok(None);
        };
        *x = r.x;
        Ok(Some((Routed { ids: r.ids, weights: r.weights, groups: None }, r.act)))
    }

    /// The MoE's second half: the chosen experts over x, y [n k, dim] (row t k + j: token
    /// t's choice j), and the routing weights [n, k] that combine them (the next norm does,
    /// or [`Pending::apply`]). `pre`: x's int8 form, if already made (decode).
    pub(crate) fn moe_experts(
        &self,
        layer: &GpuLayer,
        r: Routed,
        x: &CudaView<'_, f32>,
        n: usize,
        pre: Option<&QAct>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>), ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, k) = (c.dim, c.n_experts_used);
        let mut y = g.alloc::<f32>(n * k * d)?;
        match &r.groups {
            None => self.experts_matvec(layer.experts(), &r.ids, x, pre, n, k, n * k, &mut y.as_view_mut())?,
            Some(pairs) => self.experts_grouped(layer.experts(), pairs, x, k, &mut y.as_view_mut())?,
        }
        Ok((y, r.weights))
    }

    /// y [pairs, dim] = E_{ids[p]}(x[p / x_div]) for every pair, E from the stacks of gate,
    /// up and down matrices (a layer's, or cold experts copied to the GPU): matrix-vector
    /// products that read the expert ids from device memory; x has `x_rows` rows,
    /// quantized once for the gate and up products (unless `pre` holds that form already).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn experts_matvec(
        &self,
        stacks: [&GpuMatrix; 3],
        ids: &CudaSlice<i32>,
        x: &CudaView<'_, f32>,
        pre: Option<&QAct>,
        x_rows: usize,
        x_div: usize,
        pairs: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), ModelError> {
        // the stacks' own hidden size: a cold expert's GPU share may hold part of it
        self.experts_matvec_part(stacks, stacks[0].rows, ids, x, pre, x_rows, x_div, pairs, y)
    }

    /// [`GpuModel::experts_matvec`] over each expert's hidden units 0..hidden only (gate
    /// and up rows, the down projection's columns): the GPU's share of cold experts read in
    /// place, whose other units the host computes (offload_graph.rs). y gets that share's
    /// part of each output, which the host's part is added to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn experts_matvec_part(
        &self,
        [gate_exps, up_exps, down_exps]: [&GpuMatrix; 3],
        hidden: usize,
        ids: &CudaSlice<i32>,
        x: &CudaView<'_, f32>,
        pre: Option<&QAct>,
        x_rows: usize,
        x_div: usize,
        pairs: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, h) = (c.dim, hidden);
        let in_part = |w: &GpuMatrix| Part { rows: h.min(w.rows), cols: w.cols };
        let mut gate = g.alloc::<f32>(pairs * h)?;
        let mut up = g.alloc::<f32>(pairs * h)?;
        let act = if quantized(gate_exps.qtype) { Some(self.int8_input(x, x_rows, d, pre)?) } else { None };
        let act = act.as_deref();
        match act.filter(|_| up_exps.qtype == gate_exps.qtype && up_exps.cols == gate_exps.cols && g.tuning.matvec_pair) {
            // gate and up in one launch
            Some(a) => g.matvec_pair_rows(
                [gate_exps, up_exps],
                [h, h],
                Some(ids),
                a,
                x_div,
                pairs,
                [&mut gate.as_view_mut(), &mut up.as_view_mut()],
            )?,
            None => {
                g.matvec_part(gate_exps, in_part(gate_exps), Some(ids), x, act, x_div, pairs, &mut gate.as_view_mut())?;
                g.matvec_part(up_exps, in_part(up_exps), Some(ids), x, act, x_div, pairs, &mut up.as_view_mut())?;
            }
        }
        let down = Part { rows: down_exps.rows, cols: h };
        if quantized(down_exps.qtype) && h.is_multiple_of(32) {
            // SwiGLU straight into the down product's int8 input (its f32 form is never
            // read: gate stands in for it in the shape check)
            let a = g.swiglu_quantize(&gate.as_view(), &up.as_view(), pairs, h)?;
            g.matvec_part(down_exps, down, Some(ids), &gate.as_view(), Some(&a), 1, pairs, y)?;
        } else {
            let mut a = g.alloc::<f32>(pairs * h)?;
            g.swiglu(&gate.as_view(), &up.as_view(), &mut a.as_view_mut())?;
            g.matvec_part(down_exps, down, Some(ids), &a.as_view(), None, 1, pairs, y)?;
        }
        Ok(())
    }

    /// Tensor-core products grouped by expert: groups[e] lists the output rows that stack
    /// entry e (of the gate, up and down stacks) computes; row i reads x row i / x_div and
    /// is written to y row i. Rows are gathered, and SwiGLU written, straight into bf16
    /// (F32 stacks keep f32 products).
    pub(crate) fn experts_grouped(
        &self,
        [gate_exps, up_exps, down_exps]: [&GpuMatrix; 3],
        groups: &[Vec<i32>],
        x: &CudaView<'_, f32>,
        x_div: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, h) = (c.dim, gate_exps.rows);
        let exact = [gate_exps, up_exps, down_exps].iter().any(|w| w.qtype == QType::F32);
        let most = groups.iter().map(Vec::len).max().unwrap_or(0);
        let mut gate = g.alloc::<f32>(most * h)?;
        let mut up = g.alloc::<f32>(most * h)?;
        let mut ys = g.alloc::<f32>(most * d)?;
        for (e, rows) in groups.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let m = rows.len();
            let idx = g.upload(rows)?;
            let (gm, um) = (&mut gate.slice_mut(..m * h), &mut up.slice_mut(..m * h));
            if exact {
                let mut xs = g.alloc::<f32>(m * d)?;
                g.gather_rows(x, &idx.as_view(), x_div, m, d, &mut xs.as_view_mut())?;
                let mut xb = Bf16Input::default();
                self.gemm_with(gate_exps, e, &xs.as_view(), &mut xb, m, gm)?;
                self.gemm_with(up_exps, e, &xs.as_view(), &mut xb, m, um)?;
                let mut act = g.alloc::<f32>(m * h)?;
                g.swiglu(&gate.slice(..m * h), &up.slice(..m * h), &mut act.as_view_mut())?;
                self.gemm(down_exps, e, &act.as_view(), m, &mut ys.slice_mut(..m * d))?;
            } else {
                let mut xb = g.alloc::<u16>(m * d)?;
                g.gather_rows_bf16(x, &idx.as_view(), x_div, m, d, &mut xb.as_view_mut())?;
                self.gemm_on_bf16(gate_exps, e, &xb.as_view(), m, gm)?;
                self.gemm_on_bf16(up_exps, e, &xb.as_view(), m, um)?;
                let mut ab = g.alloc::<u16>(m * h)?;
                g.swiglu_bf16(&gate.slice(..m * h), &up.slice(..m * h), &mut ab.as_view_mut())?;
                self.gemm_on_bf16(down_exps, e, &ab.as_view(), m, &mut ys.slice_mut(..m * d))?;
            }
            g.scatter_rows(&ys.as_view(), &idx.as_view(), m, d, y)?;
        }
        Ok(())
    }

    /// The router's choices on the host, one expert per (token, choice) pair, checked.
    pub(crate) fn chosen_experts(&self, ids: &CudaSlice<i32>) -> Result<Vec<usize>, ModelError> {
        self.checked_experts(self.gpu.download(&ids.as_view())?)
    }

    /// Downloaded router choices as expert indices, each checked against the expert count.
    pub(crate) fn checked_experts(&self, ids: Vec<i32>) -> Result<Vec<usize>, ModelError> {
        let n = self.config.n_experts;
        ids.into_iter()
            .map(|e| usize::try_from(e).ok().filter(|&e| e < n).ok_or_else(|| ModelError::Input(format!("GPU router chose expert {e}"))))
            .collect()
    }
}
