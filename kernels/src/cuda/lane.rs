//! Lanes: streams of their own for sequences decoded side by side (`mxr bench
//! --parallel`, issue 7). Each such sequence's decode graph replays on its lane, so that
//! one sequence's GPU work (attention, resident experts, lm_head) runs while another's
//! graph waits for the CPU's share of its cold experts. Work on the main stream (a
//! prefill, a capture's uploads) is ordered before a lane's next launch, and a lane's
//! launches before later main-stream work, by events ([`Gpu::lane_after_main`],
//! [`Gpu::main_after_lane`]).

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream, ValidAsZeroBits};

use super::pinned::Pinned;
use super::{drv, order, Gpu, Graph, Result};

/// A stream a sequence's decode graph replays on.
pub struct Lane {
    stream: Arc<CudaStream>,
    /// recorded again at each [`Lane::done`]: the end of the work queued then
    mark: CudaEvent,
}

impl Lane {
    /// Waits for the lane's work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| drv("running kernels", e))
    }

    /// Whether the lane's work queued so far is done, without waiting (a caller with
    /// several steps in flight takes whichever ends first).
    pub fn done(&self) -> Result<bool> {
        self.mark.record(&self.stream).map_err(|e| drv("recording an event", e))?;
        self.mark.try_is_complete().map_err(|e| drv("running kernels", e))
    }
}

impl Gpu {
    /// A new lane.
    pub fn lane(&self) -> Result<Lane> {
        let ctx = self.context();
        let stream = ctx.new_stream().map_err(|e| drv("creating a stream", e))?;
        Ok(Lane { stream, mark: ctx.new_event(None).map_err(|e| drv("creating an event", e))? })
    }

    /// Later work on `lane` waits for the main stream's work queued so far.
    pub fn lane_after_main(&self, lane: &Lane) -> Result<()> {
        order(&self.stream, &lane.stream)
    }

    /// Later work on the main stream waits for `lane`'s work queued so far.
    pub fn main_after_lane(&self, lane: &Lane) -> Result<()> {
        order(&lane.stream, &self.stream)
    }

    /// Waits for `lane`'s work (counted as time the host waited on the GPU).
    pub fn sync_lane(&self, lane: &Lane) -> Result<()> {
        let t = std::time::Instant::now();
        lane.synchronize()?;
        self.waited(t);
        Ok(())
    }

    /// Replays `graph` on `lane`, timing the host's part (the launch call).
    pub fn launch_graph_on(&self, graph: &Graph, lane: &Lane) -> Result<()> {
        let t = std::time::Instant::now();
        let r = graph.launch_on(&lane.stream);
        self.launched(t);
        r
    }

    /// The host values, once `lane` has finished everything queued (a graph's download
    /// into them included); the main stream is not waited for.
    pub fn pinned_host_after<'p, T: ValidAsZeroBits>(&self, lane: &Lane, p: &'p Pinned<T>) -> Result<&'p [T]> {
        self.sync_lane(lane)?;
        p.host_values()
    }

    /// The host values to write, once `lane` has finished everything queued (a graph's
    /// upload still reading them included).
    pub fn pinned_host_mut_after<'p, T: ValidAsZeroBits>(&self, lane: &Lane, p: &'p mut Pinned<T>) -> Result<&'p mut [T]> {
        self.sync_lane(lane)?;
        p.host_values_mut()
    }
}
