//! The MiniMax-01 forward pass on one GPU: the same steps as [`crate::forward`], over the
//! CUDA kernels of mxr-kernels. [`GpuModel`] holds the weights in device memory (uploaded
//! once from the mapped file); [`GpuSession`] the lightning states, the KV caches and the
//! routing counters of one sequence.
//!
//! Products: up to [`MATVEC_MAX_TOKENS`] tokens use the quantized matrix-vector kernels
//! (f32 activations, weights read once per token); more tokens dequantize the weight to
//! bf16 and multiply on tensor cores through cuBLAS (f32 accumulation).

mod forward;
mod lanes;
mod moe;
mod offload;
mod offload_graph;
pub mod split;

use std::sync::{Arc, Mutex};

use crate::offload_cost::DeviceRates;
use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::placed::HostPages;
use mxr_kernels::cuda::{quantized, CudaEvent, CudaSlice, CudaView, CudaViewMut, Gpu, GpuMatrix, KvType, QAct};
use mxr_kernels::KernelError;

use crate::forward::lightning::slopes;
use crate::model::{Attention, Tensor};
use crate::placement::Placement;
use crate::{Config, Model, ModelError};
pub use forward::GpuSession;

/// Up to this many tokens a product runs as matrix-vector products.
pub const MATVEC_MAX_TOKENS: usize = 8;

pub(crate) enum GpuAttention {
    Lightning { qkv: GpuMatrix, gate: GpuMatrix, norm: CudaSlice<f32>, out: GpuMatrix, decay: CudaSlice<f32> },
    Softmax { q: GpuMatrix, k: GpuMatrix, v: GpuMatrix, out: GpuMatrix },
}

pub(crate) struct GpuLayer {
    pub attn_norm: CudaSlice<f32>,
    pub attn: GpuAttention,
    pub ffn_norm: CudaSlice<f32>,
    pub router: GpuMatrix,
    pub gate_exps: GpuMatrix,
    pub up_exps: GpuMatrix,
    pub down_exps: GpuMatrix,
    /// With expert offload: the GPU stacks hold some experts only; slot[e] is expert e's
    /// place in them, None for an expert left in host memory. None: every expert, in order.
    pub slot: Option<Vec<Option<u32>>>,
    /// `slot` on the GPU for few-token batches: expert -> place in the stacks, with host
    /// experts at place 0 (their rows are computed there, then overwritten by the host's
    /// results). None without offload, or when the stacks are empty.
    pub slot_table: Option<CudaSlice<i32>>,
}

/// A layer's `slot` as the GPU table the resident products read (see `GpuLayer::slot_table`).
pub(crate) fn slot_table(gpu: &Gpu, slot: &[Option<u32>]) -> Result<Option<CudaSlice<i32>>, ModelError> {
    if slot.iter().all(Option::is_none) {
        return Ok(None);
    }
    let t: Vec<i32> = slot.iter().map(|s| s.map_or(0, |s| s as i32)).collect();
    Ok(Some(gpu.upload(&t)?))
}

pub struct GpuModel {
    pub gpu: Gpu,
    pub config: Config,
    /// The model's index of `layers[0]`: 0, unless this is a later part of a model split
    /// over several GPUs by layers (see [`split::SplitModel`]).
    pub first_layer: usize,
    /// On the part with the first layer (and on the last part when lm_head is tied to it).
    pub(crate) token_embd: Option<GpuMatrix>,
    pub(crate) layers: Vec<GpuLayer>,
    /// On the part with the last layer.
    pub(crate) output_norm: Option<CudaSlice<f32>>,
    /// On the part with the last layer; None when tied to the embedding.
    pub(crate) output: Option<GpuMatrix>,
    /// Device bytes of the weights.
    pub weight_bytes: usize,
    /// bf16 staging for dequantized weights: two buffers used in turn, so that the side
    /// stream dequantizes the next weight while the main stream multiplies this one.
    scratch: Mutex<Scratch>,
    /// The stages run so far, when profiling (events on the main stream, no waiting).
    profile: Mutex<Option<Vec<Mark>>>,
    /// Decode steps replay a captured CUDA graph (off: every kernel is launched each step).
    graphs: std::sync::atomic::AtomicBool,
    /// Some experts are in host memory, computed by the CPU ([`ColdExperts::Host`] or
    /// [`ColdExperts::Mixed`]): a batch waits for the host each layer.
    pub offloaded: bool,
    /// Decoded tokens with experts on the CPU stay one CUDA graph, the CPU's work done by
    /// the GPU's host worker (offload_graph.rs, host_call.rs). `MXR_OFFLOAD_GRAPH=0` turns
    /// it off: such steps are then launched kernel by kernel and wait for the host each
    /// layer.
    pub offload_graph: bool,
    /// Changes whenever experts move between the GPU and the host (rebalance): decode
    /// graphs captured before are captured again.
    pub(crate) placement_generation: u64,
    /// Page-locked host memory of experts read in place ([`ColdExperts::InPlace`]).
    pub in_place_bytes: usize,
    /// Element type of the KV caches of new sessions (default bf16; f32 keeps the CPU's
    /// exact values: the f32 attention kernels, and the lightning prefill as the f32
    /// recurrence instead of bf16 tensor-core chunks).
    pub kv_type: KvType,
    /// Rates for the cold-expert cost model (calibrated or default).
    pub rates: DeviceRates,
    /// Threads of the CPU's products of cold experts (`--threads`; default all cores).
    pub cpu_threads: Threads,
    /// Split a cold expert between a copy to the GPU (hidden units 0..h1) and the CPU (the
    /// rest) where the cost model says both finish together (`MXR_SHARE_COLD=1`). Off by
    /// default: on an H200 (S2x32 q4_k, 0d6133a) it decoded slower than whole copies, 273.9
    /// against 369.3 tokens/s at a quarter of the experts on the GPU and 70.2 against 117.9
    /// with --cpu-moe, since the GPU's part of the down projection is a strided copy of
    /// short rows and the two halves contend for host memory.
    pub share_cold: bool,
    /// Cold experts copied to the GPU for a batch so far (for the placement summary).
    pub copied_experts: std::sync::atomic::AtomicU64,
    /// Cold experts computed on the CPU so far.
    pub cpu_experts: Arc<std::sync::atomic::AtomicU64>,
    /// Cold experts read in place by a batch's products so far ([`ColdExperts::Mixed`]).
    pub in_place_experts: Arc<std::sync::atomic::AtomicU64>,
    /// Cold experts shared so far: the GPU copied and computed part of their hidden units,
    /// or read them in place (mixed, in a decode graph), while the CPU computed the rest.
    pub shared_experts: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes of cold experts' weights read from host memory so far (copied or computed on
    /// the CPU): what issue 7's bound divides by the host's bandwidth.
    pub cold_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// The mapped file's cold expert tensors, page-locked so that copying them to the GPU
    /// runs at DMA speed (empty without offload, or where the driver refused: `pin_note`).
    pins: Vec<mxr_kernels::cuda::host::HostPin>,
    /// Why the cold experts are not page-locked, if they are not.
    pub pin_note: Option<String>,
}

/// How a placement's cold experts (those it leaves in host memory) are computed
/// (`--cold-experts`; docs/offload.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdExperts {
    /// On the CPU from the mapped file, or copied to the GPU for a batch, as the cost model
    /// picks per expert; a batch's MoE waits for the host each layer. A decoded token stays
    /// one CUDA graph, its cold experts computed by the host worker (offload_graph.rs).
    Host,
    /// Copied at upload into page-locked host memory mapped into the layer's expert stacks,
    /// where the GPU's products read them in place over PCIe; the decode step stays one
    /// CUDA graph.
    InPlace,
    /// Both: in the expert stacks as [`ColdExperts::InPlace`], and for each batch the host
    /// reads the routing and gives the CPU as many of the chosen cold experts as finish
    /// with the rest read in place beside them
    /// ([`crate::offload_cost::DeviceRates::split_cold`]); a batch's MoE waits for the host
    /// each layer. A decoded token stays one graph and shares each cold choice: the GPU
    /// reads part of its hidden units in place while the host worker computes the rest
    /// (offload_graph.rs).
    Mixed,
}

impl GpuLayer {
    /// The layer's gate, up and down expert stacks.
    pub(crate) fn experts(&self) -> [&GpuMatrix; 3] {
        [&self.gate_exps, &self.up_exps, &self.down_exps]
    }

    /// The CPU's way to the layer's cold experts in page-locked host pages (gate, up,
    /// down), where all three stacks keep them in the file's layout.
    pub(crate) fn host_pages(&self) -> Option<[HostPages; 3]> {
        host_pages_of(self.experts())
    }
}

/// [`GpuMatrix::host_pages`] of a layer's gate, up and down stacks, where all three have
/// them (mixed, types kept as in the file).
fn host_pages_of(stacks: [&GpuMatrix; 3]) -> Option<[HostPages; 3]> {
    let [g, u, d] = stacks.map(GpuMatrix::host_pages);
    Some([g?, u?, d?])
}

impl GpuModel {
    /// Uploads every tensor of `model` to `gpu`.
    pub fn upload(model: &Model, gpu: Gpu) -> Result<GpuModel, ModelError> {
        Self::upload_placed(model, gpu, None)
    }

    /// Uploads `model`, experts as `placement` says (None: all of them); the experts left
    /// out run on the CPU from the mapped file (`forward_on` with the host model), or are
    /// copied to the GPU for a batch ([`ColdExperts::Host`]).
    pub fn upload_placed(model: &Model, gpu: Gpu, placement: Option<&Placement>) -> Result<GpuModel, ModelError> {
        Self::upload_part(model, gpu, placement, 0..model.config.n_layers)
    }

    /// Uploads the layers `range` of `model` (one part of a layer split; the whole model
    /// for 0..n_layers): the embedding with the first layer, the final norm and lm_head with
    /// the last (the embedding too when lm_head is tied to it). `placement` covers every
    /// layer of the model; this part takes its rows.
    pub fn upload_part(
        model: &Model,
        gpu: Gpu,
        placement: Option<&Placement>,
        range: std::ops::Range<usize>,
    ) -> Result<GpuModel, ModelError> {
        Self::upload_part_with(model, gpu, placement, range, ColdExperts::Host)
    }

    /// [`GpuModel::upload_part`] with the cold experts computed as `cold` says.
    pub fn upload_part_with(
        model: &Model,
        gpu: Gpu,
        placement: Option<&Placement>,
        range: std::ops::Range<usize>,
        cold: ColdExperts,
    ) -> Result<GpuModel, ModelError> {
        let c = model.config.clone();
        if range.start >= range.end || range.end > c.n_layers {
            return Err(ModelError::Input(format!("layers {range:?} of a model of {} layers", c.n_layers)));
        }
        if let Some(p) = placement {
            if p.on_gpu.len() != c.n_layers || p.on_gpu.iter().any(|r| r.len() != c.n_experts) {
                return Err(ModelError::Input("the expert placement does not match the model's layers and experts".into()));
            }
        }
        let placement = placement.filter(|p| p.on_gpu[range.clone()].iter().flatten().any(|&g| !g));
        let (first, last) = (range.start == 0, range.end == c.n_layers);
        let tied = model.output.name() == model.token_embd.name();
        let bytes = std::cell::Cell::new(0usize);
        let host_bytes = std::cell::Cell::new(0usize);
        let up = |t: &Tensor, n_experts: usize| -> Result<GpuMatrix, ModelError> {
            let q = model.matrix(t);
            let m = GpuMatrix::upload(&gpu, q.qtype, n_experts, q.rows / n_experts, q.cols, q.data).map_err(|e| upload_error(t, e))?;
            bytes.set(bytes.get() + m.bytes());
            // the GPU holds it now: the file's pages need not stay mapped in (a later read
            // maps them again)
            model.file.release_pages(q.data);
            Ok(m)
        };
        let token_embd = if first || (last && tied) { Some(up(&model.token_embd, 1)?) } else { None };
        let output = if last && !tied { Some(up(&model.output, 1)?) } else { None };
        let mut layers = Vec::with_capacity(range.len());
        for (l, layer) in model.layers.iter().enumerate().take(range.end).skip(range.start) {
            let attn = match &layer.attn {
                Attention::Lightning { qkv, gate, norm, out } => {
                    let decay: Vec<f32> = slopes(c.n_heads, l, c.n_layers).iter().map(|s| (-s).exp() as f32).collect();
                    GpuAttention::Lightning {
                        qkv: up(qkv, 1)?,
                        gate: up(gate, 1)?,
                        norm: gpu.upload(norm)?,
                        out: up(out, 1)?,
                        decay: gpu.upload(&decay)?,
                    }
                }
                Attention::Softmax { q, k, v, out } => GpuAttention::Softmax { q: up(q, 1)?, k: up(k, 1)?, v: up(v, 1)?, out: up(out, 1)? },
            };
            let (gate_exps, up_exps, down_exps, slot) = match placement {
                None => (up(&layer.gate_exps, c.n_experts)?, up(&layer.up_exps, c.n_experts)?, up(&layer.down_exps, c.n_experts)?, None),
                Some(p) if cold != ColdExperts::Host => {
                    // every expert in its own place in the stack, the cold ones in host pages
                    let placed = |t: &Tensor, rows_each: usize| -> Result<GpuMatrix, ModelError> {
                        let m = model.matrix(t);
                        let g = GpuMatrix::upload_placed(&gpu, m.qtype, rows_each, m.cols, m.data, &p.on_gpu[l])
                            .map_err(|e| upload_error(t, e))?;
                        bytes.set(bytes.get() + g.bytes());
                        host_bytes.set(host_bytes.get() + g.host_bytes());
                        Ok(g)
                    };
                    // mixed: the host's MoE path, every expert at its own place in the stack
                    let slot = (cold == ColdExperts::Mixed).then(|| (0..c.n_experts).map(|e| p.on_gpu[l][e].then_some(e as u32)).collect());
                    let stacks =
                        [placed(&layer.gate_exps, c.hidden_dim)?, placed(&layer.up_exps, c.hidden_dim)?, placed(&layer.down_exps, c.dim)?];
                    // the CPU reads the cold experts' page-locked copies (experts.rs) and the
                    // GPU the rest: the file's pages of these experts need not stay mapped
                    if host_pages_of(stacks.each_ref()).is_some() {
                        for t in [&layer.gate_exps, &layer.up_exps, &layer.down_exps] {
                            model.file.release_pages(model.matrix(t).data);
                        }
                    }
                    let [g, u, d] = stacks;
                    (g, u, d, slot)
                }
                Some(p) => {
                    let keep: Vec<usize> = (0..c.n_experts).filter(|&e| p.on_gpu[l][e]).collect();
                    let mut slot = vec![None; c.n_experts];
                    for (s, &e) in keep.iter().enumerate() {
                        slot[e] = Some(s as u32);
                    }
                    let some = |t: &Tensor, rows_each: usize| -> Result<GpuMatrix, ModelError> {
                        let q = model.matrix(t).qtype;
                        let data: Vec<u8> =
                            keep.iter().flat_map(|&e| model.rows(t, e * rows_each, rows_each).data.iter().copied()).collect();
                        let m = GpuMatrix::upload(&gpu, q, keep.len(), rows_each, model.matrix(t).cols, &data)
                            .map_err(|e| upload_error(t, e))?;
                        bytes.set(bytes.get() + m.bytes());
                        Ok(m)
                    };
                    (some(&layer.gate_exps, c.hidden_dim)?, some(&layer.up_exps, c.hidden_dim)?, some(&layer.down_exps, c.dim)?, Some(slot))
                }
            };
            layers.push(GpuLayer {
                attn_norm: gpu.upload(&layer.attn_norm)?,
                attn,
                ffn_norm: gpu.upload(&layer.ffn_norm)?,
                router: up(&layer.router, 1)?,
                // mixed: the host groups the pairs (its split decides which cold experts the
                // GPU reads), so no table for products queued before the choices are known
                slot_table: match &slot {
                    Some(sl) if cold != ColdExperts::Mixed => slot_table(&gpu, sl)?,
                    _ => None,
                },
                gate_exps,
                up_exps,
                down_exps,
                slot,
            });
        }
        let output_norm = if last { Some(gpu.upload(&model.output_norm)?) } else { None };
        // cold experts: page-lock their tensors in the mapped file for fast copies
        let (pins, pin_note) = match placement {
            Some(_) if cold != ColdExperts::Host => (Vec::new(), None),
            Some(p) => {
                let cold: Vec<&[u8]> = model
                    .layers
                    .iter()
                    .enumerate()
                    .filter(|(l, _)| range.contains(l) && p.on_gpu[*l].iter().any(|&g| !g))
                    .flat_map(|(_, layer)| [&layer.gate_exps, &layer.up_exps, &layer.down_exps])
                    .map(|t| model.matrix(t).data)
                    .collect();
                match gpu.pin_host(&cold) {
                    Ok(pins) => (pins, None),
                    Err(e) => (Vec::new(), Some(format!("cold experts not page-locked ({e}): copies to the GPU go at the pageable rate"))),
                }
            }
            None => (Vec::new(), None),
        };
        // the weights are read from the side stream too: let every upload land first
        gpu.sync()?;
        Ok(GpuModel {
            gpu,
            config: c,
            first_layer: range.start,
            token_embd,
            layers,
            output_norm,
            output,
            weight_bytes: bytes.get(),
            scratch: Mutex::new(Scratch::default()),
            profile: Mutex::new(None),
            graphs: std::sync::atomic::AtomicBool::new(std::env::var_os("MXR_NO_CUDA_GRAPH").is_none()),
            offloaded: placement.is_some() && cold != ColdExperts::InPlace,
            offload_graph: matches!(cold, ColdExperts::Host | ColdExperts::Mixed)
                && std::env::var("MXR_OFFLOAD_GRAPH").map_or(true, |v| v != "0"),
            placement_generation: 0,
            in_place_bytes: host_bytes.get(),
            kv_type: KvType::Bf16,
            rates: DeviceRates::DEFAULT,
            cpu_threads: Threads::all(),
            share_cold: std::env::var("MXR_SHARE_COLD").is_ok_and(|v| v == "1"),
            copied_experts: std::sync::atomic::AtomicU64::new(0),
            cpu_experts: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            in_place_experts: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            shared_experts: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            cold_bytes: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            pins,
            pin_note,
        })
    }

    /// Bytes of host memory page-locked for copies of cold experts.
    pub fn pinned_bytes(&self) -> usize {
        self.pins.iter().map(|p| p.bytes()).sum()
    }

    /// Starts (or stops) timing each stage of the forward pass. Timing records two events
    /// on the main stream per stage and waits for nothing, so the work runs as it would
    /// otherwise (decode steps are launched kernel by kernel, not as a graph).
    pub fn set_profiling(&self, on: bool) {
        if let Ok(mut p) = self.profile.lock() {
            *p = on.then(Vec::new);
        }
    }

    /// Whether decode steps replay a CUDA graph (default on; `MXR_NO_CUDA_GRAPH=1` turns
    /// it off). Profiling turns it off too, since a graph cannot be timed by stage.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether decode steps replay a graph: unless turned off or profiling, and with
    /// experts in host memory only where the host worker does their work (the CPU's way).
    pub(crate) fn decode_graphs(&self) -> bool {
        self.graphs_on() && (!self.offloaded || self.offload_graph)
    }

    fn graphs_on(&self) -> bool {
        self.graphs.load(std::sync::atomic::Ordering::Relaxed) && !self.profile.lock().map(|p| p.is_some()).unwrap_or(true)
    }

    /// The stages timed since profiling started, summed per stage name in order of first
    /// appearance (and forgotten); waits for the GPU to read the events.
    pub fn take_profile(&self) -> Result<Profile, ModelError> {
        let marks = match self.profile.lock() {
            Ok(mut p) => p.as_mut().map(std::mem::take).unwrap_or_default(),
            Err(_) => return Err(KernelError::Threads("GPU profile poisoned".into()).into()),
        };
        let g = &self.gpu;
        g.sync()?;
        let mut out = Profile::default();
        if let (Some(first), Some(last)) = (marks.first(), marks.last()) {
            out.span = g.elapsed(&first.start, &last.end)?;
        }
        for (i, m) in marks.iter().enumerate() {
            if i > 0 {
                out.between += g.elapsed(&marks[i - 1].end, &m.start)?.max(0.0);
            }
            let gpu = g.elapsed(&m.start, &m.end)?;
            let i = match out.stages.iter().position(|s| s.name == m.name) {
                Some(i) => i,
                None => {
                    out.stages.push(StageTime { name: m.name, ..StageTime::default() });
                    out.stages.len() - 1
                }
            };
            let s = &mut out.stages[i];
            s.calls += 1;
            s.gpu += gpu;
            s.host += m.host;
            s.blocked += m.blocked;
        }
        Ok(out)
    }

    /// Runs `f` as stage `name` of the profile.
    pub(crate) fn stage<T>(&self, name: &'static str, f: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
        let on = self.profile.lock().map(|p| p.is_some()).unwrap_or(false);
        if !on {
            return f();
        }
        let g = &self.gpu;
        let (start, end) = (g.timing_event()?, g.timing_event()?);
        let waited = g.host_waited();
        let t = std::time::Instant::now();
        g.record_main(&start)?;
        let r = f()?;
        g.record_main(&end)?;
        let host = t.elapsed().as_secs_f64();
        let blocked = g.host_waited() - waited;
        if let Ok(mut p) = self.profile.lock() {
            if let Some(v) = p.as_mut() {
                v.push(Mark { name, host, blocked, start, end });
            }
        }
        Ok(r)
    }

    /// The output matrix (on the part with the last layer).
    pub(crate) fn lm_head(&self) -> Result<&GpuMatrix, ModelError> {
        self.output.as_ref().or(self.token_embd.as_ref()).filter(|_| self.output_norm.is_some()).ok_or_else(|| {
            ModelError::Input(format!("layers from {} of a split model: lm_head is on the part with the last layer", self.first_layer))
        })
    }

    /// y [n, w.rows] = x [n, w.cols] · Wᵀ.
    pub(crate) fn linear(&self, w: &GpuMatrix, x: &CudaView<'_, f32>, n: usize) -> Result<CudaSlice<f32>, ModelError> {
        let mut ys = self.linear_many(&[w], x, n)?;
        ys.pop().ok_or_else(|| ModelError::Input("no product".into()))
    }

    /// y_i [n, w_i.rows] = x · W_iᵀ for several matrices of one input: the input is
    /// quantized (matrix-vector path) or rounded to bf16 (tensor-core path) once for all.
    pub(crate) fn linear_many(&self, ws: &[&GpuMatrix], x: &CudaView<'_, f32>, n: usize) -> Result<Vec<CudaSlice<f32>>, ModelError> {
        self.linear_many_with(ws, x, n, None)
    }

    /// [`GpuModel::linear_many`] with x's int8 form already made (`pre`, for the
    /// matrix-vector path; ignored for more tokens).
    pub(crate) fn linear_many_with(
        &self,
        ws: &[&GpuMatrix],
        x: &CudaView<'_, f32>,
        n: usize,
        pre: Option<&QAct>,
    ) -> Result<Vec<CudaSlice<f32>>, ModelError> {
        let g = &self.gpu;
        let mut out = Vec::with_capacity(ws.len());
        if n <= MATVEC_MAX_TOKENS {
            let act = match ws.iter().find(|w| quantized(w.qtype)) {
                Some(w) => Some(self.int8_input(x, n, w.cols, pre)?),
                None => None,
            };
            let act = act.as_deref();
            let mut i = 0;
            while i < ws.len() {
                let w = ws[i];
                let a = act.filter(|a| a.cols == w.cols);
                // two quantized products of one type and width: one launch
                if let (Some(a), Some(&w1)) = (a.filter(|_| quantized(w.qtype) && g.tuning.matvec_pair), ws.get(i + 1)) {
                    if w1.qtype == w.qtype && w1.cols == w.cols {
                        let (mut y0, mut y1) = (g.alloc::<f32>(n * w.rows)?, g.alloc::<f32>(n * w1.rows)?);
                        g.matvec_pair([w, w1], None, a, 1, n, [&mut y0.as_view_mut(), &mut y1.as_view_mut()])?;
                        out.extend([y0, y1]);
                        i += 2;
                        continue;
                    }
                }
                let mut y = g.alloc::<f32>(n * w.rows)?;
                g.matvec_with(w, None, x, a, 1, n, &mut y.as_view_mut())?;
                out.push(y);
                i += 1;
            }
            return Ok(out);
        }
        let mut xb = Bf16Input::default();
        for w in ws {
            let mut y = g.alloc::<f32>(n * w.rows)?;
            self.gemm_with(w, 0, x, &mut xb, n, &mut y.as_view_mut())?;
            out.push(y);
        }
        Ok(out)
    }

    /// x's int8 form [rows, cols] for the quantized matrix-vector products: `pre` where it
    /// is that already (made by the fused norm), else quantized now.
    pub(crate) fn int8_input<'a>(
        &self,
        x: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
        pre: Option<&'a QAct>,
    ) -> Result<std::borrow::Cow<'a, QAct>, ModelError> {
        Ok(match pre {
            Some(p) if p.cols == cols && p.rows >= rows => std::borrow::Cow::Borrowed(p),
            _ => std::borrow::Cow::Owned(self.gpu.quantize_act(&x.slice(..rows * cols), rows, cols)?),
        })
    }

    /// y [n, rows] = x · W_eᵀ. F32 weights (the router; F32 files) in f32; all others on
    /// tensor cores: W_e dequantized to bf16 (unless it is bf16 already), x rounded to bf16,
    /// f32 accumulation.
    pub(crate) fn gemm(
        &self,
        w: &GpuMatrix,
        e: usize,
        x: &CudaView<'_, f32>,
        n: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), ModelError> {
        self.gemm_with(w, e, x, &mut Bf16Input::default(), n, y)
    }

    /// [`GpuModel::gemm`], keeping the bf16 form of x in `xb` for the next product of the
    /// same input.
    pub(crate) fn gemm_with(
        &self,
        w: &GpuMatrix,
        e: usize,
        x: &CudaView<'_, f32>,
        xb: &mut Bf16Input,
        n: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), ModelError> {
        let g = &self.gpu;
        if let Some(wf) = w.expert_f32(e) {
            g.gemm_f32(&wf, &x.slice(..n * w.cols), y, w.rows, w.cols, n)?;
            return Ok(());
        }
        if xb.0.as_ref().is_none_or(|(cols, rows, _)| *cols != w.cols || *rows != n) {
            let mut b = g.alloc::<u16>(n * w.cols)?;
            g.f32_to_bf16(&x.slice(..n * w.cols), &mut b.as_view_mut())?;
            xb.0 = Some((w.cols, n, b));
        }
        let Some((_, _, xb)) = xb.0.as_ref() else { return Err(KernelError::Shape("bf16 input missing".into()).into()) };
        self.gemm_on_bf16(w, e, &xb.as_view(), n, y)
    }

    /// y [n, rows] = x · W_eᵀ for x already in bf16 [n, cols], on tensor cores: W_e
    /// dequantized to bf16 on the side stream (unless it is bf16 already). Not for F32
    /// weights, which multiply f32 inputs ([`GpuModel::gemm`]).
    pub(crate) fn gemm_on_bf16(
        &self,
        w: &GpuMatrix,
        e: usize,
        xb: &CudaView<'_, u16>,
        n: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), ModelError> {
        let g = &self.gpu;
        if w.qtype == mxr_quant::QType::F32 {
            return Err(KernelError::Shape("F32 weights multiply f32 inputs, not bf16".into()).into());
        }
        if let Some(wb) = w.expert_u16(e).filter(|_| w.qtype == mxr_quant::QType::BF16) {
            g.gemm_bf16(&wb, xb, y, w.rows, w.cols, n)?;
            return Ok(());
        }
        let mut sc = self.scratch.lock().map_err(|_| KernelError::Threads("GPU scratch poisoned".into()))?;
        let need = w.rows * w.cols;
        let i = sc.next;
        sc.next ^= 1;
        if sc.bufs[i].as_ref().is_none_or(|s| s.len() < need) {
            // grown rarely (the first product of each larger size): wait until neither
            // stream uses the old buffer, then free it before allocating
            g.sync()?;
            sc.bufs[i] = None;
            sc.bufs[i] = Some(g.alloc::<u16>(need)?);
        }
        if sc.events.is_none() {
            sc.events = Some([g.event()?, g.event()?, g.event()?]);
        }
        let sc = &mut *sc; // the guard's fields, borrowed apart
        let (Some(s), Some([free0, free1, ready])) = (sc.bufs[i].as_mut(), sc.events.as_ref()) else {
            return Err(KernelError::Shape("GPU scratch missing".into()).into());
        };
        let free = if i == 0 { free0 } else { free1 };
        // the side stream dequantizes once the product that last read this buffer is done
        g.side_wait(free)?;
        let mut wb = s.slice_mut(..need);
        g.to_bf16_side(w, e, &mut wb)?;
        g.record_side(ready)?;
        g.main_wait(ready)?;
        g.gemm_bf16(&wb.as_view(), xb, y, w.rows, w.cols, n)?;
        g.record_main(free)?;
        Ok(())
    }
}

/// One run of a profiled stage: host seconds from its start to its end (issuing work, or
/// blocked on the GPU for `blocked` of them), and events around its work on the main stream.
struct Mark {
    name: &'static str,
    host: f64,
    blocked: f64,
    start: CudaEvent,
    end: CudaEvent,
}

/// Per stage name: runs, seconds of the main stream from the stage's first to its last
/// work (including any time the stream sat idle waiting for the host), host seconds, and
/// the part of those the host was blocked on the GPU.
#[derive(Default, Clone, Debug)]
pub struct StageTime {
    pub name: &'static str,
    pub calls: usize,
    pub gpu: f64,
    pub host: f64,
    pub blocked: f64,
}

/// A profiled pass: its stages, the main stream's seconds from the first stage's start to
/// the last one's end, and the seconds of that between stages.
#[derive(Default, Clone, Debug)]
pub struct Profile {
    pub stages: Vec<StageTime>,
    pub span: f64,
    pub between: f64,
}

/// Two bf16 buffers for dequantized weights and the next one to use; events (made at
/// first use, recorded again for every product): for each buffer, the point after which
/// the main stream no longer reads it, and the point where the side stream's
/// dequantization is done.
#[derive(Default)]
struct Scratch {
    bufs: [Option<CudaSlice<u16>>; 2],
    events: Option<[CudaEvent; 3]>,
    next: usize,
}

/// The bf16 copy of a product's input, made by the first tensor-core product that needs
/// it: (cols, rows, values).
#[derive(Default)]
pub(crate) struct Bf16Input(Option<(usize, usize, CudaSlice<u16>)>);

fn upload_error(t: &Tensor, e: KernelError) -> ModelError {
    match e {
        KernelError::OutOfMemory { bytes, .. } => {
            ModelError::Kernel(KernelError::OutOfMemory { what: format!("uploading {}", t.name()), bytes })
        }
        other => ModelError::Input(format!("uploading {} to the GPU: {other}", t.name())),
    }
}
