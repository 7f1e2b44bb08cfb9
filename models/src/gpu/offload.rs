//! The MoE block when some experts stay in host memory (issue 7): the GPU routes, then
//! the token's choices split into resident experts (GPU, matrix-vector or grouped
//! tensor-core products on the compacted stacks) and host experts (CPU, ggml's kernels on
//! the mapped file). The GPU part is queued first and runs while the CPU computes; the
//! host results are uploaded into the same per-(token, choice) rows and one kernel
//! combines them with the routing weights.

use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::{CudaSlice, CudaView, GpuMatrix};

use super::{GpuLayer, GpuModel, MATVEC_MAX_TOKENS};
use crate::experts::HostExperts;
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
        let mut y = g.zeros::<f32>(n * k * d)?;
        // Few tokens: the resident experts' products read their places from a table on the
        // GPU and are queued before the host learns the choices (read on the side stream, so
        // the GPU works while the host decides). Every pair is computed there, host experts'
        // pairs at place 0, and those rows are overwritten below. Many tokens: the host
        // groups the resident pairs first.
        let device_side = match (&layer.slot_table, n <= MATVEC_MAX_TOKENS) {
            (Some(table), true) => {
                g.side_after_main()?;
                let mut places = g.alloc::<i32>(n * k)?;
                g.map_ids(&ids.as_view(), &table.as_view(), &mut places.as_view_mut())?;
                self.experts_matvec(layer.experts(), &places, x, None, n, k, n * k, &mut y.as_view_mut())?;
                true
            }
            _ => false,
        };
        let chosen = if device_side { self.checked_experts(g.download_side(&ids.as_view())?)? } else { self.chosen_experts(&ids)? };
        // (pair, slot) on the GPU; pairs per host expert
        let (mut hot, mut hot_slots) = (Vec::new(), Vec::new());
        let mut cold: Vec<Vec<usize>> = vec![Vec::new(); c.n_experts];
        for (p, e) in chosen.into_iter().enumerate() {
            match slot[e] {
                Some(s) => {
                    hot.push(p as i32);
                    hot_slots.push(s as i32);
                }
                None => cold[e].push(p),
            }
        }
        if device_side {
            // queued already
            hot.clear();
            hot_slots.clear();
        }
        let any_cold = cold.iter().any(|v| !v.is_empty());
        let xh = match (any_cold, device_side) {
            (false, _) => Vec::new(),
            (true, true) => g.download_side(&x.slice(..n * d))?,
            (true, false) => g.download(&x.slice(..n * d))?,
        };
        // The cost model picks, per host expert and batch, the CPU or a copy to the GPU.
        let hl = &host.layers[l];
        let bytes = |t: &crate::model::Tensor, first: usize, n: usize| host.rows(t, first, n).data.len() as u64;
        // expert e's weights, gate + up + down
        let expert_bytes = |e: usize| bytes(&hl.gate_exps, e * h, h) + bytes(&hl.up_exps, e * h, h) + bytes(&hl.down_exps, e * d, d);
        let flops = 2.0 * 3.0 * d as f64 * h as f64;
        let (gate_q, up_q, down_q) = (host.matrix(&hl.gate_exps).qtype, host.matrix(&hl.up_exps).qtype, host.matrix(&hl.down_exps).qtype);
        // copies straight from the page-locked mapping (types kept as in the file) go at the
        // pinned rate, on the side stream, while the host works
        let direct = [gate_q, up_q, down_q].into_iter().all(mxr_kernels::cuda::matrix::as_in_file) && self.pinned_bytes() > 0;
        let rates = if direct { self.rates.pinned() } else { self.rates };
        // a shared expert's GPU part: whole blocks of the down projection's columns
        let unit = down_q.block_size().max(32);
        let (mut copy, mut shared, mut on_cpu) = (Vec::new(), Vec::new(), Vec::new());
        let mut cold_bytes = 0;
        // --cold-experts mixed: every expert has its place in the stacks (cold ones in host
        // pages); the CPU takes as many of the chosen cold experts as finish with the rest
        // read in place beside them
        let mixed = layer.gate_exps.placed_on_gpu(0).is_some();
        let mut in_place = 0u64;
        if mixed {
            let list: Vec<(usize, u64, usize)> =
                cold.iter().enumerate().filter(|(_, p)| !p.is_empty()).map(|(e, ps)| (e, expert_bytes(e), ps.len())).collect();
            let sizes: Vec<(u64, usize)> = list.iter().map(|&(_, b, m)| (b, m)).collect();
            for (&(e, b, _), cpu_side) in list.iter().zip(self.rates.split_cold(&sizes, flops)) {
                cold_bytes += b;
                if cpu_side {
                    on_cpu.push((e, 0..h));
                } else {
                    in_place += 1;
                    hot.extend(cold[e].iter().map(|&p| p as i32));
                    hot_slots.extend(std::iter::repeat_n(e as i32, cold[e].len()));
                }
            }
        }
        for (e, ps) in cold.iter().enumerate().filter(|(_, p)| !mixed && !p.is_empty()) {
            let b = expert_bytes(e);
            cold_bytes += b;
            if direct && self.share_cold {
                // the GPU copies and computes hidden units 0..h1, the CPU the rest
                match rates.gpu_hidden_units(b, ps.len(), flops, h, unit) {
                    0 => on_cpu.push((e, 0..h)),
                    h1 if h1 == h => copy.push(e),
                    h1 => shared.push((e, h1)),
                }
            } else if rates.choose(b, ps.len(), flops) == ColdChoice::CopyToGpu {
                copy.push(e);
            } else {
                on_cpu.push((e, 0..h));
            }
        }
        let count = |a: &std::sync::atomic::AtomicU64, v: u64| a.fetch_add(v, std::sync::atomic::Ordering::Relaxed);
        count(&self.cold_bytes, cold_bytes);
        count(&self.cpu_experts, on_cpu.len() as u64);
        count(&self.in_place_experts, in_place);
        count(&self.copied_experts, copy.len() as u64);
        count(&self.shared_experts, shared.len() as u64);
        // pairs and stack entries of the copied experts
        let (mut pairs, mut slots) = (Vec::new(), Vec::new());
        for (i, &e) in copy.iter().enumerate() {
            pairs.extend(cold[e].iter().map(|&p| p as i32));
            slots.extend(std::iter::repeat_n(i as i32, cold[e].len()));
        }
        let parts = [(&hl.gate_exps, h), (&hl.up_exps, h), (&hl.down_exps, d)];
        let cpu = CpuExperts { experts: self.host_experts(host, l, layer)?, cold: &cold, xh: &xh, d, k, threads: self.cpu_threads };
        if !direct {
            // through a host buffer (repacked for the GPU), then the CPU's experts
            self.pairs_on_gpu(layer.experts(), &hot, &hot_slots, x, &mut y)?;
            if !copy.is_empty() {
                let upload = |(t, rows): (&crate::model::Tensor, usize)| -> Result<GpuMatrix, ModelError> {
                    let m = host.rows(t, 0, rows);
                    let data: Vec<u8> = copy.iter().flat_map(|&e| host.rows(t, e * rows, rows).data.iter().copied()).collect();
                    Ok(GpuMatrix::upload(g, m.qtype, copy.len(), rows, m.cols, &data)?)
                };
                let [gm, um, dm] = [upload(parts[0])?, upload(parts[1])?, upload(parts[2])?];
                self.pairs_on_gpu([&gm, &um, &dm], &pairs, &slots, x, &mut y)?;
            }
            let (rows, out) = cpu.run(&on_cpu)?;
            self.scatter_host(&rows, &out, &mut y, false)?;
        } else {
            // The copied and shared experts' stacks are allocated before the resident
            // products are queued: the copies wait for the allocations only, and run
            // beside those products and the CPU's work.
            let empty = |q, n_experts, rows, cols| -> Result<GpuMatrix, ModelError> { Ok(GpuMatrix::empty(g, q, n_experts, rows, cols)?) };
            let mut stacks = if copy.is_empty() {
                None
            } else {
                Some([empty(gate_q, copy.len(), h, d)?, empty(up_q, copy.len(), h, d)?, empty(down_q, copy.len(), d, h)?])
            };
            let mut halves = shared
                .iter()
                .map(|&(_, h1)| Ok([empty(gate_q, 1, h1, d)?, empty(up_q, 1, h1, d)?, empty(down_q, 1, d, h1)?]))
                .collect::<Result<Vec<_>, ModelError>>()?;
            self.pairs_on_gpu(layer.experts(), &hot, &hot_slots, x, &mut y)?;
            let cpu_work: Vec<(usize, std::ops::Range<usize>)> =
                on_cpu.iter().cloned().chain(shared.iter().map(|&(e, h1)| (e, h1..h))).collect();
            let (rows, out) = g.copy_scope(|s| -> Result<(Vec<i32>, Vec<f32>), ModelError> {
                if let Some(st) = stacks.as_mut() {
                    for (m, (t, rows)) in st.iter_mut().zip(parts) {
                        for (i, &e) in copy.iter().enumerate() {
                            s.copy(host.rows(t, e * rows, rows).data, &mut m.file_bytes_mut(i)?)?;
                        }
                    }
                }
                for (&(e, h1), [gm, um, dm]) in shared.iter().zip(halves.iter_mut()) {
                    s.copy(host.rows(&hl.gate_exps, e * h, h1).data, &mut gm.file_bytes_mut(0)?)?;
                    s.copy(host.rows(&hl.up_exps, e * h, h1).data, &mut um.file_bytes_mut(0)?)?;
                    // columns 0..h1 of each of the expert's d rows of the down projection
                    let down = host.rows(&hl.down_exps, e * d, d);
                    let width = down_q.row_bytes(h1).ok_or_else(|| ModelError::Input(format!("{h1} columns of {down_q}")))?;
                    s.copy_2d(down.data, down.row_bytes(), width, d, &mut dm.file_bytes_mut(0)?)?;
                }
                s.main_waits()?;
                if let Some([gm, um, dm]) = &stacks {
                    self.pairs_on_gpu([gm, um, dm], &pairs, &slots, x, &mut y)?;
                }
                for (&(e, _), [gm, um, dm]) in shared.iter().zip(&halves) {
                    let ps: Vec<i32> = cold[e].iter().map(|&p| p as i32).collect();
                    self.pairs_on_gpu([gm, um, dm], &ps, &vec![0; ps.len()], x, &mut y)?;
                }
                // the CPU's experts and shares while the copies run
                cpu.run(&cpu_work)
            })??;
            // the CPU-only experts' rows are theirs alone; the shared ones add to the GPU's part
            let split = on_cpu.iter().map(|(e, _)| cold[*e].len()).sum::<usize>();
            self.scatter_host(&rows[..split], &out[..split * d], &mut y, false)?;
            self.scatter_host(&rows[split..], &out[split * d..], &mut y, true)?;
        }
        let mut out = g.alloc::<f32>(n * d)?;
        g.moe_combine(&y.as_view(), &weights.as_view(), n, k, d, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// y[rows[i], :] = out[i, :] (or +=, `add`), from the host.
    fn scatter_host(&self, rows: &[i32], out: &[f32], y: &mut CudaSlice<f32>, add: bool) -> Result<(), ModelError> {
        let (g, d) = (&self.gpu, self.config.dim);
        if rows.is_empty() {
            return Ok(());
        }
        let (yc, idx) = (g.upload(out)?, g.upload(rows)?);
        if add {
            let mut part = g.zeros::<f32>(y.len())?;
            g.scatter_rows(&yc.as_view(), &idx.as_view(), rows.len(), d, &mut part.as_view_mut())?;
            g.residual(&mut y.as_view_mut(), &part.as_view(), 1.0, 1.0)?;
        } else {
            g.scatter_rows(&yc.as_view(), &idx.as_view(), rows.len(), d, &mut y.as_view_mut())?;
        }
        Ok(())
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
    /// The CPU's experts of model layer `l` (this model's `layer`): where the layer's
    /// stacks keep cold experts in page-locked host pages in the file's layout (mixed), the
    /// CPU reads them there, so the file's pages of those experts are not needed as well.
    pub(crate) fn host_experts(&self, host: &Model, l: usize, layer: &GpuLayer) -> Result<HostExperts, ModelError> {
        let hl = host.layers.get(l).ok_or_else(|| ModelError::Input(format!("the host model has no layer {l}")))?;
        let experts = HostExperts::of(host, hl);
        Ok(match layer.host_pages() {
            Some(pages) => experts.with_pages(pages),
            None => experts,
        })
    }

    /// Whether the CPU reads cold experts from the page-locked copies the GPU reads in place
    /// (mixed, types kept as in the file) rather than from the mapped file.
    pub fn cpu_reads_host_pages(&self) -> bool {
        self.layers.iter().any(|l| l.host_pages().is_some())
    }

    /// Whether expert `e` of layer `l` is on the GPU (in device memory).
    pub fn resident(&self, l: usize, e: usize) -> bool {
        self.layers.get(l).is_some_and(|layer| match &layer.slot {
            Some(s) => s.get(e).is_some_and(Option::is_some),
            // a placed stack (cold experts read in place) knows; any other holds them all
            None => layer.gate_exps.placed_on_gpu(e).unwrap_or(true),
        })
    }

    /// `--expert-rebalance`: moves the most used host experts onto the GPU in place of the
    /// least used resident ones (see [`crate::placement::rebalance`]), by the routing
    /// counts `counts[layer][expert]`; `host` supplies the weights. Same memory, same
    /// number of experts per layer. Returns the exchanges made. Experts read in place move
    /// their pages (device for host memory and back) at the same addresses, so the decode
    /// graph stays valid.
    pub fn rebalance(&mut self, host: &Model, counts: &[Vec<u64>], margin: f64) -> Result<Vec<Swap>, ModelError> {
        let (d, h) = (self.config.dim, self.config.hidden_dim);
        let on_gpu: Vec<Vec<bool>> =
            (0..self.layers.len()).map(|l| (0..self.config.n_experts).map(|e| self.resident(l, e)).collect()).collect();
        let swaps = rebalance(&on_gpu, counts, margin);
        if !swaps.is_empty() {
            self.placement_generation += 1;
        }
        for sw in &swaps {
            let hl = &host.layers[sw.layer];
            let layer = &mut self.layers[sw.layer];
            if layer.gate_exps.placed_on_gpu(sw.demote).is_some() {
                // in place (or mixed): the demoted expert's pages go to the host first,
                // freeing device memory for the promoted one's
                for m in [&mut layer.gate_exps, &mut layer.up_exps, &mut layer.down_exps] {
                    m.relocate_expert(sw.demote, false)?;
                    if let Err(e) = m.relocate_expert(sw.promote, true) {
                        // as it was, where that can be done: the layer keeps its count
                        let _ = m.relocate_expert(sw.demote, true);
                        return Err(e.into());
                    }
                }
                if let Some(slot) = layer.slot.as_mut() {
                    // mixed: the places are the experts' own
                    slot[sw.demote] = None;
                    slot[sw.promote] = Some(sw.promote as u32);
                }
                continue;
            }
            let Some(slot) = layer.slot.as_mut() else { continue };
            let Some(s) = slot[sw.demote] else { continue };
            let e = sw.promote;
            layer.gate_exps.write_expert(&self.gpu, s as usize, host.rows(&hl.gate_exps, e * h, h).data)?;
            layer.up_exps.write_expert(&self.gpu, s as usize, host.rows(&hl.up_exps, e * h, h).data)?;
            layer.down_exps.write_expert(&self.gpu, s as usize, host.rows(&hl.down_exps, e * d, d).data)?;
            slot[sw.demote] = None;
            slot[e] = Some(s);
            layer.slot_table = super::slot_table(&self.gpu, slot)?;
        }
        Ok(swaps)
    }

    /// With cold experts read in place: of the routing counts `counts[layer][expert]` (the
    /// model's layers), the choices that went to experts in host memory and the weight
    /// bytes those choices read over PCIe. None for any other model.
    pub fn in_place_cold_use(&self, counts: &[Vec<u64>]) -> Option<(u64, u64)> {
        if self.in_place_bytes == 0 {
            return None;
        }
        let (mut n, mut bytes) = (0u64, 0u64);
        for (l, layer) in self.layers.iter().enumerate() {
            let each: u64 = layer.experts().iter().map(|m| m.expert_bytes() as u64).sum();
            let row = counts.get(self.first_layer + l)?;
            for (e, &c) in row.iter().enumerate() {
                if !self.resident(l, e) {
                    n += c;
                    bytes += c * each;
                }
            }
        }
        Some((n, bytes))
    }
}

/// Cold experts computed on the CPU, ggml's kernels on the mapped weights.
struct CpuExperts<'a> {
    experts: HostExperts,
    /// pairs per expert (row p reads token p / k)
    cold: &'a [Vec<usize>],
    /// the layer's input on the host
    xh: &'a [f32],
    d: usize,
    k: usize,
    threads: Threads,
}

impl CpuExperts<'_> {
    /// Each (expert, hidden units) of `work` over its pairs: rows (pair ids) and their
    /// [rows, d] outputs, in order. Hidden units a..b give that part of the expert's output
    /// (all of it for 0..h); another device's part adds to it.
    fn run(&self, work: &[(usize, std::ops::Range<usize>)]) -> Result<(Vec<i32>, Vec<f32>), ModelError> {
        let (experts, threads, d, k) = (&self.experts, self.threads, self.d, self.k);
        let (mut rows, mut out) = (Vec::new(), Vec::new());
        for (e, hid) in work {
            let (e, ps) = (*e, &self.cold[*e]);
            let m = ps.len();
            let xs: Vec<f32> = ps.iter().flat_map(|&p| self.xh[(p / k) * d..(p / k + 1) * d].iter().copied()).collect();
            let mut y = vec![0f32; m * d];
            experts.ffn(e, hid.clone(), &xs, m, &mut y, threads)?;
            out.extend(y);
            rows.extend(ps.iter().map(|&p| p as i32));
        }
        Ok((rows, out))
    }
}
