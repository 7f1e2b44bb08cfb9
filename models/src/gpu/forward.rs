//! [`GpuSession`] and the forward pass on the GPU, step for step as the CPU's
//! (crate::forward): embedding, per layer RMSNorm → attention → scaled residual →
//! RMSNorm → MoE → scaled residual, then the final norm and lm_head.
//!
//! A decode step (one token, last logits) is captured once per session as a CUDA graph
//! and replayed for every later token: the token id and the position are read from
//! device memory, so the same graph serves every position (see `decode`).

use mxr_kernels::cuda::{quantized, CudaSlice, Gpu, Graph, KvBuf, KvType, Lane, Pinned, QAct, Residual};

use super::offload_graph::LayerCall;
use super::{GpuAttention, GpuModel, MATVEC_MAX_TOKENS};
use crate::forward::attention::KvCache;
use crate::forward::{Logits, Session};
use crate::{LayerKind, LogitsOut, Model, ModelError};
use mxr_quant::QType;

/// One sequence's state on the GPU.
pub struct GpuSession {
    pub pos: usize,
    pub tokens: Vec<u32>,
    /// Tokens the KV caches hold room for.
    pub capacity: usize,
    /// Per layer: the lightning state [n_heads, hd, hd] (lightning layers).
    lightning: Vec<Option<CudaSlice<f32>>>,
    /// Per layer: K and V caches [capacity, kv_dim] (softmax layers), of the model's kv_type.
    kv: Vec<Option<(KvBuf, KvBuf)>>,
    counts: Vec<CudaSlice<u32>>,
    /// The decode step's graph and its buffers (None only while a step is captured).
    pub(super) step: Option<Box<Step>>,
    /// Per layer with experts in host memory, the host call its decode graph posts to
    /// (offload_graph.rs), made before the capture: page-locked memory cannot be
    /// allocated while one records.
    host_calls: Vec<Option<LayerCall>>,
    /// The stream its decode graph replays on when sequences decode side by side
    /// (lanes.rs); None: the main stream.
    pub(super) lane: Option<Lane>,
}

/// The decode step's inputs and output, at fixed addresses for its graph: the token and
/// position are written on the host into `io` [0..2] and copied in by the graph, which also
/// copies the logits out to `logits` and, into `io` [2], where their first NaN or infinity
/// is (-1: none), found on the GPU in `found` (page-locked host memory both, so that a step
/// costs one graph launch and one wait).
pub(super) struct Step {
    /// launched by [`GpuModel::decode_start`], its logits not yet taken
    pub(super) in_flight: bool,
    pub(super) io: Pinned<i32>,
    token: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    found: CudaSlice<i32>,
    pub(super) logits: Pinned<f32>,
    pub(super) graph: Option<Graph>,
    /// [`GpuModel::placement_generation`] when the graph was captured
    placement: u64,
}

/// `io`'s slot for the logits' first NaN or infinity.
pub(super) const IO_FOUND: usize = 2;

impl GpuSession {
    /// Before a decode graph of `m` is captured: the host calls of its layers with experts
    /// in host memory, on `host`'s weights (none where all experts are on the GPU).
    pub(crate) fn prepare_host_calls(&mut self, m: &GpuModel, host: Option<&Model>) -> Result<(), ModelError> {
        self.host_calls = match (m.offloaded, host) {
            (false, _) => Vec::new(),
            (true, Some(h)) => m.cold_calls(h)?,
            (true, None) => return Err(ModelError::Input("experts in host memory need the host model".into())),
        };
        Ok(())
    }

    /// An empty session with KV room for `capacity` tokens.
    pub fn new(m: &GpuModel, capacity: usize) -> Result<GpuSession, ModelError> {
        let c = &m.config;
        let g = &m.gpu;
        let has_softmax = c.layers.iter().any(|k| matches!(k, LayerKind::Softmax));
        if m.kv_type == KvType::Q8_0 && has_softmax && (!c.head_dim.is_multiple_of(32) || c.head_dim > 128) {
            return Err(ModelError::Input(format!(
                "--kv-type q8_0 takes heads of whole 32-value blocks (up to 128); this model's head_dim is {}: use --kv-type bf16",
                c.head_dim
            )));
        }
        let mut lightning = Vec::new();
        let mut kv = Vec::new();
        // this part's layers (all of them on one GPU)
        for kind in &c.layers[m.first_layer..m.first_layer + m.layers.len()] {
            match kind {
                LayerKind::Lightning => {
                    lightning.push(Some(g.zeros::<f32>(c.n_heads * c.head_dim * c.head_dim)?));
                    kv.push(None);
                }
                LayerKind::Softmax => {
                    lightning.push(None);
                    let n = capacity * c.kv_dim();
                    // room for the whole context, memory committed as positions fill
                    kv.push(Some((g.kv_reserve(m.kv_type, n, 0)?, g.kv_reserve(m.kv_type, n, 0)?)));
                }
            }
        }
        let counts = (0..m.layers.len()).map(|_| g.zeros::<u32>(c.n_experts)).collect::<Result<_, _>>()?;
        Ok(GpuSession {
            pos: 0,
            tokens: Vec::new(),
            capacity,
            lightning,
            kv,
            counts,
            host_calls: Vec::new(),
            lane: None,
            step: Some(Box::new(Step {
                in_flight: false,
                io: g.pinned::<i32>(3)?,
                token: g.zeros::<i32>(1)?,
                pos: g.zeros::<i32>(1)?,
                found: g.zeros::<i32>(1)?,
                logits: g.pinned::<f32>(c.vocab_size)?,
                graph: None,
                placement: m.placement_generation,
            })),
        })
    }

    /// Commits KV cache memory for `n` more positions. The caches grow in pages behind
    /// fixed addresses, so this happens outside any graph capture and captured graphs stay
    /// valid.
    pub(crate) fn commit(&mut self, m: &GpuModel, n: usize) -> Result<(), ModelError> {
        let rows = (self.pos + n) * m.config.kv_dim();
        for (k, v) in self.kv.iter_mut().flatten() {
            k.ensure(rows)?;
            v.ensure(rows)?;
        }
        Ok(())
    }

    /// Routing counts so far, [layer][expert] (for `--expert-rebalance`).
    pub fn expert_counts(&self, m: &GpuModel) -> Result<Vec<Vec<u64>>, ModelError> {
        self.settle(m)?;
        self.counts.iter().map(|c| Ok(m.gpu.download(&c.as_view())?.into_iter().map(u64::from).collect())).collect()
    }

    /// The session in host memory (for saving, or to continue on the CPU).
    pub fn to_host(&self, m: &GpuModel) -> Result<Session, ModelError> {
        let mut s = Session::new(&m.config);
        s.pos = self.pos;
        s.tokens = self.tokens.clone();
        self.fill_host(m, &mut s)?;
        Ok(s)
    }

    /// Writes this part's layers (model layers m.first_layer..) into the host session `s`.
    pub fn fill_host(&self, m: &GpuModel, s: &mut Session) -> Result<(), ModelError> {
        let (g, c) = (&m.gpu, &m.config);
        self.settle(m)?;
        for (l, gl) in (m.first_layer..).enumerate().take(m.layers.len()) {
            if let Some(st) = &self.lightning[l] {
                s.lightning[gl] = g.download(&st.as_view())?;
            }
            if let Some((k, v)) = &self.kv[l] {
                let n = self.pos * c.kv_dim();
                s.kv[gl] = KvCache { k: g.kv_download(k, n)?, v: g.kv_download(v, n)? };
            }
            s.expert_counts[gl] = g.download(&self.counts[l].as_view())?.into_iter().map(u64::from).collect();
        }
        Ok(())
    }

    /// A GPU session holding what `s` holds, with KV room for `capacity` tokens.
    pub fn from_host(m: &GpuModel, s: &Session, capacity: usize) -> Result<GpuSession, ModelError> {
        if s.pos > capacity {
            return Err(ModelError::Input(format!("the session holds {} tokens, more than the context of {capacity}", s.pos)));
        }
        let (g, c) = (&m.gpu, &m.config);
        let mut out = GpuSession::new(m, capacity)?;
        out.pos = s.pos;
        out.tokens = s.tokens.clone();
        for (l, gl) in (m.first_layer..).enumerate().take(m.layers.len()) {
            if let Some(st) = &mut out.lightning[l] {
                g.write(&s.lightning[gl], &mut st.as_view_mut())?;
            }
            if let Some((k, v)) = &mut out.kv[l] {
                let n = s.pos * c.kv_dim();
                g.kv_write(&s.kv[gl].k[..n], k)?;
                g.kv_write(&s.kv[gl].v[..n], v)?;
            }
            let counts: Vec<u32> = s.expert_counts[gl].iter().map(|&n| n.min(u32::MAX as u64) as u32).collect();
            g.write(&counts, &mut out.counts[l].as_view_mut())?;
        }
        Ok(out)
    }
}

impl GpuModel {
    /// Runs `tokens` after what `session` has seen; returns logits as the CPU's forward.
    pub fn forward(&self, session: &mut GpuSession, tokens: &[u32], which: Logits) -> Result<Vec<f32>, ModelError> {
        self.forward_on(None, session, tokens, which)
    }

    /// [`GpuModel::forward`] for a model placed with experts in host memory: `host` is the
    /// mapped model they are read from (the one uploaded).
    pub fn forward_on(
        &self,
        host: Option<&Model>,
        session: &mut GpuSession,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_with(host, session, tokens, which, |l| l.logits.to_vec())
    }

    /// [`GpuModel::forward_on`], handing the logits to `f` where they lie instead of
    /// returning a copy: a decoded token's are read from the page-locked buffer its graph
    /// copied them to (800 KB a token for MiniMax-Text-01, whose copy into a new vector the
    /// host would otherwise pay every token).
    pub fn forward_with<R>(
        &self,
        host: Option<&Model>,
        session: &mut GpuSession,
        tokens: &[u32],
        which: Logits,
        f: impl FnOnce(LogitsOut<'_>) -> R,
    ) -> Result<R, ModelError> {
        if self.offloaded && host.is_none() {
            return Err(ModelError::Input("this GPU model keeps experts in host memory: run it with its host model (forward_on)".into()));
        }
        if tokens.len() == 1 && which == Logits::Last && self.decode_graphs() {
            self.decode_start(host, session, tokens[0])?;
            return self.decode_finish(session, f);
        }
        let g = &self.gpu;
        let n = tokens.len();
        session.idle()?;
        check_tokens(&self.config, session.pos, session.capacity, tokens)?;
        let pos_host = session.pos;
        session.commit(self, n)?;
        // after the decode steps its lane has run
        session.settle(self)?;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let ids = g.upload(&ids)?;
        let pos = g.upload(&[pos_host as i32])?;
        let logits = self.body(host, session, &ids, &pos, pos_host, n, which)?;
        let r = f(LogitsOut::unchecked(&g.download(&logits.as_view())?));
        session.pos += n;
        session.tokens.extend_from_slice(tokens);
        Ok(r)
    }

    /// One token through the session's decode graph (captured at the first call); the
    /// logits land in the step's page-locked buffer.
    pub(super) fn decode(&self, host: Option<&Model>, session: &mut GpuSession, token: u32) -> Result<(), ModelError> {
        let mut step = session.step.take().ok_or_else(|| ModelError::Input("the session's decode step is missing".into()))?;
        let result = self.decode_with(host, session, &mut step, token);
        session.step = Some(step);
        result
    }

    fn decode_with(&self, host: Option<&Model>, session: &mut GpuSession, step: &mut Step, token: u32) -> Result<(), ModelError> {
        let g = &self.gpu;
        let io = match &session.lane {
            Some(lane) => g.pinned_host_mut_after(lane, &mut step.io)?,
            None => g.pinned_host_mut(&mut step.io)?,
        };
        io[..2].copy_from_slice(&[token as i32, session.pos as i32]);
        // experts moved since the capture (--expert-rebalance): capture again
        if step.placement != self.placement_generation {
            step.graph = None;
            step.placement = self.placement_generation;
        }
        if step.graph.is_none() {
            session.prepare_host_calls(self, host)?;
            let pos_host = session.pos;
            let Step { io, token, pos, found, logits, .. } = step;
            let graph = g.capture(|| {
                g.upload_pinned(io, 0, &mut token.as_view_mut())?;
                g.upload_pinned(io, 1, &mut pos.as_view_mut())?;
                self.decode_body(host, session, token, pos, pos_host, StepOut { logits, io, found }).map_err(to_kernel)
            })?;
            step.graph = Some(graph);
        }
        match (&step.graph, &session.lane) {
            (Some(graph), Some(lane)) => {
                // after the main stream's work for it: a prefill, the capture's uploads
                g.lane_after_main(lane)?;
                g.launch_graph_on(graph, lane)?;
            }
            (Some(graph), None) => g.launch_graph(graph)?,
            (None, _) => {}
        }
        Ok(())
    }

    /// The layers and the head over `n` tokens whose ids are in `ids` (device), starting at
    /// the position in `pos` (device; `pos_host` is the same number, for shape checks).
    /// Queues work only: nothing here waits for the GPU unless profiling is on.
    #[allow(clippy::too_many_arguments)]
    fn body(
        &self,
        host: Option<&Model>,
        session: &mut GpuSession,
        ids: &CudaSlice<i32>,
        pos: &CudaSlice<i32>,
        pos_host: usize,
        n: usize,
        which: Logits,
    ) -> Result<CudaSlice<f32>, ModelError> {
        let mut x = self.embed(ids, n)?;
        let pending = self.run_layers(host, session, &mut x, pos, pos_host, n)?;
        self.head(&mut x, pending, n, which)
    }

    /// x [n, dim] = the embeddings of the tokens in `ids` (on the part with the first layer).
    pub(crate) fn embed(&self, ids: &CudaSlice<i32>, n: usize) -> Result<CudaSlice<f32>, ModelError> {
        let g = &self.gpu;
        let emb = self.token_embd.as_ref().filter(|_| self.first_layer == 0).ok_or_else(|| {
            ModelError::Input(format!(
                "layers from {} of a split model: the embedding is on the part with the first layer",
                self.first_layer
            ))
        })?;
        self.stage("embed", || {
            let mut x = g.alloc::<f32>(n * self.config.dim)?;
            g.gather_embed(emb, ids, n, &mut x.as_view_mut())?;
            Ok(x)
        })
    }

    /// This model's (or part's) layers over x [n, dim] in place, at the position in `pos`
    /// (device; `pos_host` the same number). The last layer's MoE output is returned, not
    /// yet added to x: [`GpuModel::head`] adds it in its norm, or [`Pending::apply`]. x
    /// may end in another buffer than it started in (decode's MoE norm fused into the
    /// router writes the normalised row to a new one): a caller that needs the result at
    /// a fixed address copies it there.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_layers(
        &self,
        host: Option<&Model>,
        session: &mut GpuSession,
        x: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        pos_host: usize,
        n: usize,
    ) -> Result<Option<Pending>, ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        // A stage's output waits here to be added (with its residual scales) by the next
        // norm, which does the residual, the norm and, for decode, the int8 form of the
        // next products' input in one kernel.
        let mut pending: Option<Pending> = None;
        let quick = n <= MATVEC_MAX_TOKENS;
        // RoPE's rotations for these positions, made once for every softmax layer: the
        // tensor-core kernels (bf16 and q8_0 caches) apply them as they read q and append k
        let has_softmax = self.layers.iter().any(|l| matches!(l.attn, GpuAttention::Softmax { .. }));
        let tensor_cores = match self.kv_type {
            KvType::F32 => false,
            KvType::Bf16 => c.head_dim % 8 == 0,
            KvType::Q8_0 => true,
        };
        let fused_rope = has_softmax && tensor_cores && c.rotary_dim > 0;
        let table = if fused_rope { Some(g.rope_table(n, c.rotary_dim, c.rope_theta, pos)?) } else { None };
        for (l, layer) in self.layers.iter().enumerate() {
            let stage = match layer.attn {
                GpuAttention::Lightning { .. } => "lightning attention",
                GpuAttention::Softmax { .. } => "softmax attention",
            };
            self.stage(stage, || {
                let first_product = match &layer.attn {
                    GpuAttention::Lightning { qkv, .. } => qkv,
                    GpuAttention::Softmax { q, .. } => q,
                };
                let act = self.norm_into(x, pending.take(), &layer.attn_norm, quick && quantized(first_product.qtype))?;
                let (a, r) = match &layer.attn {
                    GpuAttention::Lightning { qkv, gate, norm, out, decay } => {
                        let mut ys = self.linear_many_with(&[qkv, gate], &x.as_view(), n, act.as_ref())?.into_iter();
                        let (Some(p), Some(gv)) = (ys.next(), ys.next()) else {
                            return Err(ModelError::Input("lightning products missing".into()));
                        };
                        let state =
                            session.lightning[l].as_mut().ok_or_else(|| ModelError::Input(format!("layer {l} has no lightning state")))?;
                        let mut o = g.alloc::<f32>(n * c.attn_dim())?;
                        // prefill on tensor cores, unless exact f32 kernels were asked for; both
                        // apply the SiLU to q, k, v as they read them
                        let shape = (n, c.n_heads, c.head_dim);
                        if n > MATVEC_MAX_TOKENS && self.kv_type != KvType::F32 {
                            g.lightning_chunked(&p.as_view(), state, decay, &mut o.as_view_mut(), shape, true)?;
                        } else {
                            g.lightning(&p.as_view(), state, decay, &mut o.as_view_mut(), shape, true)?;
                        }
                        // the output's norm and gate in one kernel, with the out product's
                        // int8 input for decode
                        let eps = c.lightning_norm_eps as f32;
                        let act =
                            g.rmsnorm_fused(&mut o.as_view_mut(), None, norm, Some(&gv.as_view()), eps, quick && quantized(out.qtype))?;
                        let mut ys = self.linear_many_with(&[out], &o.as_view(), n, act.as_ref())?;
                        (ys.pop().ok_or_else(|| ModelError::Input("lightning output product missing".into()))?, c.residual_lightning)
                    }
                    GpuAttention::Softmax { q, k, v, out } => {
                        let (a_dim, kv_dim) = (c.attn_dim(), c.kv_dim());
                        let mut ys = self.linear_many_with(&[q, k, v], &x.as_view(), n, act.as_ref())?.into_iter();
                        let (Some(mut qs), Some(mut ks), Some(vs)) = (ys.next(), ys.next(), ys.next()) else {
                            return Err(ModelError::Input("attention products missing".into()));
                        };
                        let (kc, vc) = session.kv[l].as_mut().ok_or_else(|| ModelError::Input(format!("layer {l} has no KV cache")))?;
                        let (heads, kv_heads, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
                        // the tensor-core kernels apply RoPE as they read q and append k; the
                        // f32 kernels take q and k rotated by the rope kernel
                        match &table {
                            Some(t) => g.kv_append_roped(&ks.as_view(), kc, pos, pos_host, (n, kv_dim, hd), t)?,
                            None => {
                                g.rope(&mut qs.as_view_mut(), n, a_dim, hd, c.rotary_dim, c.rope_theta, pos)?;
                                g.rope(&mut ks.as_view_mut(), n, kv_dim, hd, c.rotary_dim, c.rope_theta, pos)?;
                                g.kv_append(&ks.as_view(), kc, pos, pos_host, n, kv_dim)?;
                            }
                        }
                        g.kv_append(&vs.as_view(), vc, pos, pos_host, n, kv_dim)?;
                        let mut o = g.alloc::<f32>(n * a_dim)?;
                        let qv = qs.as_view();
                        if n == 1 {
                            let splits = g.decode_splits(session.capacity, kv_heads);
                            g.attend_decode(&qv, kc, vc, &mut o.as_view_mut(), heads, kv_heads, hd, pos, pos_host, splits, table.as_ref())?;
                        } else {
                            g.attend(&qv, kc, vc, &mut o.as_view_mut(), n, heads, kv_heads, hd, pos, pos_host, table.as_ref())?;
                        }
                        (self.linear(out, &o.as_view(), n)?, c.residual_softmax)
                    }
                };
                pending = Some(Pending::plain(a, r.alpha as f32, r.beta as f32));
                Ok(())
            })?;
            // resident experts: two stages, the router (with the host's wait for its choices
            // in prefill) and the experts; offloaded: one, or in a decode graph two as well
            let call = match (&layer.slot, host) {
                (Some(_), Some(_)) if n == 1 && g.is_capturing() => {
                    let call = session.host_calls.get(l).and_then(Option::as_ref);
                    Some(call.ok_or_else(|| {
                        ModelError::Input(format!("layer {}: no host call made for the decode graph", self.first_layer + l))
                    })?)
                }
                _ => None,
            };
            let (routed, act) = self.stage("moe router", || {
                let resident = layer.slot.is_none();
                let products = resident || call.is_some_and(|c| c.gpu_products(layer));
                let quantize = quick && products && quantized(layer.gate_exps.qtype);
                // decode: the norm inside the router's kernel, where that fusion applies
                if (resident || call.is_some()) && n == 1 {
                    if let Some((routed, act)) = self.norm_route(layer, x, pending.as_ref(), quantize, &mut session.counts[l])? {
                        pending = None;
                        return Ok((Some(routed), act));
                    }
                }
                let act = self.norm_into(x, pending.take(), &layer.ffn_norm, quantize)?;
                match layer.slot {
                    Some(_) => Ok((None, act)),
                    None => Ok((Some(self.moe_route(layer, &x.as_view(), n, &mut session.counts[l])?), act)),
                }
            })?;
            self.stage(if layer.slot.is_none() { "moe experts" } else { "moe (offload)" }, || {
                let (alpha, beta) = (c.residual_mlp.alpha as f32, c.residual_mlp.beta as f32);
                let (k, d) = (c.n_experts_used, c.dim);
                let p = match (&layer.slot, host, routed) {
                    (None, _, Some(r)) => {
                        let (y, weights) = self.moe_experts(layer, r, &x.as_view(), n, act.as_ref())?;
                        Pending::experts(g, y, weights, n, k, d, alpha, beta)?
                    }
                    (Some(slot), Some(h), routed) => {
                        let (lm, counts) = (self.first_layer + l, &mut session.counts[l]);
                        match call {
                            Some(call) => {
                                let (y, weights) = self.moe_offload_captured(call, layer, &x.as_view(), routed, act, counts)?;
                                Pending::experts(g, y, weights, 1, k, d, alpha, beta)?
                            }
                            None => Pending::plain(self.moe_offload(h, lm, layer, slot, &x.as_view(), n, counts)?, alpha, beta),
                        }
                    }
                    (Some(_), None, _) => return Err(ModelError::Input("experts in host memory need the host model".into())),
                    (None, _, None) => return Err(ModelError::Input("the router's choices are missing".into())),
                };
                pending = Some(p);
                Ok(())
            })?;
        }
        Ok(pending)
    }

    /// Logits of the last row (or all rows) of x [n, dim] plus `pending` (the last layer's
    /// output): the residual, the final norm and lm_head (on the part with the last layer).
    /// The rows the logits are of are left normalised in x.
    pub(crate) fn head(
        &self,
        x: &mut CudaSlice<f32>,
        pending: Option<Pending>,
        n: usize,
        which: Logits,
    ) -> Result<CudaSlice<f32>, ModelError> {
        let d = self.config.dim;
        let lm_head = self.lm_head()?;
        let first = match which {
            Logits::All => 0,
            Logits::Last => n - 1,
        };
        self.stage("lm_head", || {
            self.final_norm(x, pending, first, n)?;
            // bulk work: other sequences' steps go first (lanes)
            self.gpu.bulk(|| self.linear(lm_head, &x.slice(first * d..n * d), n - first))
        })
    }

    /// Rows first..n of x [n, dim] = the final norm of x plus `pending` (the last layer's
    /// output), in place.
    fn final_norm(&self, x: &mut CudaSlice<f32>, pending: Option<Pending>, first: usize, n: usize) -> Result<(), ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let d = c.dim;
        let norm =
            self.output_norm.as_ref().ok_or_else(|| ModelError::Input("the final norm is on the part with the last layer".into()))?;
        let mut h = x.slice_mut(first * d..n * d);
        let eps = c.rms_eps as f32;
        match &pending {
            Some(p) => _ = g.rmsnorm_fused(&mut h, Some(&p.residual(first..n, d)), norm, None, eps, false)?,
            None => g.rmsnorm(&mut h, norm, eps)?,
        }
        Ok(())
    }

    /// The decode step's work inside its graph: the token through the layers and the
    /// head, its logits copied to the host and looked through for NaN and infinity on the
    /// side stream meanwhile ([`GpuModel::logits_out`]). With `MXR_LOGITS_SPLIT=1` and a
    /// float lm_head of 2,048 rows or more, the lm_head runs in two launches and the first
    /// half's logits go to the host on the side stream while the second half computes: the
    /// copy (~37 us for 200,064 logits on an H200) overlaps the product instead of
    /// following it.
    fn decode_body(
        &self,
        host: Option<&Model>,
        session: &mut GpuSession,
        token: &CudaSlice<i32>,
        pos: &CudaSlice<i32>,
        pos_host: usize,
        mut out: StepOut<'_>,
    ) -> Result<(), ModelError> {
        let g = &self.gpu;
        let lm = self.lm_head()?;
        let (warps, per_warp) = g.tuning.matvec_shape(lm.qtype);
        let block_rows = (warps * per_warp) as usize;
        let half = lm.rows / 2 / block_rows * block_rows;
        let float_rows = match lm.qtype {
            QType::BF16 | QType::F16 => lm.cols % 8 == 0,
            QType::F32 => lm.cols % 4 == 0,
            _ => false,
        };
        if !(g.tuning.logits_split && float_rows && lm.n_experts == 1 && lm.rows >= 2048) {
            let y = self.body(host, session, token, pos, pos_host, 1, Logits::Last)?;
            return self.logits_out(&y, 0, &mut out);
        }
        let mut x = self.embed(token, 1)?;
        let pending = self.run_layers(host, session, &mut x, pos, pos_host, 1)?;
        self.stage("lm_head", || {
            self.final_norm(&mut x, pending, 0, 1)?;
            let v = lm.rows;
            let mut y = g.alloc::<f32>(v)?;
            g.matvec_rows(lm, 0..half, &x.as_view(), &mut y.slice_mut(0..half))?;
            g.side_after_main()?;
            g.download_pinned_side(&y.slice(0..half), out.logits, 0)?;
            g.matvec_rows(lm, half..v, &x.as_view(), &mut y.slice_mut(half..v))?;
            self.logits_out(&y, half, &mut out)
        })
    }

    /// The decode step's end, after its last product: logits y[from..] to the host (those
    /// before `from` are on their way on the side stream already) and, on the side stream
    /// meanwhile, the look for their first NaN or infinity, its answer after them into the
    /// step's `io`; then the join. With `MXR_TIMELINE=1` all on the main stream (a
    /// timeline's slots follow one stream's capture order), after a mark that charges the
    /// copy apart from the lm_head.
    fn logits_out(&self, y: &CudaSlice<f32>, from: usize, out: &mut StepOut<'_>) -> Result<(), ModelError> {
        let g = &self.gpu;
        if g.tuning.timeline {
            g.timeline_mark()?;
            g.download_pinned(&y.slice(from..), out.logits, from)?;
            g.first_non_finite(&y.as_view(), &mut out.found.as_view_mut())?;
            return Ok(g.download_pinned(&out.found.as_view(), out.io, IO_FOUND)?);
        }
        g.side_after_main()?;
        g.first_non_finite_side(&y.as_view(), &mut out.found.as_view_mut())?;
        g.download_pinned_side(&out.found.as_view(), out.io, IO_FOUND)?;
        g.download_pinned(&y.slice(from..), out.logits, from)?;
        // y is freed after this join, once the copies and the look have read it
        Ok(g.main_after_side()?)
    }
}

/// Where a decode step's graph leaves its results: the logits' page-locked buffer, the
/// step's `io` (the answer of the look for NaN and infinity goes to [`IO_FOUND`]) and the
/// device word that answer is found in.
struct StepOut<'a> {
    logits: &'a mut Pinned<f32>,
    io: &'a mut Pinned<i32>,
    found: &'a mut CudaSlice<i32>,
}

impl GpuModel {
    /// x = rmsnorm(x + the pending stage output, scaled) * w in place; with `quantize` also
    /// x's int8 form for the matrix-vector products that read it next.
    fn norm_into(
        &self,
        x: &mut CudaSlice<f32>,
        pending: Option<Pending>,
        w: &CudaSlice<f32>,
        quantize: bool,
    ) -> Result<Option<QAct>, ModelError> {
        let eps = self.config.rms_eps as f32;
        let rows = x.len() / self.config.dim;
        let r = pending.as_ref().map(|p| p.residual(0..rows, self.config.dim));
        Ok(self.gpu.rmsnorm_fused(&mut x.as_view_mut(), r.as_ref(), w, None, eps, quantize)?)
    }
}

/// A stage's output not yet added to the residual stream x: the next norm adds it (with
/// the stage's residual scales alpha x + beta out) in its own kernel. With `weights` (the
/// MoE's routing weights [n, k]) `out` holds each token's k expert outputs [n k, dim],
/// summed with those weights as they are added.
pub(crate) struct Pending {
    out: CudaSlice<f32>,
    weights: Option<CudaSlice<f32>>,
    k: usize,
    alpha: f32,
    beta: f32,
}

impl Pending {
    fn plain(out: CudaSlice<f32>, alpha: f32, beta: f32) -> Pending {
        Pending { out, weights: None, k: 1, alpha, beta }
    }

    /// The MoE's expert outputs y [n k, dim] and weights [n, k]; combined here already
    /// (`moe_combine`) when that fusion is off (`MXR_FUSE` without 4).
    #[allow(clippy::too_many_arguments)]
    fn experts(
        g: &Gpu,
        y: CudaSlice<f32>,
        weights: CudaSlice<f32>,
        n: usize,
        k: usize,
        d: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<Pending, ModelError> {
        if g.tuning.fuse & mxr_kernels::cuda::FUSE_COMBINE != 0 {
            return Ok(Pending { out: y, weights: Some(weights), k, alpha, beta });
        }
        let mut m = g.alloc::<f32>(n * d)?;
        g.moe_combine(&y.as_view(), &weights.as_view(), n, k, d, &mut m.as_view_mut())?;
        Ok(Pending::plain(m, alpha, beta))
    }

    /// The residual term for rows `rows` of x (of width d).
    pub(crate) fn residual(&self, rows: std::ops::Range<usize>, d: usize) -> Residual<'_> {
        let k = self.k;
        Residual {
            a: self.out.slice(rows.start * k * d..rows.end * k * d),
            alpha: self.alpha,
            beta: self.beta,
            combine: self.weights.as_ref().map(|w| (w.slice(rows.start * k..rows.end * k), k)),
        }
    }

    /// x [n, d] = alpha x + beta out, without a norm (a part of a split model hands x on).
    pub(crate) fn apply(self, g: &Gpu, x: &mut CudaSlice<f32>, d: usize) -> Result<(), ModelError> {
        let n = x.len() / d.max(1);
        let out = match self.weights {
            Some(w) => {
                let mut m = g.alloc::<f32>(n * d)?;
                g.moe_combine(&self.out.as_view(), &w.as_view(), n, self.k, d, &mut m.as_view_mut())?;
                m
            }
            None => self.out,
        };
        g.residual(&mut x.as_view_mut(), &out.as_view(), self.alpha, self.beta)?;
        Ok(())
    }
}

/// The checks of a forward call: some tokens, all in the vocabulary, room in the context.
pub(crate) fn check_tokens(c: &crate::Config, pos: usize, capacity: usize, tokens: &[u32]) -> Result<(), ModelError> {
    let n = tokens.len();
    if n == 0 {
        return Err(ModelError::Input("no tokens to evaluate".into()));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", c.vocab_size)));
    }
    if pos + n > capacity {
        return Err(ModelError::Input(format!("{n} tokens after {pos} exceed the context of {capacity}")));
    }
    Ok(())
}

/// After a replay of `graph` has finished: the first failure of its host calls (experts on
/// the CPU), as an error.
pub(crate) fn host_failure(graph: Option<&Graph>) -> Result<(), ModelError> {
    match graph.and_then(|g| g.host_error()) {
        Some(why) => Err(ModelError::Input(format!("experts on the CPU in the decode step: {why}"))),
        None => Ok(()),
    }
}

/// Errors inside a graph capture travel as kernel errors.
pub(crate) fn to_kernel(e: ModelError) -> mxr_kernels::KernelError {
    match e {
        ModelError::Kernel(k) => k,
        other => mxr_kernels::KernelError::Cuda(other.to_string()),
    }
}
