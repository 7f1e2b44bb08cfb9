//! Decode with experts in host memory inside the step's CUDA graph ([`ColdExperts::Host`],
//! issue 7). Each layer with host experts routes on the GPU and posts the layer's input
//! and the router's choices to the GPU's host worker, which computes the chosen host
//! experts on the CPU (ggml's kernels on the mapped file) while the GPU computes the
//! resident ones; the GPU then waits for the worker's rows, which replace the cold
//! choices' rows (`take_flagged_rows`), and the next norm combines the rows with the
//! routing weights, as after resident experts. See mxr_kernels::cuda::host_call.
//!
//! With `--cold-experts mixed` each cold choice is shared: the GPU reads its hidden units
//! 0..h1 in place (gate and up rows, the down projection's columns) while the host worker
//! computes the units h1..h from the mapped file, and the two partial outputs add up
//! (`add_flagged_rows`). h1 makes both sides end together at their calibrated rates
//! ([`super::super::offload_cost::DeviceRates::gpu_hidden_units`] with the in-place rate),
//! so a layer with a single cold choice uses the host's memory through both paths.
//!
//! [`ColdExperts::Host`]: super::ColdExperts::Host

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use mxr_kernels::cuda::{quantized, CudaSlice, CudaView, HostCall, Part, QAct};

use super::moe::Routed;
use super::{GpuLayer, GpuModel};
use crate::{Model, ModelError};

/// A layer's part of a decode graph with experts in host memory: the host call, and with
/// `--cold-experts mixed` the layer's share of the cold choices.
pub(crate) struct LayerCall {
    call: Arc<HostCall>,
    mixed: Option<Shared>,
}

/// `--cold-experts mixed`: the layer's table of experts in host memory (1, else 0) on the
/// GPU, from which `split_places` picks the cold choices, and the hidden units 0..gpu_units
/// of each that the GPU reads in place (the host worker computes the rest).
struct Shared {
    cold: CudaSlice<i32>,
    gpu_units: usize,
}

impl LayerCall {
    /// Whether the GPU runs products of this layer's experts in a decoded token (then x's
    /// int8 form is worth making with the norm): mixed, or some experts resident.
    pub(crate) fn gpu_products(&self, layer: &GpuLayer) -> bool {
        self.mixed.is_some() || layer.slot_table.is_some()
    }
}

impl GpuModel {
    /// The MoE block of one decoded token, captured: as [`GpuModel::moe_offload`], the
    /// host experts computed by `lc`'s call (from [`GpuModel::cold_calls`]). `routed`: the
    /// router's choices where the norm's kernel made them (else routed here); `pre`: x's
    /// int8 form, if made. The CPU's way: it takes every cold choice, and the GPU computes
    /// every other choice (cold ones at place 0, replaced). Mixed: the GPU computes the
    /// resident choices whole and reads its share of each cold one in place, and the host's
    /// share is added (with no GPU share, taken). Returns the choices' outputs y [k, dim] and their routing weights [k], for the
    /// next norm to combine (as the resident MoE's).
    pub(crate) fn moe_offload_captured(
        &self,
        lc: &LayerCall,
        layer: &GpuLayer,
        x: &CudaView<'_, f32>,
        routed: Option<Routed>,
        pre: Option<QAct>,
        counts: &mut CudaSlice<u32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>), ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, k) = (c.dim, c.n_experts_used);
        let (ids, weights) = match routed {
            Some(r) => r.into_parts(),
            None => self.route(layer, x, 1, counts)?,
        };
        g.host_post(&lc.call, &x.slice(..d), &ids.as_view())?;
        // every row is written: by a product, or taken from the host
        let mut y = g.alloc::<f32>(k * d)?;
        let add = match &lc.mixed {
            Some(shared) => {
                let (mut hot, mut cold) = (g.alloc::<i32>(k)?, g.alloc::<i32>(k)?);
                g.split_places(&ids.as_view(), &shared.cold.as_view(), &mut hot.as_view_mut(), &mut cold.as_view_mut())?;
                // x quantized once for both launches
                let act = if quantized(layer.gate_exps.qtype) { Some(self.int8_input(x, 1, d, pre.as_ref())?) } else { None };
                let act = act.as_deref();
                self.experts_matvec(layer.experts(), &hot, x, act, 1, k, k, &mut y.as_view_mut())?;
                // no GPU share: the host's rows are the cold choices' whole outputs
                if shared.gpu_units > 0 {
                    // reads host pages over PCIe: on few SMs, so that other sequences' steps find SMs
                    g.over_pcie(|| {
                        self.experts_matvec_part(layer.experts(), shared.gpu_units, &cold, x, act, 1, k, k, &mut y.as_view_mut())
                    })?;
                }
                shared.gpu_units > 0
            }
            None => {
                if let Some(table) = &layer.slot_table {
                    let mut places = g.alloc::<i32>(k)?;
                    g.map_ids(&ids.as_view(), &table.as_view(), &mut places.as_view_mut())?;
                    self.experts_matvec(layer.experts(), &places, x, pre.as_ref(), 1, k, k, &mut y.as_view_mut())?;
                }
                false
            }
        };
        let mut from_host = g.alloc::<f32>(k + k * d)?;
        g.host_wait(&lc.call, &mut from_host.as_view_mut())?;
        if add {
            g.add_flagged_rows(&from_host.as_view(), k, d, &mut y.as_view_mut())?;
        } else {
            g.take_flagged_rows(&from_host.as_view(), k, d, &mut y.as_view_mut())?;
        }
        Ok((y, weights))
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
                let mixed = if layer.gate_exps.placed_on_gpu(0).is_some() {
                    let cold: Vec<i32> = slot.iter().map(|s| s.is_none() as i32).collect();
                    Some(Shared { cold: self.gpu.upload(&cold)?, gpu_units: self.gpu_hidden_units(layer)? })
                } else {
                    None
                };
                let gpu_units = mixed.as_ref().map(|m| m.gpu_units);
                Ok(Some(LayerCall { call: self.cold_call(host, self.first_layer + l, layer, slot, gpu_units)?, mixed }))
            })
            .collect()
    }

    /// Mixed (every expert in placed stacks, some in host pages): the hidden units 0..h1 of
    /// each cold choice that the GPU reads in place in a decoded token, of h, for the first
    /// layer with host experts (every layer's experts are alike). None otherwise.
    /// An error where `MXR_MIXED_GPU_SHARE` is not a number from 0 to 1.
    pub fn mixed_share(&self) -> Result<Option<(usize, usize)>, ModelError> {
        let Some(layer) = self.layers.iter().find(|l| l.slot.is_some() && l.gate_exps.placed_on_gpu(0).is_some()) else {
            return Ok(None);
        };
        Ok(Some((self.gpu_hidden_units(layer)?, self.config.hidden_dim)))
    }

    /// Mixed: the hidden units 0..h1 of a cold choice that the GPU reads in place, so that
    /// both sides end together at the calibrated rates (whole blocks of the down
    /// projection's type); `MXR_MIXED_GPU_SHARE` (0 to 1) sets the share instead, to
    /// measure.
    fn gpu_hidden_units(&self, layer: &GpuLayer) -> Result<usize, ModelError> {
        let (c, down) = (&self.config, &layer.down_exps);
        let (h, unit) = (c.hidden_dim, Part::unit(down.qtype));
        let bytes = [&layer.gate_exps, &layer.up_exps, down].iter().map(|m| m.expert_bytes()).sum::<usize>() as u64;
        Ok(match std::env::var("MXR_MIXED_GPU_SHARE") {
            Ok(v) => {
                let f = v.parse::<f64>().ok().filter(|f| (0.0..=1.0).contains(f)).ok_or_else(|| {
                    ModelError::Input(format!("MXR_MIXED_GPU_SHARE={v}: the GPU's share of a cold expert is a number from 0 to 1"))
                })?;
                ((f * (h / unit) as f64).round() as usize * unit).min(h)
            }
            Err(_) => self.rates.reading_in_place().gpu_hidden_units(bytes, 1, 6.0 * (c.dim * h) as f64, h, unit),
        })
    }

    /// The host call's work for model layer `l` (this model's `layer`): for each choice the CPU takes (every one
    /// of a host expert, slot None), its flag and its output row; the counters count them.
    /// Mixed (`gpu_units` Some(h1)): the CPU computes each cold choice's hidden units
    /// h1..h, and its row is added to the GPU's part (none when h1 = h).
    fn cold_call(
        &self,
        host: &Model,
        l: usize,
        layer: &GpuLayer,
        slot: &[Option<u32>],
        gpu_units: Option<usize>,
    ) -> Result<Arc<HostCall>, ModelError> {
        let c = &self.config;
        let (d, h, k) = (c.dim, c.hidden_dim, c.n_experts_used);
        let experts = self.host_experts(host, l, layer)?;
        let cold: Vec<bool> = slot.iter().map(Option::is_none).collect();
        let counters = [&self.cpu_experts, &self.in_place_experts, &self.shared_experts, &self.cold_bytes].map(Arc::clone);
        let threads = self.cpu_threads;
        let h1 = gpu_units.unwrap_or(0).min(h);
        // an expert's weights, all read from host memory by one side or both (experts of a
        // stacked tensor are alike)
        let expert_bytes = experts.expert_bytes();
        // the CPU's choices a post holds: the worker answers posts with fewer first
        let cpu_takes: Vec<bool> = cold.iter().map(|&c| c && h1 < h).collect();
        let cost = move |ids: &[i32]| {
            ids.iter().filter(|&&e| usize::try_from(e).ok().and_then(|e| cpu_takes.get(e)) == Some(&true)).count() as u32
        };
        let work = move |x: &[f32], ids: &[i32], out: &mut [f32]| -> Result<(), String> {
            let [on_cpu, in_place, shared, bytes] = &counters;
            let (flags, rows) = out.split_at_mut(k);
            for (j, &e) in ids.iter().enumerate() {
                let e = usize::try_from(e).ok().filter(|&e| e < cold.len()).ok_or_else(|| format!("GPU router chose expert {e}"))?;
                let cpu = cold[e] && h1 < h;
                flags[j] = if cpu { 1.0 } else { 0.0 };
                if !cold[e] {
                    continue;
                }
                bytes.fetch_add(expert_bytes as u64, Relaxed);
                let counter = match (h1, cpu) {
                    (_, false) => in_place,
                    (0, true) => on_cpu,
                    _ => shared,
                };
                counter.fetch_add(1, Relaxed);
                if !cpu {
                    continue;
                }
                // the CPU's hidden units h1..h: gate and up rows, the down projection's columns
                experts
                    .ffn(e, h1..h, x, 1, &mut rows[j * d..(j + 1) * d], threads)
                    .map_err(|why| format!("layer {l}, expert {e}: {why}"))?;
            }
            Ok(())
        };
        Ok(self.gpu.host_call(d, k, k + k * d, Box::new(work), Some(Box::new(cost)))?)
    }
}
