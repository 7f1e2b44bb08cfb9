//! One interface over the CPU and GPU forward passes, for the runner: a [`Backend`] (where
//! the model computes) and a [`State`] per sequence.

use mxr_kernels::cpu::Threads;

use crate::forward::{decode_many, forward, Logits, Session};
use crate::gpu::split::{SplitModel, SplitSession};
use crate::gpu::{GpuModel, GpuSession};
use crate::{LogitsOut, Model, ModelError};

pub enum Backend {
    Cpu(Threads),
    Cuda(Box<GpuModel>),
    /// Layers split over several GPUs.
    Split(Box<SplitModel>),
}

/// One sequence's state, where its backend keeps it.
pub enum State {
    Cpu(Session),
    Cuda(GpuSession),
    Split(SplitSession),
}

impl State {
    pub fn pos(&self) -> usize {
        match self {
            State::Cpu(s) => s.pos,
            State::Cuda(s) => s.pos,
            State::Split(s) => s.pos,
        }
    }

    /// Every token evaluated so far.
    pub fn tokens(&self) -> &[u32] {
        match self {
            State::Cpu(s) => &s.tokens,
            State::Cuda(s) => &s.tokens,
            State::Split(s) => &s.tokens,
        }
    }
}

impl Backend {
    /// An empty sequence with room for `ctx` tokens.
    pub fn new_state(&self, model: &Model, ctx: usize) -> Result<State, ModelError> {
        Ok(match self {
            Backend::Cpu(_) => State::Cpu(Session::new(&model.config)),
            Backend::Cuda(g) => State::Cuda(GpuSession::new(g, ctx)?),
            Backend::Split(m) => State::Split(SplitSession::new(m, ctx)?),
        })
    }

    pub fn forward(&self, model: &Model, state: &mut State, tokens: &[u32], which: Logits) -> Result<Vec<f32>, ModelError> {
        self.forward_with(model, state, tokens, which, |l| l.logits.to_vec())
    }

    /// [`Backend::forward`], handing the logits to `f` where they lie instead of returning a
    /// copy (a GPU's decoded token: its page-locked buffer, looked through for NaN and
    /// infinity on the GPU already).
    pub fn forward_with<R>(
        &self,
        model: &Model,
        state: &mut State,
        tokens: &[u32],
        which: Logits,
        f: impl FnOnce(LogitsOut<'_>) -> R,
    ) -> Result<R, ModelError> {
        match (self, state) {
            (Backend::Cpu(t), State::Cpu(s)) => Ok(f(LogitsOut::unchecked(&forward(model, s, tokens, which, *t)?))),
            (Backend::Cuda(g), State::Cuda(s)) => g.forward_with(Some(model), s, tokens, which, f),
            (Backend::Split(m), State::Split(s)) => m.forward_with(Some(model), s, tokens, which, f),
            _ => Err(ModelError::Input("a sequence state was used with another device's model".into())),
        }
    }

    /// One decode step of several sequences in one pass (`tokens[i]` after what `states[i]`
    /// has seen): logits [sequences, vocab], each row what the sequence gives alone. The
    /// CPU only (a GPU decodes sequences side by side instead, on lanes).
    pub fn decode_many(&self, model: &Model, states: &mut [&mut State], tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let Backend::Cpu(t) = self else {
            return Err(ModelError::Input(format!("several sequences in one pass: the CPU only, not {}", self.name())));
        };
        let mut sessions = states
            .iter_mut()
            .map(|s| match &mut **s {
                State::Cpu(s) => Ok(s),
                _ => Err(ModelError::Input("a sequence state was used with another device's model".into())),
            })
            .collect::<Result<Vec<&mut Session>, _>>()?;
        decode_many(model, &mut sessions, tokens, *t)
    }

    /// An empty sequence with room for `ctx` tokens whose decode steps may be in flight
    /// beside other sequences' ([`Backend::decode_start`]): one GPU only.
    pub fn new_lane_state(&self, ctx: usize) -> Result<State, ModelError> {
        match self {
            Backend::Cuda(g) => {
                let mut s = GpuSession::new(g, ctx)?;
                s.use_lane(g)?;
                Ok(State::Cuda(s))
            }
            _ => Err(ModelError::Input(format!("sequences decoded side by side need one GPU, not {}", self.name()))),
        }
    }

    /// Launches the decode step of `token` on a state from [`Backend::new_lane_state`]
    /// without waiting for it; [`Backend::decode_finish`] takes its logits.
    pub fn decode_start(&self, model: &Model, state: &mut State, token: u32) -> Result<(), ModelError> {
        match (self, state) {
            (Backend::Cuda(g), State::Cuda(s)) => g.decode_start(Some(model), s, token),
            _ => Err(ModelError::Input("decode steps in flight need one GPU and its sequence state".into())),
        }
    }

    /// Whether the step [`Backend::decode_start`] launched is done (its logits can be
    /// taken without waiting).
    pub fn decode_ready(&self, state: &State) -> Result<bool, ModelError> {
        match (self, state) {
            (Backend::Cuda(g), State::Cuda(s)) => g.decode_ready(s),
            _ => Err(ModelError::Input("decode steps in flight need one GPU and its sequence state".into())),
        }
    }

    /// Waits for the step [`Backend::decode_start`] launched and hands its logits to `f`.
    pub fn decode_finish<R>(&self, state: &mut State, f: impl FnOnce(LogitsOut<'_>) -> R) -> Result<R, ModelError> {
        match (self, state) {
            (Backend::Cuda(g), State::Cuda(s)) => g.decode_finish(s, f),
            _ => Err(ModelError::Input("decode steps in flight need one GPU and its sequence state".into())),
        }
    }

    /// The state in host memory (to save it).
    pub fn to_session(&self, state: &State) -> Result<Session, ModelError> {
        match (self, state) {
            (_, State::Cpu(s)) => Ok(s.clone()),
            (Backend::Cuda(g), State::Cuda(s)) => s.to_host(g),
            (Backend::Split(m), State::Split(s)) => s.to_host(m),
            _ => Err(ModelError::Input("a sequence state was used with another device's model".into())),
        }
    }

    /// A state for this backend holding `session` (a loaded one), room for `ctx` tokens.
    pub fn from_session(&self, session: Session, ctx: usize) -> Result<State, ModelError> {
        Ok(match self {
            Backend::Cpu(_) => State::Cpu(session),
            Backend::Cuda(g) => State::Cuda(GpuSession::from_host(g, &session, ctx)?),
            Backend::Split(m) => State::Split(SplitSession::from_host(m, &session, ctx)?),
        })
    }

    /// Routing counts of the sequence so far, [layer][expert].
    pub fn expert_counts(&self, state: &State) -> Result<Vec<Vec<u64>>, ModelError> {
        match (self, state) {
            (_, State::Cpu(s)) => Ok(s.expert_counts.clone()),
            (Backend::Cuda(g), State::Cuda(s)) => s.expert_counts(g),
            (Backend::Split(m), State::Split(s)) => s.expert_counts(m),
            _ => Err(ModelError::Input("a sequence state was used with another device's model".into())),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Backend::Cpu(t) => format!("cpu, {} threads", t.0),
            Backend::Cuda(g) => g.gpu.info().to_string(),
            Backend::Split(m) => m.parts.iter().map(|p| p.gpu.info().to_string()).collect::<Vec<_>>().join(" + "),
        }
    }
}
