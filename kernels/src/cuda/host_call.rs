//! Host work inside a captured graph (issue 7): a decode step whose layers keep experts in
//! host memory computes them on the CPU without leaving the step's CUDA graph. On the side
//! stream the graph copies the work's inputs (the layer's input row and the router's
//! choices) into page-locked buffers, runs a host node that calls the work, and copies its
//! output back; the main stream goes on with the GPU's own experts meanwhile. Leaving the
//! graph instead (the step launched kernel by kernel, the host waiting for each such
//! layer's choices) cost about 0.25 ms a layer on an H200 (docs/PERF.md).
//!
//! A host node may make no CUDA call, so the work gets plain slices: the inputs as the
//! copies left them and an output the copy after it reads. The graph that holds the node
//! keeps the [`HostCall`] alive; a failure (an error or a panic) is kept for
//! [`HostCall::take_error`] and leaves NaN in the output, so that nothing computed from it
//! passes for a result.

use std::ffi::c_void;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;

use super::pinned::Pinned;
use super::{drv, CudaView, CudaViewMut, Gpu, Result};
use crate::KernelError;

/// The work of a host node: (input row, choices, output) -> Ok, or what went wrong.
pub type HostFn = dyn Fn(&[f32], &[i32], &mut [f32]) -> std::result::Result<(), String> + Send + Sync;

/// Page-locked inputs and output of one host node, and its work.
pub struct HostCall {
    x: Pinned<f32>,
    ids: Pinned<i32>,
    out: Pinned<f32>,
    work: Box<HostFn>,
    /// the first failure since the last `take_error`
    error: Mutex<Option<String>>,
    /// held while the work runs: one call at a time touches the buffers
    busy: Mutex<()>,
}

impl HostCall {
    /// The first failure of the work since the last call (graph replays go on after one;
    /// their owner asks after each).
    pub fn take_error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    fn run(&self) {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _busy = self.busy.lock().map_err(|_| "a host call's lock was poisoned".to_string())?;
            // SAFETY: the three buffers are page-locked allocations owned by self, of the
            // lengths given. The graph orders the copies into x and ids before this node and
            // the copy out of `out` after it, and the host reads them only after waiting for
            // the stream (Gpu::pinned_host), so nothing else touches them meanwhile; `busy`
            // keeps two replays' nodes apart.
            let (x, ids, out) = unsafe {
                (
                    std::slice::from_raw_parts(self.x.at as *const f32, self.x.len()),
                    std::slice::from_raw_parts(self.ids.at as *const i32, self.ids.len()),
                    std::slice::from_raw_parts_mut(self.out.at as *mut f32, self.out.len()),
                )
            };
            let r = (self.work)(x, ids, out);
            if r.is_err() {
                out.fill(f32::NAN);
            }
            r
        }));
        let why = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(p) => format!(
                "the host work panicked: {}",
                p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
            ),
        };
        if let Ok(mut e) = self.error.lock() {
            e.get_or_insert(why);
        }
    }
}

/// The host node's entry: `data` is an `Arc<HostCall>`'s pointer.
unsafe extern "C" fn run_host_call(data: *mut c_void) {
    // SAFETY: the graph holding this node keeps the Arc (Graph::calls), and Graph's drop
    // waits for its replays before releasing it.
    let call = unsafe { &*(data as *const HostCall) };
    call.run();
}

impl Gpu {
    /// A host node's buffers (`x_len` inputs, `ids_len` choices, `out_len` outputs) and
    /// its work, for [`Gpu::host_call_side`].
    pub fn host_call(&self, x_len: usize, ids_len: usize, out_len: usize, work: Box<HostFn>) -> Result<Arc<HostCall>> {
        Ok(Arc::new(HostCall {
            x: self.pinned(x_len)?,
            ids: self.pinned(ids_len)?,
            out: self.pinned(out_len)?,
            work,
            error: Mutex::new(None),
            busy: Mutex::new(()),
        }))
    }

    /// While capturing a graph: on the side stream, after the main stream's work so far,
    /// x and ids to `call`'s page-locked inputs, the call's work on the host, and its output
    /// to `out`. Order later main-stream work that reads `out` with
    /// [`Gpu::main_after_side`]. The graph keeps `call`.
    pub fn host_call_side(
        &self,
        call: &Arc<HostCall>,
        x: &CudaView<'_, f32>,
        ids: &CudaView<'_, i32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        if !self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(KernelError::Cuda("a host call outside a graph capture".into()));
        }
        for (what, want, got) in
            [("input", call.x.len(), x.len()), ("choices", call.ids.len(), ids.len()), ("output", call.out.len(), out.len())]
        {
            if want != got {
                return Err(KernelError::Length { op: "host call", what, expected: want, actual: got });
            }
        }
        self.side_after_main()?;
        self.download_pinned_on(&self.side, x, &call.x, 0)?;
        self.download_pinned_on(&self.side, ids, &call.ids, 0)?;
        let data = Arc::as_ptr(call) as *mut c_void;
        // SAFETY: run_host_call reads data as the HostCall it is; the graph keeps it alive.
        let r = unsafe { sys::cuLaunchHostFunc(self.side.cu_stream(), Some(run_host_call), data) };
        r.result().map_err(|e| drv("queuing host work in a graph", e))?;
        self.graph_calls.lock().map_err(|_| KernelError::Cuda("the graph's host calls: lock poisoned".into()))?.push(call.clone());
        self.upload_pinned_on(&self.side, &call.out, 0, out)
    }
}
