//! Checks on a forward pass's results on the GPU: where the first NaN or infinity in the
//! decode step's logits is, found beside their copy to the host (kernels/cuda/check.cu),
//! so that the host need not read all 800 KB of them once more to look (~40 us a token on
//! the H200's host, most of its own time in a decode step; docs/PERF.md, twelfth session).

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::ops::{int, launch_on, need};
use super::{drv, CudaView, CudaViewMut, Gpu, Result, Source};

impl Gpu {
    /// out[0] = the index of the first NaN or infinity in x, or -1 when x has none.
    pub fn first_non_finite(&self, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, i32>) -> Result<()> {
        self.first_non_finite_on(&self.stream, x, out)
    }

    /// [`Gpu::first_non_finite`] on the side stream (order it with [`Gpu::side_after_main`]
    /// and [`Gpu::main_after_side`]).
    pub fn first_non_finite_side(&self, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, i32>) -> Result<()> {
        self.first_non_finite_on(&self.side, x, out)
    }

    fn first_non_finite_on(&self, stream: &Arc<CudaStream>, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, i32>) -> Result<()> {
        need("first_non_finite", "out", 1, out.len())?;
        let n = int("first_non_finite", x.len())?;
        // one block: the answer needs no second kernel or atomics to reset between replays
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        launch_on!(self, stream, Source::Check, "first_non_finite_f32", cfg, x, &n, out)
    }
}
