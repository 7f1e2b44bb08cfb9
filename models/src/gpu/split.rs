//! A model split by layers over several GPUs (issue 10). Each part is a [`GpuModel`]
//! holding a contiguous range of layers on its own GPU (`first_layer`): the embedding on
//! the first part, the final norm and lm_head on the last. A forward pass runs the parts in
//! order and hands the activations [n, dim] from GPU to GPU: a device-to-device copy,
//! peer to peer where the driver can, ordered against both GPUs' streams. Each part keeps
//! its own layers' KV caches and lightning states ([`SplitSession`]).

use std::ops::Range;

use mxr_kernels::cuda::{CudaSlice, Gpu, Graph, Pinned};

use super::forward::{check_tokens, host_failure, to_kernel, GpuSession};
use super::{ColdExperts, GpuModel};
use crate::forward::{Logits, Session};
use crate::placement::Placement;
use crate::{LogitsOut, Model, ModelError};

pub struct SplitModel {
    pub parts: Vec<GpuModel>,
}

/// One sequence's state over the parts of a [`SplitModel`].
pub struct SplitSession {
    pub pos: usize,
    pub tokens: Vec<u32>,
    pub capacity: usize,
    parts: Vec<GpuSession>,
    /// Per part, the decode step's graph and buffers (made at the first decoded token).
    steps: Vec<PartStep>,
}

/// One part's decode step, at fixed addresses for its graph: the position and the token
/// (written on the host into the page-locked `io`, copied in by the graph), the
/// activations handed in (later parts), and what it hands on (the activations; on the last
/// part the logits, which its graph copies out to the page-locked `logits`).
struct PartStep {
    io: Pinned<i32>,
    pos: CudaSlice<i32>,
    token: CudaSlice<i32>,
    x: CudaSlice<f32>,
    out: CudaSlice<f32>,
    logits: Option<Pinned<f32>>,
    graph: Option<Graph>,
}

impl SplitModel {
    /// Uploads layers `ranges[i]` of `model` to `gpus[i]`; the ranges must cover the layers
    /// in order. `placements[i]` (if any) places the experts of part i (rows of other layers
    /// are ignored); every part computes its cold experts as `cold` says.
    pub fn upload(
        model: &Model,
        gpus: Vec<Gpu>,
        ranges: &[Range<usize>],
        placements: &[Option<Placement>],
        cold: ColdExperts,
    ) -> Result<SplitModel, ModelError> {
        let n_layers = model.config.n_layers;
        if gpus.is_empty() || gpus.len() != ranges.len() || placements.len() != ranges.len() {
            return Err(ModelError::Input(format!(
                "{} GPUs, {} layer ranges and {} placements",
                gpus.len(),
                ranges.len(),
                placements.len()
            )));
        }
        let mut next = 0;
        for r in ranges {
            if r.start != next || r.end <= r.start {
                return Err(ModelError::Input(format!("layer ranges {ranges:?} do not cover the {n_layers} layers in order")));
            }
            next = r.end;
        }
        if next != n_layers {
            return Err(ModelError::Input(format!("layer ranges {ranges:?} do not cover the {n_layers} layers in order")));
        }
        let mut parts = Vec::with_capacity(gpus.len());
        for ((gpu, r), p) in gpus.into_iter().zip(ranges).zip(placements) {
            parts.push(GpuModel::upload_part_with(model, gpu, p.as_ref(), r.clone(), cold)?);
        }
        Ok(SplitModel { parts })
    }

    pub fn config(&self) -> &crate::Config {
        &self.parts[0].config
    }

    /// Device bytes of the weights, all parts.
    pub fn weight_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.weight_bytes).sum()
    }

    /// Runs `tokens` after what `s` has seen; logits as [`GpuModel::forward_on`]. `host`:
    /// the mapped model, needed when some part keeps experts in host memory.
    pub fn forward(&self, host: Option<&Model>, s: &mut SplitSession, tokens: &[u32], which: Logits) -> Result<Vec<f32>, ModelError> {
        self.forward_with(host, s, tokens, which, |l| l.logits.to_vec())
    }

    /// [`SplitModel::forward`], handing the logits to `f` where they lie (a decoded
    /// token's: the last part's page-locked buffer), as [`GpuModel::forward_with`].
    pub fn forward_with<R>(
        &self,
        host: Option<&Model>,
        s: &mut SplitSession,
        tokens: &[u32],
        which: Logits,
        f: impl FnOnce(LogitsOut<'_>) -> R,
    ) -> Result<R, ModelError> {
        if self.parts.iter().any(|p| p.offloaded) && host.is_none() {
            return Err(ModelError::Input("this split model keeps experts in host memory: run it with its host model".into()));
        }
        let n = tokens.len();
        check_tokens(self.config(), s.pos, s.capacity, tokens)?;
        for (part, ps) in self.parts.iter().zip(s.parts.iter_mut()) {
            ps.commit(part, n)?;
        }
        let r = if n == 1 && which == Logits::Last && self.parts.iter().all(|p| p.decode_graphs()) {
            self.decode(host, s, tokens[0])?;
            let logits = s
                .steps
                .last()
                .and_then(|st| st.logits.as_ref())
                .ok_or_else(|| ModelError::Input("the last part's decode step has no logits buffer".into()))?;
            let logits = self.parts[self.parts.len() - 1].gpu.pinned_host(logits)?;
            // every part's host calls were answered before the last part could finish
            for st in &s.steps {
                host_failure(st.graph.as_ref())?;
            }
            f(LogitsOut::unchecked(logits))
        } else {
            f(LogitsOut::unchecked(&self.pass(host, s, tokens, which)?))
        };
        for ps in &mut s.parts {
            ps.pos += n;
            ps.tokens.extend_from_slice(tokens);
        }
        s.pos += n;
        s.tokens.extend_from_slice(tokens);
        Ok(r)
    }

    /// The parts one after another, kernel by kernel.
    fn pass(&self, host: Option<&Model>, s: &mut SplitSession, tokens: &[u32], which: Logits) -> Result<Vec<f32>, ModelError> {
        let (n, pos_host) = (tokens.len(), s.pos);
        let first = &self.parts[0];
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let ids = first.gpu.upload(&ids)?;
        let mut x = first.embed(&ids, n)?;
        let mut prev: Option<&GpuModel> = None;
        let mut pending: Option<super::forward::Pending> = None;
        for (part, ps) in self.parts.iter().zip(s.parts.iter_mut()) {
            if let Some(p) = prev {
                // the previous part's last output is added on its GPU, then x moves on
                if let Some(out) = pending.take() {
                    out.apply(&p.gpu, &mut x, self.config().dim)?;
                }
                x = part.gpu.take_from(&p.gpu, &x)?;
            }
            let pos = part.gpu.upload(&[pos_host as i32])?;
            pending = part.run_layers(host, ps, &mut x, &pos, pos_host, n)?;
            prev = Some(part);
        }
        let last = prev.ok_or_else(|| ModelError::Input("a split model without parts".into()))?;
        let logits = last.head(&mut x, pending, n, which)?;
        Ok(last.gpu.download(&logits.as_view())?)
    }

    /// One token: each part replays its captured graph (captured at the first call), the
    /// activations handed from part to part between the replays; the logits land in the
    /// last part's page-locked buffer.
    fn decode(&self, host: Option<&Model>, s: &mut SplitSession, token: u32) -> Result<(), ModelError> {
        let c = self.config();
        if s.steps.is_empty() {
            for (i, p) in self.parts.iter().enumerate() {
                let g = &p.gpu;
                let is_last = i + 1 == self.parts.len();
                s.steps.push(PartStep {
                    io: g.pinned(2)?,
                    pos: g.zeros(1)?,
                    token: g.zeros(1)?,
                    x: g.zeros(c.dim)?,
                    out: g.zeros(if is_last { c.vocab_size } else { c.dim })?,
                    logits: if is_last { Some(g.pinned(c.vocab_size)?) } else { None },
                    graph: None,
                });
            }
        }
        let pos_host = s.pos;
        let last = self.parts.len() - 1;
        for (i, part) in self.parts.iter().enumerate() {
            let g = &part.gpu;
            let (before, rest) = s.steps.split_at_mut(i);
            let st = &mut rest[0];
            g.pinned_host_mut(&mut st.io)?.copy_from_slice(&[token as i32, pos_host as i32]);
            if let Some(prev) = before.last() {
                g.copy_from(&self.parts[i - 1].gpu, &prev.out, &mut st.x)?;
            }
            if st.graph.is_none() {
                let ps = &mut s.parts[i];
                ps.prepare_host_calls(part, host)?;
                let PartStep { io, pos, token, x, out, logits, .. } = st;
                let graph = g.capture(|| {
                    g.upload_pinned(io, 0, &mut token.as_view_mut())?;
                    g.upload_pinned(io, 1, &mut pos.as_view_mut())?;
                    // the first part embeds its token; later parts work on a copy of the
                    // activations copied into `x` before each replay: run_layers may
                    // replace the buffer it is given (the MoE norm fused into the router
                    // writes a new row), and `x` must stay where the replays copy to
                    let mut y = if i == 0 {
                        part.embed(token, 1).map_err(to_kernel)?
                    } else {
                        let mut own = g.alloc::<f32>(x.len())?;
                        g.copy(&x.as_view(), &mut own.as_view_mut())?;
                        own
                    };
                    let y = &mut y;
                    let pending = part.run_layers(host, ps, y, pos, pos_host, 1).map_err(to_kernel)?;
                    if i == last {
                        let l = part.head(y, pending, 1, Logits::Last).map_err(to_kernel)?;
                        g.copy(&l.as_view(), &mut out.as_view_mut())?;
                        match logits {
                            Some(host) => g.download_pinned(&out.as_view(), host, 0),
                            None => Err(mxr_kernels::KernelError::Cuda("the last part's decode step has no logits buffer".into())),
                        }
                    } else {
                        if let Some(p) = pending {
                            p.apply(g, y, c.dim).map_err(to_kernel)?;
                        }
                        g.copy(&y.as_view(), &mut out.as_view_mut())
                    }
                })?;
                st.graph = Some(graph);
            }
            if let Some(graph) = &st.graph {
                g.launch_graph(graph)?;
            }
        }
        Ok(())
    }
}

impl SplitSession {
    /// An empty sequence with KV room for `capacity` tokens on every part.
    pub fn new(m: &SplitModel, capacity: usize) -> Result<SplitSession, ModelError> {
        let parts = m.parts.iter().map(|p| GpuSession::new(p, capacity)).collect::<Result<Vec<_>, _>>()?;
        Ok(SplitSession { pos: 0, tokens: Vec::new(), capacity, parts, steps: Vec::new() })
    }

    /// The whole sequence in host memory.
    pub fn to_host(&self, m: &SplitModel) -> Result<Session, ModelError> {
        let mut s = Session::new(m.config());
        s.pos = self.pos;
        s.tokens = self.tokens.clone();
        for (part, ps) in m.parts.iter().zip(&self.parts) {
            ps.fill_host(part, &mut s)?;
        }
        Ok(s)
    }

    /// A split session holding what `s` holds.
    pub fn from_host(m: &SplitModel, s: &Session, capacity: usize) -> Result<SplitSession, ModelError> {
        let parts = m.parts.iter().map(|p| GpuSession::from_host(p, s, capacity)).collect::<Result<Vec<_>, _>>()?;
        Ok(SplitSession { pos: s.pos, tokens: s.tokens.clone(), capacity, parts, steps: Vec::new() })
    }

    /// Routing counts so far, [layer][expert] over all parts.
    pub fn expert_counts(&self, m: &SplitModel) -> Result<Vec<Vec<u64>>, ModelError> {
        let mut all = Vec::new();
        for (part, ps) in m.parts.iter().zip(&self.parts) {
            all.extend(ps.expert_counts(part)?);
        }
        Ok(all)
    }
}
