//! Lightning attention launchers (kernels/cuda/lightning.cu): the f32 recurrence (decode,
//! and prefill where exact values are wanted) and the chunked tensor-core prefill.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::ops::{int, launch, launch_on, need};
use super::{drv, Gpu, Result, Source};
use crate::KernelError;

/// State columns per block of `lightning_chunked` (LW in lightning.cu; 64 tokens per
/// chunk), and the shared memory it takes: bf16 tiles (q and k rows of 128 + 8, v and
/// scaled v rows of LW + 8, the state's 128 rows of LW + 8) and the next chunk's f32 q, k
/// and v columns.
const CHUNK_COLS: usize = 64;
const CHUNK_SMEM: usize =
    (2 * 64 * (128 + 8) + 2 * 64 * (CHUNK_COLS + 8) + 128 * (CHUNK_COLS + 8)) * 2 + (2 * 64 * 128 + 64 * CHUNK_COLS) * 4;

/// Checks the lengths [qkv, state, decay, out] against (n_tokens, n_heads, hd).
fn check_shapes(op: &'static str, [qkv, state, decay, out]: [usize; 4], (n_tokens, n_heads, hd): (usize, usize, usize)) -> Result<()> {
    if hd == 0 || hd > 128 {
        return Err(KernelError::Shape(format!("{op}: head_dim {hd} (the GPU kernels take 1 to 128)")));
    }
    need(op, "qkv", n_tokens * n_heads * 3 * hd, qkv)?;
    need(op, "state", n_heads * hd * hd, state)?;
    need(op, "decay", n_heads, decay)?;
    need(op, "out", n_tokens * n_heads * hd, out)
}

impl Gpu {
    /// Lightning attention over n_tokens: qkv [n, n_heads * 3 * hd] (`silu`: SiLU applied
    /// to q, k and v as they are read, the model's order), state [n_heads, hd, hd] updated,
    /// decay [n_heads] (λ = e^{-s}), out [n, n_heads * hd]. The recurrence token by token in
    /// f32, the state read and written once.
    pub fn lightning(
        &self,
        qkv: &CudaView<'_, f32>,
        state: &mut CudaSlice<f32>,
        decay: &CudaSlice<f32>,
        out: &mut CudaViewMut<'_, f32>,
        (n_tokens, n_heads, hd): (usize, usize, usize),
        silu: bool,
    ) -> Result<()> {
        check_shapes("lightning", [qkv.len(), state.len(), decay.len(), out.len()], (n_tokens, n_heads, hd))?;
        let name = match hd {
            1..=16 => "lightning_16",
            17..=32 => "lightning_32",
            33..=64 => "lightning_64",
            _ => "lightning_128",
        };
        if n_tokens == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig { grid_dim: (hd.div_ceil(8) as u32, n_heads as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let (n, h, d, act) = (int("lightning", n_tokens)?, n_heads as i32, hd as i32, i32::from(silu));
        launch!(self, Source::Lightning, name, cfg, qkv, state, decay, out, &n, &h, &d, &act)
    }

    /// [`Gpu::lightning`] in chunks of 64 tokens on tensor cores (for prefill): q, k, v and
    /// the intra-chunk scores rounded to bf16, f32 accumulation, the state kept in f32.
    pub fn lightning_chunked(
        &self,
        qkv: &CudaView<'_, f32>,
        state: &mut CudaSlice<f32>,
        decay: &CudaSlice<f32>,
        out: &mut CudaViewMut<'_, f32>,
        (n_tokens, n_heads, hd): (usize, usize, usize),
        silu: bool,
    ) -> Result<()> {
        check_shapes("lightning_chunked", [qkv.len(), state.len(), decay.len(), out.len()], (n_tokens, n_heads, hd))?;
        if n_tokens == 0 {
            return Ok(());
        }
        let name = "lightning_chunked";
        self.function(Source::Lightning, name)?
            .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, CHUNK_SMEM as i32)
            .map_err(|e| drv(name, e))?;
        let cfg = LaunchConfig {
            grid_dim: (hd.div_ceil(CHUNK_COLS) as u32, n_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: CHUNK_SMEM as u32,
        };
        let (n, h, d, act) = (int(name, n_tokens)?, n_heads as i32, hd as i32, i32::from(silu));
        launch!(self, Source::Lightning, name, cfg, qkv, state, decay, out, &n, &h, &d, &act)
    }
}
