//! Sequences decoded side by side on one GPU (`mxr bench --parallel`, issue 7): each
//! session on a lane of its own (mxr_kernels::cuda::lane) replays its decode graph there,
//! and a decode step is split in two, [`GpuModel::decode_start`] (the launch) and
//! [`GpuModel::decode_finish`] (the wait and the logits), so that a caller keeps several
//! steps in flight. With experts in host memory this is what lets the GPU work while the
//! CPU computes cold experts: one sequence's attention, resident experts and lm_head run
//! while another's step waits for its cold experts, which a single sequence cannot do (its
//! next layer needs them).

use super::forward::{check_tokens, host_failure, GpuSession, IO_FOUND};
use super::GpuModel;
use crate::{LogitsOut, Model, ModelError};

impl GpuSession {
    /// Decodes on a lane of its own from now on: its steps may overlap other sessions'.
    pub fn use_lane(&mut self, m: &GpuModel) -> Result<(), ModelError> {
        if self.lane.is_none() {
            self.lane = Some(m.gpu.lane()?);
        }
        Ok(())
    }

    /// Later main-stream work (a prefill, a download of the state) waits for the steps
    /// queued on the session's lane.
    pub(super) fn settle(&self, m: &GpuModel) -> Result<(), ModelError> {
        match &self.lane {
            Some(lane) => Ok(m.gpu.main_after_lane(lane)?),
            None => Ok(()),
        }
    }

    /// An error while a started step's logits have not been taken.
    pub(super) fn idle(&self) -> Result<(), ModelError> {
        match &self.step {
            Some(step) if step.in_flight => {
                Err(ModelError::Input("a decode step of this sequence is in flight: take its logits (decode_finish) first".into()))
            }
            _ => Ok(()),
        }
    }
}

impl GpuModel {
    /// Launches the decode step of `token` after what `session` has seen (its graph,
    /// captured at the first call) and returns without waiting: take the logits with
    /// [`GpuModel::decode_finish`]. Needs decode graphs (not while profiling).
    pub fn decode_start(&self, host: Option<&Model>, session: &mut GpuSession, token: u32) -> Result<(), ModelError> {
        if self.offloaded && host.is_none() {
            return Err(ModelError::Input("this GPU model keeps experts in host memory: run it with its host model".into()));
        }
        if !self.decode_graphs() {
            return Err(ModelError::Input("a decode step in flight needs decode graphs (off while profiling)".into()));
        }
        session.idle()?;
        check_tokens(&self.config, session.pos, session.capacity, &[token])?;
        session.commit(self, 1)?;
        self.decode(host, session, token)?;
        if let Some(step) = session.step.as_mut() {
            step.in_flight = true;
        }
        session.pos += 1;
        session.tokens.push(token);
        Ok(())
    }

    /// Whether the step [`GpuModel::decode_start`] launched is done, so that
    /// [`GpuModel::decode_finish`] would not wait. An error where none is in flight.
    pub fn decode_ready(&self, session: &GpuSession) -> Result<bool, ModelError> {
        match &session.step {
            Some(step) if step.in_flight => match &session.lane {
                Some(lane) => Ok(lane.done()?),
                // the main stream: finishing waits there
                None => Ok(true),
            },
            _ => Err(ModelError::Input("no decode step of this sequence is in flight".into())),
        }
    }

    /// Waits for the step [`GpuModel::decode_start`] launched and hands its logits to `f`
    /// where they lie (checked on the GPU for NaN and infinity).
    pub fn decode_finish<R>(&self, session: &mut GpuSession, f: impl FnOnce(LogitsOut<'_>) -> R) -> Result<R, ModelError> {
        let g = &self.gpu;
        let step = session.step.as_mut().ok_or_else(|| ModelError::Input("the session's decode step is missing".into()))?;
        if !step.in_flight {
            return Err(ModelError::Input("no decode step of this sequence is in flight".into()));
        }
        step.in_flight = false;
        let (io, logits) = match &session.lane {
            Some(lane) => (g.pinned_host_after(lane, &step.io)?, g.pinned_host_after(lane, &step.logits)?),
            None => (g.pinned_host(&step.io)?, g.pinned_host(&step.logits)?),
        };
        let found = usize::try_from(io[IO_FOUND]).ok();
        // the step's host calls (experts on the CPU) have been answered by now
        host_failure(step.graph.as_ref())?;
        Ok(f(LogitsOut::checked(logits, found)))
    }
}

impl Drop for GpuSession {
    fn drop(&mut self) {
        // a step in flight on the lane still reads and writes the session's buffers
        if let (Some(lane), Some(step)) = (&self.lane, &self.step) {
            if step.in_flight {
                let _ = lane.synchronize();
            }
        }
    }
}
