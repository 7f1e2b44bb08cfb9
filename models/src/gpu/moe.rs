//! The MoE block on the GPU (spec section 6). Routing (f32 softmax, top-k, renormalised
//! weights) runs on the device. Few tokens: the experts' matrix-vector products read the
//! expert ids from device memory (no host round trip, so decode can be captured whole).
//! Many tokens: the ids come back to the host, tokens are grouped by expert, and each
//! expert runs three tensor-core products over its tokens; results land in per-(token,
//! choice) rows that one kernel combines with the routing weights.

use mxr_kernels::cuda::{quantized, CudaSlice, CudaView};

use super::{Bf16Input, GpuLayer, GpuModel, MATVEC_MAX_TOKENS};
use crate::ModelError;

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
        let logits = self.linear(&layer.router, x, n)?;
        let mut ids = g.alloc::<i32>(n * k)?;
        let mut weights = g.alloc::<f32>(n * k)?;
        g.route_topk(&logits.as_view(), n, c.n_experts, k, &mut ids.as_view_mut(), &mut weights.as_view_mut(), counts)?;
        Ok((ids, weights))
    }

    /// m [n, dim] = Σ_k w_k E_k(x) for each row of x [n, dim]; counts[e] += choices of e.
    pub(crate) fn moe(
        &self,
        layer: &GpuLayer,
        x: &CudaView<'_, f32>,
        n: usize,
        counts: &mut CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>, ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, h, k) = (c.dim, c.hidden_dim, c.n_experts_used);
        let (ids, weights) = self.route(layer, x, n, counts)?;
        let mut y = g.alloc::<f32>(n * k * d)?;
        if n <= MATVEC_MAX_TOKENS {
            let mut gate = g.alloc::<f32>(n * k * h)?;
            let mut up = g.alloc::<f32>(n * k * h)?;
            // one quantization of x for both products
            let act = if quantized(layer.gate_exps.qtype) { Some(g.quantize_act(&x.slice(..n * d), n, d)?) } else { None };
            g.matvec_with(&layer.gate_exps, Some(&ids), x, act.as_ref(), k, n * k, &mut gate.as_view_mut())?;
            g.matvec_with(&layer.up_exps, Some(&ids), x, act.as_ref(), k, n * k, &mut up.as_view_mut())?;
            let mut act = g.alloc::<f32>(n * k * h)?;
            g.swiglu(&gate.as_view(), &up.as_view(), &mut act.as_view_mut())?;
            g.matvec(&layer.down_exps, Some(&ids), &act.as_view(), 1, n * k, &mut y.as_view_mut())?;
        } else {
            let host_ids = g.download(&ids.as_view())?;
            let mut pairs: Vec<Vec<i32>> = vec![Vec::new(); c.n_experts];
            for (p, &e) in host_ids.iter().enumerate() {
                let e = usize::try_from(e)
                    .ok()
                    .filter(|&e| e < c.n_experts)
                    .ok_or_else(|| ModelError::Input(format!("GPU router chose expert {e}")))?;
                pairs[e].push(p as i32);
            }
            let most = pairs.iter().map(Vec::len).max().unwrap_or(0);
            let mut xs = g.alloc::<f32>(most * d)?;
            let mut gate = g.alloc::<f32>(most * h)?;
            let mut up = g.alloc::<f32>(most * h)?;
            let mut act = g.alloc::<f32>(most * h)?;
            let mut ys = g.alloc::<f32>(most * d)?;
            for (e, ps) in pairs.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
                let m = ps.len();
                let idx = g.upload(ps)?;
                g.gather_rows(x, &idx.as_view(), k, m, d, &mut xs.as_view_mut())?;
                let mut xb = Bf16Input::default();
                self.gemm_with(&layer.gate_exps, e, &xs.as_view(), &mut xb, m, &mut gate.slice_mut(..m * h))?;
                self.gemm_with(&layer.up_exps, e, &xs.as_view(), &mut xb, m, &mut up.slice_mut(..m * h))?;
                g.swiglu(&gate.slice(..m * h), &up.slice(..m * h), &mut act.slice_mut(..m * h))?;
                self.gemm(&layer.down_exps, e, &act.as_view(), m, &mut ys.slice_mut(..m * d))?;
                g.scatter_rows(&ys.as_view(), &idx.as_view(), m, d, &mut y.as_view_mut())?;
            }
        }
        let mut out = g.alloc::<f32>(n * d)?;
        g.moe_combine(&y.as_view(), &weights.as_view(), n, k, d, &mut out.as_view_mut())?;
        Ok(out)
    }
}
