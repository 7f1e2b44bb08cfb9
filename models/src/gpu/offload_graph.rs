//! Decode with experts in host memory inside the step's CUDA graph ([`ColdExperts::Host`],
//! issue 7). Each layer with host experts routes on the GPU and posts the layer's input
//! and the router's choices to the GPU's host worker, which computes the chosen host
//! experts on the CPU (ggml's kernels on the mapped file) while the GPU computes the
//! resident ones; the GPU then waits for the worker's rows. The host's rows then replace the cold
//! choices' rows and one kernel combines them with the routing weights, as
//! [`GpuModel::moe_offload`] does outside a graph. See mxr_kernels::cuda::host_call.
//!
//! [`ColdExperts::Host`]: super::ColdExperts::Host

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use mxr_kernels::cpu::{swiglu_ffn, Threads};
use mxr_kernels::cuda::{CudaSlice, CudaView, HostCall};

use super::{GpuLayer, GpuModel};
use crate::{Model, ModelError};

impl GpuModel {
    /// The MoE block of one decoded token, captured: as [`GpuModel::moe_offload`], the
    /// host experts computed by `call` (from [`GpuModel::cold_calls`]).
    pub(crate) fn moe_offload_captured(
        &self,
        call: &Arc<HostCall>,
        layer: &GpuLayer,
        x: &CudaView<'_, f32>,
        counts: &mut CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>, ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, k) = (c.dim, c.n_experts_used);
        let (ids, weights) = self.route(layer, x, 1, counts)?;
        g.host_post(call, &x.slice(..d), &ids.as_view())?;
        let mut y = g.zeros::<f32>(k * d)?;
        // every choice on the GPU, host experts' at place 0: those rows are replaced below
        if let Some(table) = &layer.slot_table {
            let mut places = g.alloc::<i32>(k)?;
            g.map_ids(&ids.as_view(), &table.as_view(), &mut places.as_view_mut())?;
            self.experts_matvec(layer.experts(), &places, x, None, 1, k, k, &mut y.as_view_mut())?;
        }
        let mut from_host = g.alloc::<f32>(k + k * d)?;
        g.host_wait(call, &mut from_host.as_view_mut())?;
        g.take_flagged_rows(&from_host.as_view(), k, d, &mut y.as_view_mut())?;
        let mut out = g.alloc::<f32>(d)?;
        g.moe_combine(&y.as_view(), &weights.as_view(), 1, k, d, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// Per layer of this model, the host call of its decode graph where the layer keeps
    /// experts in host memory (as the placement is now).
    pub(crate) fn cold_calls(&self, host: &Model) -> Result<Vec<Option<Arc<HostCall>>>, ModelError> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, layer)| layer.slot.as_ref().map(|slot| self.cold_call(host, self.first_layer + l, slot)).transpose())
            .collect()
    }

    /// The host call's work for model layer `l`: for each choice of a host expert (slot
    /// None), its flag and its output row; the counters count them.
    fn cold_call(&self, host: &Model, l: usize, slot: &[Option<u32>]) -> Result<Arc<HostCall>, ModelError> {
        let c = &self.config;
        let (d, h, k) = (c.dim, c.hidden_dim, c.n_experts_used);
        let hl = host.layers.get(l).ok_or_else(|| ModelError::Input(format!("the host model has no layer {l}")))?;
        let [gate, up, down] = [&hl.gate_exps, &hl.up_exps, &hl.down_exps].map(|t| host.host_matrix(t));
        let cold: Vec<bool> = slot.iter().map(Option::is_none).collect();
        let (experts, bytes) = (self.cpu_experts.clone(), self.cold_bytes.clone());
        let work = move |x: &[f32], ids: &[i32], out: &mut [f32]| -> Result<(), String> {
            let (flags, rows) = out.split_at_mut(k);
            for (j, &e) in ids.iter().enumerate() {
                let e = usize::try_from(e).ok().filter(|&e| e < cold.len()).ok_or_else(|| format!("GPU router chose expert {e}"))?;
                flags[j] = if cold[e] { 1.0 } else { 0.0 };
                if !cold[e] {
                    continue;
                }
                let [g, u, dn] = [(&gate, h), (&up, h), (&down, d)]
                    .map(|(m, rows)| m.rows(e * rows, rows).ok_or_else(|| format!("expert {e} lies outside its tensor")));
                let (g, u, dn) = (g?, u?, dn?);
                bytes.fetch_add((g.data.len() + u.data.len() + dn.data.len()) as u64, Relaxed);
                swiglu_ffn(&g, &u, &dn, 0..h, x, 1, &mut rows[j * d..(j + 1) * d], Threads::all())
                    .map_err(|why| format!("layer {l}, expert {e}: {why}"))?;
                experts.fetch_add(1, Relaxed);
            }
            Ok(())
        };
        Ok(self.gpu.host_call(d, k, k + k * d, Box::new(work))?)
    }
}
