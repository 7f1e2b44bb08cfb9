//! Captured CUDA graphs, with programmatic dependent launch between mxr's kernels.
//!
//! A captured graph orders each kernel after the one before it: the next kernel's blocks
//! start only once the previous kernel's last block has finished, and the GPU idles at
//! every step of a decode (about a hundred kernels per token). With programmatic edges the
//! next kernel's blocks may start while the previous one drains; every mxr kernel begins
//! with `PDL_ENTRY()` (common.cuh), whose griddepcontrol.wait holds it until the kernel it
//! depends on has completed and its writes are visible. The edges are set while capturing,
//! just before each of mxr's own launches (a cuBLAS kernel has no such wait, and edges
//! cannot be changed afterwards in a graph that holds allocation nodes).

use cudarc::driver::sys::{
    self, cuGraphNodeGetType, cuStreamGetCaptureInfo_v3, cuStreamUpdateCaptureDependencies_v2, CUgraphEdgeData, CUgraphNode,
    CUgraphNodeType, CUstreamCaptureStatus,
};
use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream};

use super::cu_ok;
use super::host_call::{HostCall, Worker};
use crate::KernelError;

type Result<T> = std::result::Result<T, KernelError>;

/// A captured sequence of GPU work, replayed as one launch, and the host calls it posts to
/// the GPU's host worker (see host_call.rs).
pub struct Graph {
    pub(super) graph: CudaGraph,
    pub(super) calls: Vec<Arc<HostCall>>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) worker: Arc<Worker>,
    /// the counters of its `arrived_last` kernels (dropped after the graph)
    pub(super) tickets: Option<CudaSlice<u32>>,
}

impl Graph {
    pub fn launch(&self) -> Result<()> {
        self.kick();
        self.graph.launch().map_err(|e| KernelError::Cuda(format!("launching a graph: {e}")))
    }

    /// Before a replay of a graph with host calls: the worker spins before the first post
    /// reaches it.
    fn kick(&self) {
        if !self.calls.is_empty() {
            self.worker.kick();
        }
    }

    /// Replays the graph on `stream` instead of the one it was captured on (a lane).
    pub(super) fn launch_on(&self, stream: &CudaStream) -> Result<()> {
        self.kick();
        // SAFETY: the executable graph is live (owned by self) and the stream belongs to
        // its context; what the graph reads and writes is owned by its captor, which waits
        // for the stream before reusing it.
        unsafe { cudarc::driver::result::graph::launch(self.graph.cu_graph_exec(), stream.cu_stream()) }
            .map_err(|e| KernelError::Cuda(format!("launching a graph: {e}")))
    }

    /// The first failure of the graph's host work since the last call, once the stream
    /// has finished the replays queued (None: all went well).
    pub fn host_error(&self) -> Option<String> {
        // every call's is taken, so that none is reported again after a later replay
        self.calls.iter().filter_map(|c| c.take_error()).reduce(|first, _| first)
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // a replay still running (on any stream: a lane's too) may yet post to a call, and
        // uses the tickets: the worker watches the calls until then
        let _ = self.stream.context().synchronize();
        if !self.calls.is_empty() {
            self.worker.unregister(&self.calls);
        }
    }
}

/// While `stream` is capturing: the nodes the next captured node will depend on, and the
/// edges from them (plain where the capture keeps none). None when it is not capturing.
fn capture_deps(stream: sys::CUstream) -> Result<Option<(Vec<CUgraphNode>, Vec<CUgraphEdgeData>)>> {
    // SAFETY: the arrays the capture query returns stay valid until the next call on the
    // stream; they are copied (n values each) before this returns.
    unsafe {
        let mut status = CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let (mut deps, mut data, mut n): (*const CUgraphNode, *const CUgraphEdgeData, usize) = (std::ptr::null(), std::ptr::null(), 0);
        cu_ok(
            "reading the capture state",
            cuStreamGetCaptureInfo_v3(stream, &mut status, std::ptr::null_mut(), std::ptr::null_mut(), &mut deps, &mut data, &mut n),
        )?;
        if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE || n == 0 || deps.is_null() {
            return Ok(None);
        }
        let nodes = std::slice::from_raw_parts(deps, n).to_vec();
        let plain = CUgraphEdgeData { from_port: 0, to_port: 0, type_: 0, reserved: [0; 5] };
        let edges = if data.is_null() { vec![plain; n] } else { std::slice::from_raw_parts(data, n).to_vec() };
        Ok(Some((nodes, edges)))
    }
}

/// Whether a captured node is a kernel.
fn is_kernel(node: CUgraphNode) -> Result<bool> {
    let mut t = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    // SAFETY: node comes from the capture query of a live capture.
    cu_ok("reading a graph node", unsafe { cuGraphNodeGetType(node, &mut t) })?;
    Ok(t == CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL)
}

/// While `stream` is capturing: gives the kernel node just captured (the one the next node
/// would depend on) `priority`, which graphs instantiated with node priorities run it at.
/// Nothing when the stream is not capturing.
pub(crate) fn prioritize_last(stream: sys::CUstream, priority: i32) -> Result<()> {
    let Some((nodes, _)) = capture_deps(stream)? else { return Ok(()) };
    for node in nodes {
        if is_kernel(node)? {
            // SAFETY: a kernel node of the live capture; the attribute value is a plain
            // int in a zeroed union.
            unsafe {
                let mut v: sys::CUkernelNodeAttrValue = std::mem::zeroed();
                v.priority = priority;
                cu_ok(
                    "setting a kernel's priority",
                    sys::cuGraphKernelNodeSetAttribute(node, sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY, &v),
                )?;
            }
        }
    }
    Ok(())
}

/// While `stream` is capturing: makes the edges from the kernel nodes the next captured node
/// will depend on programmatic (the next node must be one of mxr's kernels). Nothing when
/// the stream is not capturing.
pub(super) fn programmatic_next(stream: sys::CUstream) -> Result<()> {
    let Some((mut nodes, mut edges)) = capture_deps(stream)? else { return Ok(()) };
    let mut any = false;
    for (node, e) in nodes.iter().zip(edges.iter_mut()) {
        if is_kernel(*node)? && e.type_ == 0 {
            e.from_port = sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8;
            e.type_ = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
            any = true;
        }
    }
    if any {
        // SAFETY: nodes and edges are arrays of the same length n, alive for the call.
        cu_ok("setting programmatic capture dependencies", unsafe {
            cuStreamUpdateCaptureDependencies_v2(
                stream,
                nodes.as_mut_ptr(),
                edges.as_ptr(),
                nodes.len(),
                sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES as u32,
            )
        })?;
    }
    Ok(())
}
