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

/// A layer's part of a decode graph with experts in host memory: the host call, and with
/// `--cold-experts mixed` the layer's table of experts in host memory (1, else 0) on the
/// GPU, from which `mixed_places` picks the CPU's choice.
pub(crate) struct LayerCall {
    call: Arc<HostCall>,
    mixed: Option<CudaSlice<i32>>,
}

impl GpuModel {
    /// The MoE block of one decoded token, captured: as [`GpuModel::moe_offload`], the
    /// host experts computed by `lc`'s call (from [`GpuModel::cold_calls`]). The CPU's way:
    /// it takes every cold choice, and the GPU computes every other choice (cold ones at
    /// place 0, replaced). Mixed: the CPU takes the first cold choice, which the GPU skips,
    /// and the GPU reads any other in place.
    pub(crate) fn moe_offload_captured(
        &self,
        lc: &LayerCall,
        layer: &GpuLayer,
        x: &CudaView<'_, f32>,
        counts: &mut CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>, ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, k) = (c.dim, c.n_experts_used);
        let (ids, weights) = self.route(layer, x, 1, counts)?;
        g.host_post(&lc.call, &x.slice(..d), &ids.as_view())?;
        let mut y = g.zeros::<f32>(k * d)?;
        let table = match &lc.mixed {
            Some(cold) => Some((cold, true)),
            None => layer.slot_table.as_ref().map(|t| (t, false)),
        };
        if let Some((table, mixed)) = table {
            let mut places = g.alloc::<i32>(k)?;
            if mixed {
                g.mixed_places(&ids.as_view(), &table.as_view(), &mut places.as_view_mut())?;
            } else {
                g.map_ids(&ids.as_view(), &table.as_view(), &mut places.as_view_mut())?;
            }
            self.experts_matvec(layer.experts(), &places, x, None, 1, k, k, &mut y.as_view_mut())?;
        }
        let mut from_host = g.alloc::<f32>(k + k * d)?;
        g.host_wait(&lc.call, &mut from_host.as_view_mut())?;
        g.take_flagged_rows(&from_host.as_view(), k, d, &mut y.as_view_mut())?;
        let mut out = g.alloc::<f32>(d)?;
        g.moe_combine(&y.as_view(), &weights.as_view(), 1, k, d, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// Per layer of this model, its part of a decode graph where the layer keeps experts in
    /// host memory (as the placement is now).
    pub(crate) fn cold_calls(&self, host: &Model) -> Result<Vec<Option<LayerCall>>, ModelError> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                let Some(slot) = layer.slot.as_ref() else { return Ok(None) };
                // mixed: every expert has its place in the stacks, cold ones in host pages
                let mixed = layer.gate_exps.placed_on_gpu(0).is_some();
                let table = if mixed {
                    let cold: Vec<i32> = slot.iter().map(|s| s.is_none() as i32).collect();
                    Some(self.gpu.upload(&cold)?)
                } else {
                    None
                };
                Ok(Some(LayerCall { call: self.cold_call(host, self.first_layer + l, slot, mixed)?, mixed: table }))
            })
            .collect()
    }

    /// The host call's work for model layer `l`: for each choice the CPU takes (every one
    /// of a host expert, slot None; mixed: the first such), its flag and its output row;
    /// the counters count them, and mixed's cold choices read in place.
    fn cold_call(&self, host: &Model, l: usize, slot: &[Option<u32>], mixed: bool) -> Result<Arc<HostCall>, ModelError> {
        let c = &self.config;
        let (d, h, k) = (c.dim, c.hidden_dim, c.n_experts_used);
        let hl = host.layers.get(l).ok_or_else(|| ModelError::Input(format!("the host model has no layer {l}")))?;
        let [gate, up, down] = [&hl.gate_exps, &hl.up_exps, &hl.down_exps].map(|t| host.host_matrix(t));
        let cold: Vec<bool> = slot.iter().map(Option::is_none).collect();
        let (on_cpu, in_place, bytes) = (self.cpu_experts.clone(), self.in_place_experts.clone(), self.cold_bytes.clone());
        let work = move |x: &[f32], ids: &[i32], out: &mut [f32]| -> Result<(), String> {
            let (flags, rows) = out.split_at_mut(k);
            let mut taken = false;
            for (j, &e) in ids.iter().enumerate() {
                let e = usize::try_from(e).ok().filter(|&e| e < cold.len()).ok_or_else(|| format!("GPU router chose expert {e}"))?;
                let cpu = cold[e] && !(mixed && taken);
                flags[j] = if cpu { 1.0 } else { 0.0 };
                if !cold[e] {
                    continue;
                }
                let [g, u, dn] = [(&gate, h), (&up, h), (&down, d)]
                    .map(|(m, rows)| m.rows(e * rows, rows).ok_or_else(|| format!("expert {e} lies outside its tensor")));
                let (g, u, dn) = (g?, u?, dn?);
                bytes.fetch_add((g.data.len() + u.data.len() + dn.data.len()) as u64, Relaxed);
                if !cpu {
                    in_place.fetch_add(1, Relaxed);
                    continue;
                }
                taken = true;
                swiglu_ffn(&g, &u, &dn, 0..h, x, 1, &mut rows[j * d..(j + 1) * d], Threads::all())
                    .map_err(|why| format!("layer {l}, expert {e}: {why}"))?;
                on_cpu.fetch_add(1, Relaxed);
            }
            Ok(())
        };
        Ok(self.gpu.host_call(d, k, k + k * d, Box::new(work))?)
    }
}
