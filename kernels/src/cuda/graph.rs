//! Captured CUDA graphs, with programmatic dependent launch between mxr's kernels.
//!
//! A captured graph orders each kernel after the one before it: the next kernel's blocks
//! start only once the previous kernel's last block has finished, and the GPU idles at
//! every step of a decode (about a hundred kernels per token). With programmatic edges the
//! next kernel's blocks may start while the previous one drains; every mxr kernel begins
//! with `PDL_ENTRY()` (common.cuh), whose griddepcontrol.wait holds it until the kernel it
//! depends on has completed and its writes are visible. Only edges into mxr's own kernels
//! are changed (a cuBLAS kernel has no such wait).

use std::collections::HashSet;

use cudarc::driver::sys::{
    self, cuGraphAddDependencies_v2, cuGraphExecDestroy, cuGraphGetEdges_v2, cuGraphInstantiateWithFlags, cuGraphKernelNodeGetParams_v2,
    cuGraphLaunch, cuGraphNodeGetType, cuGraphRemoveDependencies_v2, CUgraphEdgeData, CUgraphNode, CUgraphNodeType, CUresult,
};
use cudarc::driver::CudaGraph;

use crate::KernelError;

type Result<T> = std::result::Result<T, KernelError>;

fn ok(what: &str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Cuda(format!("{what}: {r:?}")))
    }
}

/// A captured sequence of GPU work, replayed as one launch (boxed: sessions hold one).
pub struct Graph(Box<Inner>);

struct Inner {
    graph: CudaGraph,
    /// The graph re-instantiated with programmatic edges (None: replay `graph` as captured).
    pdl: Option<sys::CUgraphExec>,
    stream: sys::CUstream,
}

impl Graph {
    pub(super) fn new(graph: CudaGraph, stream: sys::CUstream) -> Graph {
        Graph(Box::new(Inner { graph, pdl: None, stream }))
    }

    /// Makes every kernel-to-kernel edge into one of `ours` (CUfunction handles of mxr's
    /// kernels) programmatic, and instantiates the graph so. Returns the number of edges
    /// changed.
    pub(super) fn programmatic(&mut self, ours: &HashSet<usize>) -> Result<usize> {
        let me = &mut *self.0;
        let g = me.graph.cu_graph();
        // SAFETY: `g` is the live graph `self.graph` owns; every array passed holds the
        // number of elements the call is told, and nodes come from the graph itself.
        unsafe {
            let mut n = 0usize;
            ok("listing graph edges", cuGraphGetEdges_v2(g, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), &mut n))?;
            let mut from = vec![std::ptr::null_mut(); n];
            let mut to = vec![std::ptr::null_mut(); n];
            let mut data = vec![CUgraphEdgeData { from_port: 0, to_port: 0, type_: 0, reserved: [0; 5] }; n];
            ok("listing graph edges", cuGraphGetEdges_v2(g, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut n))?;
            let kernel_of = |node: CUgraphNode| -> Result<Option<usize>> {
                let mut t = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
                ok("reading a graph node", cuGraphNodeGetType(node, &mut t))?;
                if t != CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
                    return Ok(None);
                }
                let mut p = std::mem::MaybeUninit::<sys::CUDA_KERNEL_NODE_PARAMS>::zeroed();
                ok("reading a kernel node", cuGraphKernelNodeGetParams_v2(node, p.as_mut_ptr()))?;
                Ok(Some(p.assume_init().func as usize))
            };
            let mut changed = 0;
            for i in 0..n {
                let d = data[i];
                if d.type_ != 0 || kernel_of(from[i])?.is_none() || !kernel_of(to[i])?.is_some_and(|f| ours.contains(&f)) {
                    continue;
                }
                ok("removing a graph edge", cuGraphRemoveDependencies_v2(g, &from[i], &to[i], &d, 1))?;
                let p = CUgraphEdgeData {
                    from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
                    to_port: 0,
                    type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
                    reserved: [0; 5],
                };
                ok("adding a programmatic graph edge", cuGraphAddDependencies_v2(g, &from[i], &to[i], &p, 1))?;
                changed += 1;
            }
            let mut exec = std::ptr::null_mut();
            ok("instantiating a graph with programmatic edges", cuGraphInstantiateWithFlags(&mut exec, g, 0))?;
            if let Some(old) = me.pdl.replace(exec) {
                cuGraphExecDestroy(old);
            }
            Ok(changed)
        }
    }

    pub fn launch(&self) -> Result<()> {
        match self.0.pdl {
            // SAFETY: a live executable graph, launched on the stream it was captured from.
            Some(exec) => ok("launching a graph", unsafe { cuGraphLaunch(exec, self.0.stream) }),
            None => self.0.graph.launch().map_err(|e| KernelError::Cuda(format!("launching a graph: {e}"))),
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if let Some(exec) = self.0.pdl.take() {
            // SAFETY: instantiated by `programmatic` and not used after this.
            unsafe {
                cuGraphExecDestroy(exec);
            }
        }
    }
}
