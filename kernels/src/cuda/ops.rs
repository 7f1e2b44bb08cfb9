//! One typed launcher per kernel: shapes are checked here, then the kernel is queued on the
//! GPU's stream. Nothing waits; [`Gpu::sync`] or a download does.

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use mxr_quant::QType;

use super::{drv, Gpu, GpuMatrix, Part, Result, Source};
use crate::KernelError;

pub(super) fn need(op: &'static str, what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if actual < expected {
        return Err(KernelError::Length { op, what, expected, actual });
    }
    Ok(())
}

pub(super) fn int(op: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::Shape(format!("{op}: {v} does not fit the kernel's 32-bit index")))
}

pub(super) fn grid1(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// Activations quantized for the int8 matrix-vector kernels: values [rows, cols] and one
/// scale per 32 values.
#[derive(Clone)]
pub struct QAct {
    pub q: CudaSlice<i8>,
    pub d: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// What [`Gpu::rmsnorm_fused`] adds to x before the norm: alpha x + beta a, where a is
/// `a` [rows, width] itself, or with `combine` = (weights [rows, k], k) the weighted sum of
/// `a`'s k rows per row of x (`a`: [rows k, width], the MoE's expert outputs).
pub struct Residual<'a> {
    pub a: CudaView<'a, f32>,
    pub alpha: f32,
    pub beta: f32,
    pub combine: Option<(CudaView<'a, f32>, usize)>,
}

/// What [`Gpu::moe_norm_route`] makes: the normalised row, its int8 form (if asked for),
/// and the router's choices [k] with their renormalised weights.
pub struct NormRouted {
    pub x: CudaSlice<f32>,
    pub act: Option<QAct>,
    pub ids: CudaSlice<i32>,
    pub weights: CudaSlice<f32>,
}

/// A fused norm's residual as its kernel takes it ([`Gpu::residual_args`]).
struct ResidualArgs {
    k: i32,
    a: u64,
    cw: u64,
    alpha: f32,
    beta: f32,
}

/// Tokens [`Gpu::route_fused`] takes (its tickets: one per token).
pub const ROUTE_FUSED_TOKENS: usize = 64;
/// [`Gpu`]'s ticket buffer (zeros between kernels; see common.cuh's `arrived_last`): one
/// per token of [`Gpu::route_fused`].
pub(super) const TICKETS: usize = ROUTE_FUSED_TOKENS;

/// The checks of a launch of two quantized products over one int8 input (`matvec_pair`):
/// matrices of one quantized type and width, the input's rows for `pairs`
/// pairs at `x_div` pairs per row, the outputs' lengths, and ids (`ids_len`) for stacks.
#[allow(clippy::too_many_arguments)]
fn check_pair(
    op: &'static str,
    [w0, w1]: [&GpuMatrix; 2],
    ids_len: Option<usize>,
    act: &QAct,
    x_div: usize,
    pairs: usize,
    [y0, y1]: [usize; 2],
    [n0, n1]: [usize; 2],
) -> Result<()> {
    let cols = w0.cols;
    if w0.qtype != w1.qtype || !quantized(w0.qtype) || w1.cols != cols {
        return Err(KernelError::Shape(format!(
            "{op}: {} {}x{} and {} {}x{} are not two quantized matrices of one type and width",
            w0.qtype, w0.rows, w0.cols, w1.qtype, w1.rows, w1.cols
        )));
    }
    let n_rows = pairs.div_ceil(x_div.max(1));
    if act.rows < n_rows || act.cols != cols {
        return Err(KernelError::Shape(format!("{op}: quantized input is {}x{}, the products need {n_rows}x{cols}", act.rows, act.cols)));
    }
    if n0 > w0.rows || n1 > w1.rows {
        return Err(KernelError::Shape(format!("{op}: rows 0..{n0} and 0..{n1} of matrices of {} and {} rows", w0.rows, w1.rows)));
    }
    need(op, "y0", pairs * n0, y0)?;
    need(op, "y1", pairs * n1, y1)?;
    match ids_len {
        Some(n) => need(op, "ids", pairs, n),
        None if w0.n_experts != 1 || w1.n_experts != 1 => Err(KernelError::Shape(format!("{op}: a stack of experts needs expert ids"))),
        None => Ok(()),
    }
}

/// The checks of the GPU router's top-k (moe.cu's limits: k <= 16, experts <= 256) and the
/// lengths of its outputs: ids and weights [n_tokens, k], counts [n_experts].
fn check_route(op: &'static str, n_tokens: usize, n_experts: usize, k: usize, [ids, weights, counts]: [usize; 3]) -> Result<()> {
    if k == 0 || k > 16 || k > n_experts || n_experts > 256 {
        return Err(KernelError::Shape(format!("{op}: top-{k} of {n_experts} experts (the GPU router takes k <= 16, experts <= 256)")));
    }
    need(op, "ids", n_tokens * k, ids)?;
    need(op, "weights", n_tokens * k, weights)?;
    need(op, "counts", n_experts, counts)
}

/// Whether the type's kernels take int8 activations.
pub fn quantized(q: QType) -> bool {
    matches!(q, QType::Q8_0 | QType::Q4_0 | QType::Q4K | QType::Q6K)
}

/// Suffix of the per-type kernels.
fn suffix(q: QType) -> Result<&'static str> {
    Ok(match q {
        QType::Q8_0 => "q8_0",
        QType::Q4K => "q4_k",
        QType::Q6K => "q6_k",
        QType::Q4_0 => "q4_0",
        QType::BF16 => "bf16",
        QType::F16 => "f16",
        QType::F32 => "f32",
        _ => return Err(KernelError::Unsupported { what: "GPU kernel", qtype: q }),
    })
}

macro_rules! per_type {
    ($prefix:literal, $q:expr) => {
        match suffix($q)? {
            "q8_0" => concat!($prefix, "q8_0"),
            "q4_k" => concat!($prefix, "q4_k"),
            "q6_k" => concat!($prefix, "q6_k"),
            "q4_0" => concat!($prefix, "q4_0"),
            "bf16" => concat!($prefix, "bf16"),
            "f16" => concat!($prefix, "f16"),
            _ => concat!($prefix, "f32"),
        }
    };
}

macro_rules! launch {
    ($gpu:expr, $src:expr, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {
        launch_on!($gpu, $gpu.stream, $src, $name, $cfg $(, $arg)*)
    };
}

/// `launch!` on a given stream of the GPU.
macro_rules! launch_on {
    ($gpu:expr, $stream:expr, $src:expr, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let name: &'static str = $name;
        let cfg: LaunchConfig = $cfg;
        let f = $gpu.function($src, name)?;
        // only while capturing a graph: eager launches need no capture query
        if $gpu.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            if $gpu.tuning.pdl {
                $crate::cuda::graph::programmatic_next($stream.cu_stream())?;
            }
            if let Some(t) = &$gpu.timeline {
                t.captured(name, cfg.grid_dim)?;
            }
        }
        #[allow(unused_mut)]
        let mut b = $stream.launch_builder(&f);
        $(b.arg($arg);)*
        // SAFETY: the launcher checked every buffer against the sizes the kernel touches.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| drv(name, e))?;
        if $gpu.tuning.node_priority && $gpu.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            $crate::cuda::graph::prioritize_last($stream.cu_stream(), $gpu.captured_priority())?;
        }
        Ok::<(), $crate::KernelError>(())
    }};
}
pub(super) use launch;
pub(super) use launch_on;

/// `launch!` of a kernel whose argument after `$before` is an optional table of expert ids
/// (`Option<&CudaSlice<i32>>`): the table, or a null pointer.
macro_rules! launch_ids {
    ($gpu:expr, $src:expr, $name:expr, $cfg:expr, [$($before:expr),*], $ids:expr, [$($after:expr),*]) => {
        match $ids {
            Some(ids) => launch!($gpu, $src, $name, $cfg $(, $before)*, ids $(, $after)*),
            None => launch!($gpu, $src, $name, $cfg $(, $before)*, &0u64 $(, $after)*),
        }
    };
}

impl Gpu {
    /// y[p, :] = W_{e(p)} · x[p / x_div, :] for p < pairs; e(p) = ids[p], or the only
    /// matrix when `ids` is None.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec(
        &self,
        w: &GpuMatrix,
        ids: Option<&CudaSlice<i32>>,
        x: &CudaView<'_, f32>,
        x_div: usize,
        pairs: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.matvec_with(w, ids, x, None, x_div, pairs, y)
    }

    /// [`Gpu::matvec`] with the int8 form of `x` already made by [`Gpu::quantize_act`]
    /// (for several products of one input); `xq` is ignored for float weights.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_with(
        &self,
        w: &GpuMatrix,
        ids: Option<&CudaSlice<i32>>,
        x: &CudaView<'_, f32>,
        xq: Option<&QAct>,
        x_div: usize,
        pairs: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.matvec_part(w, Part::whole(w), ids, x, xq, x_div, pairs, y)
    }

    /// [`Gpu::matvec_with`] over `part` of each matrix: y[p, :part.rows] = W_{e(p)}[..rows,
    /// ..cols] · x[p / x_div, :part.cols]. x's rows are part.cols wide and y's part.rows
    /// (a cold expert's share of its hidden units that the GPU reads in place: gate and up
    /// rows, the down projection's columns). A part narrower than the matrix takes whole
    /// blocks of 256 columns.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_part(
        &self,
        w: &GpuMatrix,
        part: Part,
        ids: Option<&CudaSlice<i32>>,
        x: &CudaView<'_, f32>,
        xq: Option<&QAct>,
        x_div: usize,
        pairs: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        part.check("matvec", w)?;
        let (rows, cols) = (part.rows, part.cols);
        need("matvec", "x", pairs.div_ceil(x_div.max(1)) * cols, x.len())?;
        need("matvec", "y", pairs * rows, y.len())?;
        if let Some(ids) = ids {
            need("matvec", "ids", pairs, ids.len())?;
        } else if w.n_experts != 1 {
            return Err(KernelError::Shape("matvec: a stack of experts needs expert ids".into()));
        }
        if pairs == 0 || rows == 0 {
            return Ok(());
        }
        // Float rows that are not whole 16-byte loads take the one-value-at-a-time kernel
        // (the layout's rows: a part's rows start where the matrix's do).
        let scalar = match w.qtype {
            QType::BF16 | QType::F16 => !w.cols.is_multiple_of(8),
            QType::F32 => !w.cols.is_multiple_of(4),
            _ => false,
        };
        let (warps, per_warp) = self.tuning.matvec_shape(w.qtype);
        let rows_per_block = if scalar { warps } else { warps * per_warp };
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(rows_per_block), int("matvec", pairs)? as u32, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: self.tuning.matvec_stage_bytes(w.qtype, cols),
        };
        // the layout's rows and columns (r, c), the part's (n_r, n_c)
        let (stride, r, c, xd) = (w.stride as i64, int("matvec", w.rows)?, int("matvec", w.cols)?, int("matvec", x_div.max(1))?);
        let (n_r, n_c) = (int("matvec", rows)?, int("matvec", cols)?);
        let name = match (scalar, w.qtype) {
            (true, QType::BF16) => "matvec_bf16_scalar",
            (true, QType::F16) => "matvec_f16_scalar",
            (true, _) => "matvec_f32_scalar",
            _ => per_type!("matvec_", w.qtype),
        };
        if !quantized(w.qtype) && !scalar && w.rows < 1024 {
            // Few rows (the router): a block per row, so the row is read by 256 threads
            // at once instead of one warp's long loop.
            let name = match w.qtype {
                QType::BF16 => "matvec_wide_bf16",
                QType::F16 => "matvec_wide_f16",
                _ => "matvec_wide_f32",
            };
            let cfg =
                LaunchConfig { grid_dim: (rows as u32, int("matvec", pairs)? as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            return launch_ids!(self, Source::Matvec, name, cfg, [&*w.buf, &stride], ids, [&r, &c, x, &xd, y, &n_r, &n_c]);
        }
        if !quantized(w.qtype) {
            return launch_ids!(self, Source::Matvec, name, cfg, [&*w.buf, &stride], ids, [&r, &c, x, &xd, y, &n_r, &n_c]);
        }
        // Quantized weights multiply int8 activations: quantize the input rows first
        // (unless the caller did).
        let n_rows = pairs.div_ceil(x_div.max(1));
        let made;
        let act = match xq {
            Some(a) if a.rows >= n_rows && a.cols == cols => a,
            Some(a) => {
                return Err(KernelError::Shape(format!(
                    "matvec: quantized input is {}x{}, the product needs {n_rows}x{cols}",
                    a.rows, a.cols
                )))
            }
            None => {
                made = self.quantize_act(&x.slice(..n_rows * cols), n_rows, cols)?;
                &made
            }
        };
        let n_bx = cfg.grid_dim.0 as i32;
        let cfg = LaunchConfig { grid_dim: (self.row_blocks(cfg.grid_dim.0, cfg.grid_dim.1), cfg.grid_dim.1, 1), ..cfg };
        launch_ids!(self, Source::Matvec, name, cfg, [&*w.buf, &stride], ids, [&r, &c, &act.q, &act.d, &xd, y, &n_r, &n_c, &n_bx])
    }

    /// Rows `rows` of a float matrix's product with one input row x, into y (rows.len()
    /// values), by the kernel [`Gpu::matvec`] runs for the whole matrix: each row's value is
    /// the same bits (the decode step's lm_head in pieces). A single float matrix of at
    /// least 1,024 rows of whole 16-byte loads, and `rows` starting on a block's first row.
    pub fn matvec_rows(
        &self,
        w: &GpuMatrix,
        rows: std::ops::Range<usize>,
        x: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let cols = w.cols;
        let (elem, whole) = match w.qtype {
            QType::BF16 | QType::F16 => (2, cols.is_multiple_of(8)),
            QType::F32 => (4, cols.is_multiple_of(4)),
            q => return Err(KernelError::Shape(format!("matvec_rows: {q} weights (float weights only)"))),
        };
        let (warps, per_warp) = self.tuning.matvec_shape(w.qtype);
        let rows_per_block = (warps * per_warp) as usize;
        if !whole
            || w.n_experts != 1
            || w.rows < 1024
            || rows.start >= rows.end
            || rows.end > w.rows
            || !rows.start.is_multiple_of(rows_per_block)
        {
            return Err(KernelError::Shape(format!(
                "matvec_rows: rows {rows:?} of a {}x{cols} {} matrix ({} experts; needs one matrix of at least 1024 rows of whole 16-byte loads, starting on a multiple of {rows_per_block})",
                w.rows, w.qtype, w.n_experts
            )));
        }
        need("matvec_rows", "x", cols, x.len())?;
        if y.len() != rows.len() {
            // y is exactly the range's rows: a longer one would leave rows unwritten
            return Err(KernelError::Length { op: "matvec_rows", what: "y", expected: rows.len(), actual: y.len() });
        }
        let n = rows.len();
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(rows_per_block as u32), 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: self.tuning.matvec_stage_bytes(w.qtype, cols),
        };
        let wv = w.buf.slice(rows.start * cols * elem..);
        let (stride, r, c, xd, null) = (w.stride as i64, int("matvec_rows", n)?, int("matvec_rows", cols)?, 1i32, 0u64);
        let name = per_type!("matvec_", w.qtype);
        launch!(self, Source::Matvec, name, cfg, &wv, &stride, &null, &r, &c, x, &xd, y, &r, &c)
    }

    /// y0 = W0 · x and y1 = W1 · x as [`Gpu::matvec_with`], in one launch: two quantized
    /// matrices of one type and width (each a single matrix, or stacks picked by `ids`) over
    /// the same int8 input `act`. Bit for bit what two `matvec_with` calls give.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_pair(
        &self,
        [w0, w1]: [&GpuMatrix; 2],
        ids: Option<&CudaSlice<i32>>,
        act: &QAct,
        x_div: usize,
        pairs: usize,
        [y0, y1]: [&mut CudaViewMut<'_, f32>; 2],
    ) -> Result<()> {
        self.matvec_pair_rows([w0, w1], [w0.rows, w1.rows], ids, act, x_div, pairs, [y0, y1])
    }

    /// [`Gpu::matvec_pair`] over rows 0..n0 of W0 and 0..n1 of W1 (all their columns):
    /// y0's rows are n0 wide, y1's n1 (a cold expert's share of its hidden units, gate and
    /// up, as [`Gpu::matvec_part`]).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_pair_rows(
        &self,
        [w0, w1]: [&GpuMatrix; 2],
        [n0, n1]: [usize; 2],
        ids: Option<&CudaSlice<i32>>,
        act: &QAct,
        x_div: usize,
        pairs: usize,
        [y0, y1]: [&mut CudaViewMut<'_, f32>; 2],
    ) -> Result<()> {
        check_pair("matvec_pair", [w0, w1], ids.map(|i| i.len()), act, x_div, pairs, [y0.len(), y1.len()], [n0, n1])?;
        let cols = w0.cols;
        if pairs == 0 {
            return Ok(());
        }
        let (warps, per_warp) = self.tuning.matvec_shape(w0.qtype);
        let n_bx = int("matvec_pair", n0.max(n1).div_ceil((warps * per_warp) as usize))?;
        let pairs_y = int("matvec_pair", pairs)? as u32;
        let cfg = LaunchConfig {
            grid_dim: (self.row_blocks(n_bx as u32, 2 * pairs_y), pairs_y, 2),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: self.tuning.matvec_stage_bytes(w0.qtype, cols),
        };
        let (s0, s1) = (w0.stride as i64, w1.stride as i64);
        let (r0, r1, c, xd) =
            (int("matvec_pair", w0.rows)?, int("matvec_pair", w1.rows)?, int("matvec_pair", cols)?, int("matvec_pair", x_div.max(1))?);
        let (p0, p1) = (int("matvec_pair", n0)?, int("matvec_pair", n1)?);
        let name = per_type!("matvec2_", w0.qtype);
        launch_ids!(
            self,
            Source::Matvec,
            name,
            cfg,
            [&*w0.buf, &*w1.buf, &s0, &s1],
            ids,
            [&r0, &r1, &c, &act.q, &act.d, &xd, y0, y1, &p0, &p1, &n_bx]
        )
    }

    /// x [n, cols] (cols a multiple of 32) -> int8 values [n, cols] and one scale per
    /// 32 values, as ggml's Q8_0 activations (dequant.cu, `quantize_act`).
    pub fn quantize_act(&self, x: &CudaView<'_, f32>, n: usize, cols: usize) -> Result<QAct> {
        if !cols.is_multiple_of(32) {
            return Err(KernelError::Shape(format!("quantize_act: {cols} columns are not blocks of 32")));
        }
        need("quantize_act", "x", n * cols, x.len())?;
        let blocks = n * cols / 32;
        let mut q = self.alloc::<i8>(n * cols)?;
        let mut d = self.alloc::<f32>(blocks)?;
        let nb = blocks as i64;
        launch!(self, Source::Dequant, "quantize_act", grid1(blocks * 32, 256), x, &nb, &mut q, &mut d)?;
        Ok(QAct { q, d, rows: n, cols })
    }

    /// [`Gpu::quantize_act`] of silu(g) * u ([`Gpu::swiglu`]'s output), in one kernel: the
    /// same int8 values and scales as the two kernels give.
    pub fn swiglu_quantize(&self, g: &CudaView<'_, f32>, u: &CudaView<'_, f32>, n: usize, cols: usize) -> Result<QAct> {
        if !cols.is_multiple_of(32) {
            return Err(KernelError::Shape(format!("swiglu_quantize: {cols} columns are not blocks of 32")));
        }
        need("swiglu_quantize", "g", n * cols, g.len())?;
        need("swiglu_quantize", "u", n * cols, u.len())?;
        let blocks = n * cols / 32;
        let mut q = self.alloc::<i8>(n * cols)?;
        let mut d = self.alloc::<f32>(blocks)?;
        let nb = blocks as i64;
        launch!(self, Source::Dequant, "swiglu_quantize", grid1(blocks * 32, 256), g, u, &nb, &mut q, &mut d)?;
        Ok(QAct { q, d, rows: n, cols })
    }

    /// out [rows, cols] bf16 = expert `e` of `w`.
    pub fn to_bf16(&self, w: &GpuMatrix, e: usize, out: &mut CudaViewMut<'_, u16>) -> Result<()> {
        self.to_bf16_in(&self.stream, w, e, out)
    }

    /// [`Gpu::to_bf16`] on the side stream: it overlaps the main stream's work. The caller
    /// orders it with events: [`Gpu::side_wait`] before (the output buffer is free), and
    /// [`Gpu::record_side`] + [`Gpu::main_wait`] before the main stream reads `out`.
    pub fn to_bf16_side(&self, w: &GpuMatrix, e: usize, out: &mut CudaViewMut<'_, u16>) -> Result<()> {
        self.to_bf16_in(&self.side, w, e, out)
    }

    fn to_bf16_in(&self, stream: &CudaStream, w: &GpuMatrix, e: usize, out: &mut CudaViewMut<'_, u16>) -> Result<()> {
        need("to_bf16", "out", w.rows * w.cols, out.len())?;
        if e >= w.n_experts {
            return Err(KernelError::Shape(format!("to_bf16: expert {e} of {}", w.n_experts)));
        }
        let (r, c) = (int("to_bf16", w.rows)?, int("to_bf16", w.cols)?);
        let src = w.expert(e);
        if !w.cols.is_multiple_of(8) {
            let name = match w.qtype {
                QType::BF16 => "to_bf16_scalar_bf16",
                QType::F16 => "to_bf16_scalar_f16",
                _ => "to_bf16_scalar_f32",
            };
            return launch_on!(self, stream, Source::Dequant, name, grid1(w.rows * w.cols, 256), &src, &r, &c, out);
        }
        launch_on!(self, stream, Source::Dequant, per_type!("to_bf16_", w.qtype), grid1(w.rows * w.cols / 8, 256), &src, &r, &c, out)
    }

    /// out[t, :] = row ids[t] of `w` as f32 (the embedding lookup), t < n.
    pub fn gather_embed(&self, w: &GpuMatrix, ids: &CudaSlice<i32>, n: usize, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
        need("gather_embed", "ids", n, ids.len())?;
        need("gather_embed", "out", n * w.cols, out.len())?;
        let per_thread = if w.cols.is_multiple_of(8) { 8 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: ((w.cols as u32).div_ceil(128 * per_thread).max(1), int("gather_embed", n)? as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r, c) = (int("gather_embed", w.rows)?, int("gather_embed", w.cols)?);
        if per_thread == 1 {
            let name = match w.qtype {
                QType::BF16 => "gather_rows_scalar_bf16",
                QType::F16 => "gather_rows_scalar_f16",
                _ => "gather_rows_scalar_f32",
            };
            return launch!(self, Source::Dequant, name, cfg, &*w.buf, &r, &c, ids, out);
        }
        launch!(self, Source::Dequant, per_type!("gather_rows_", w.qtype), cfg, &*w.buf, &r, &c, ids, out)
    }

    pub fn f32_to_bf16(&self, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, u16>) -> Result<()> {
        need("f32_to_bf16", "out", x.len(), out.len())?;
        let n = x.len() as i64;
        launch!(self, Source::Dequant, "f32_to_bf16_n", grid1(x.len(), 256), x, &n, out)
    }

    /// RMSNorm of every `w.len()`-wide row of x, in place.
    pub fn rmsnorm(&self, x: &mut CudaViewMut<'_, f32>, w: &CudaSlice<f32>, eps: f32) -> Result<()> {
        let width = w.len();
        if width == 0 || x.len() % width != 0 {
            return Err(KernelError::Shape(format!("rmsnorm: {} values are not rows of {width}", x.len())));
        }
        let rows = x.len() / width;
        // Few rows (decode): wide blocks, so each thread has one or two loads to wait for.
        let threads = if rows < 64 { 1024 } else { 256 };
        let cfg = LaunchConfig { grid_dim: (int("rmsnorm", rows)? as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let wd = int("rmsnorm", width)?;
        launch!(self, Source::Norm, "rmsnorm", cfg, x, w, &wd, &eps)
    }

    /// x = rmsnorm(alpha x + beta a) * w row by row, in place (`residual`; None:
    /// rmsnorm(x) * w, as [`Gpu::rmsnorm`]), times sigmoid(gate) if given (as
    /// [`Gpu::sigmoid_gate`]), in one kernel; with `quantize` also the result's int8 form, as
    /// [`Gpu::quantize_act`] makes it. A residual with `combine` adds the MoE's expert
    /// outputs exactly as [`Gpu::moe_combine`] sums them.
    pub fn rmsnorm_fused(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        residual: Option<&Residual<'_>>,
        w: &CudaSlice<f32>,
        gate: Option<&CudaView<'_, f32>>,
        eps: f32,
        quantize: bool,
    ) -> Result<Option<QAct>> {
        let width = w.len();
        if width == 0 || x.len() % width != 0 {
            return Err(KernelError::Shape(format!("rmsnorm_fused: {} values are not rows of {width}", x.len())));
        }
        if quantize && !width.is_multiple_of(32) {
            return Err(KernelError::Shape(format!("rmsnorm_fused: {width} columns are not blocks of 32")));
        }
        let rows = x.len() / width;
        let res = self.residual_args("rmsnorm_fused", residual, rows, width)?;
        if let Some(g) = &gate {
            need("rmsnorm_fused", "gate", x.len(), g.len())?;
        }
        let threads = if rows < 64 { 1024 } else { 256 };
        let cfg = LaunchConfig { grid_dim: (int("rmsnorm_fused", rows)? as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let wd = int("rmsnorm_fused", width)?;
        let (act, q, d) = self.norm_act(quantize, rows, width)?;
        // an absent gate is a null pointer
        let gp = gate.as_ref().map_or(0, |g| g.device_ptr(&self.stream).0);
        let ResidualArgs { k, a, cw, alpha, beta } = res;
        launch!(self, Source::Norm, "rmsnorm_fused", cfg, x, &a, &cw, &k, &alpha, &beta, w, &gp, &wd, &eps, &q, &d)?;
        Ok(act)
    }

    /// A fused norm's residual for `rows` rows of `width`, checked: how many expert outputs
    /// it combines per row (1 for a plain one), its device pointers and its scales (absent:
    /// null pointers, alpha 1, beta 0).
    fn residual_args(&self, op: &'static str, residual: Option<&Residual<'_>>, rows: usize, width: usize) -> Result<ResidualArgs> {
        let k = match residual.and_then(|r| r.combine.as_ref()) {
            Some((cw, k)) => {
                if *k == 0 {
                    return Err(KernelError::Shape(format!("{op}: combining 0 expert outputs per row")));
                }
                need(op, "combine weights", rows * k, cw.len())?;
                *k
            }
            None => 1,
        };
        if let Some(r) = residual {
            need(op, "residual", rows * width * k, r.a.len())?;
        }
        Ok(ResidualArgs {
            k: int(op, k)?,
            a: residual.map_or(0, |r| r.a.device_ptr(&self.stream).0),
            cw: residual.and_then(|r| r.combine.as_ref()).map_or(0, |(cw, _)| cw.device_ptr(&self.stream).0),
            alpha: residual.map_or(1.0, |r| r.alpha),
            beta: residual.map_or(0.0, |r| r.beta),
        })
    }

    /// With `quantize`, the int8 form's buffers for `rows` rows of `width` and their device
    /// pointers; else none and null pointers.
    fn norm_act(&self, quantize: bool, rows: usize, width: usize) -> Result<(Option<QAct>, u64, u64)> {
        if !quantize {
            return Ok((None, 0, 0));
        }
        let mut a = QAct { q: self.alloc::<i8>(rows * width)?, d: self.alloc::<f32>(rows * width / 32)?, rows, cols: width };
        let (q, d) = (a.q.device_ptr_mut(&self.stream).0, a.d.device_ptr_mut(&self.stream).0);
        Ok((Some(a), q, d))
    }

    /// The MoE's norm and its router for one token in one kernel (moe.cu's
    /// `moe_norm_route_f32`): x_out = rmsnorm(alpha x + beta a) * w, the same values
    /// [`Gpu::rmsnorm_fused`] makes in place, with its int8 form when `quantize`; then the
    /// top `k` of the router's softmax over x_out into ids and weights, as
    /// [`Gpu::route_fused`] (the logits summed in another order; counts[e] += choices of
    /// e). Ok(None), with nothing queued, where the fusion does not apply: `MXR_FUSE` without 8, more than one row, a
    /// router other than one f32 matrix, or a row the routing blocks cannot share in whole
    /// 32-value blocks (width / 4 / experts a multiple of 8) or hold in registers.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_norm_route(
        &self,
        x: &CudaView<'_, f32>,
        residual: Option<&Residual<'_>>,
        w: &CudaSlice<f32>,
        eps: f32,
        quantize: bool,
        router: &GpuMatrix,
        k: usize,
        counts: &mut CudaSlice<u32>,
    ) -> Result<Option<NormRouted>> {
        const THREADS: usize = 1024;
        let (width, n_experts) = (w.len(), router.rows);
        let fused = super::FUSE_NORM_ROUTE | super::FUSE_ROUTE | super::FUSE_COMBINE;
        let share = (width / 4).checked_div(n_experts).unwrap_or(0);
        if self.tuning.fuse & fused != fused
            || x.len() != width
            || router.qtype != QType::F32
            || router.n_experts != 1
            || router.cols != width
            || !width.is_multiple_of(32)
            || width / 4 > 2 * THREADS
            || share == 0
            || !share.is_multiple_of(8)
            || !(width / 4).is_multiple_of(n_experts)
        {
            return Ok(None);
        }
        check_route("moe_norm_route", 1, n_experts, k, [k, k, counts.len()])?;
        let res = self.residual_args("moe_norm_route", residual, 1, width)?;
        let mut out = self.alloc::<f32>(width)?;
        let (act, q, d) = self.norm_act(quantize, 1, width)?;
        let mut logits = self.alloc::<f32>(n_experts)?;
        let (mut ids, mut weights) = (self.alloc::<i32>(k)?, self.alloc::<f32>(k)?);
        let ResidualArgs { k: kr, a, cw, alpha, beta } = res;
        let cfg = LaunchConfig { grid_dim: (n_experts as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        let (wd, e, kk) = (width as i32, n_experts as i32, k as i32);
        let tickets = self.tickets()?;
        #[rustfmt::skip]
        launch!(self, Source::Moe, "moe_norm_route_f32", cfg, x, &a, &cw, &kr, &alpha, &beta, w, &wd, &eps, &mut out, &q, &d,
            &*router.buf, &e, &kk, &mut logits, &mut ids, &mut weights, counts, &tickets)?;
        Ok(Some(NormRouted { x: out, act, ids, weights }))
    }

    /// A one-thread kernel that only does PDL_ENTRY: with `MXR_TIMELINE=1`, a stamp at the
    /// point where everything queued before it has completed (timeline.rs).
    pub fn timeline_mark(&self) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        launch!(self, Source::Elementwise, "timeline_mark", cfg)
    }

    pub fn silu(&self, x: &mut CudaViewMut<'_, f32>) -> Result<()> {
        let n = x.len() as i64;
        launch!(self, Source::Elementwise, "silu_inplace", grid1(x.len(), 256), x, &n)
    }

    /// o *= sigmoid(g)
    pub fn sigmoid_gate(&self, o: &mut CudaViewMut<'_, f32>, g: &CudaView<'_, f32>) -> Result<()> {
        need("sigmoid_gate", "g", o.len(), g.len())?;
        let n = o.len() as i64;
        launch!(self, Source::Elementwise, "sigmoid_gate", grid1(o.len(), 256), o, g, &n)
    }

    /// out = silu(g) * u
    pub fn swiglu(&self, g: &CudaView<'_, f32>, u: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
        need("swiglu", "u", g.len(), u.len())?;
        need("swiglu", "out", g.len(), out.len())?;
        let n = g.len() as i64;
        launch!(self, Source::Elementwise, "swiglu", grid1(g.len(), 256), g, u, out, &n)
    }

    /// out = bf16(silu(g) * u), rounded as [`Gpu::f32_to_bf16`] rounds.
    pub fn swiglu_bf16(&self, g: &CudaView<'_, f32>, u: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, u16>) -> Result<()> {
        need("swiglu_bf16", "u", g.len(), u.len())?;
        need("swiglu_bf16", "out", g.len(), out.len())?;
        let n = g.len() as i64;
        launch!(self, Source::Elementwise, "swiglu_bf16", grid1(g.len(), 256), g, u, out, &n)
    }

    /// x = alpha x + beta a
    pub fn residual(&self, x: &mut CudaViewMut<'_, f32>, a: &CudaView<'_, f32>, alpha: f32, beta: f32) -> Result<()> {
        need("residual", "a", x.len(), a.len())?;
        let n = x.len() as i64;
        launch!(self, Source::Elementwise, "residual", grid1(x.len(), 256), x, a, &n, &alpha, &beta)
    }

    /// dst[i, :] = src[idx[i] / div, :] for i < n (rows of `width`).
    pub fn gather_rows(
        &self,
        src: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        div: usize,
        n: usize,
        width: usize,
        dst: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.gather_into("gather_rows", src, idx, (div, n, width), dst)
    }

    /// [`Gpu::gather_rows`] into bf16 (rounded as [`Gpu::f32_to_bf16`] rounds).
    pub fn gather_rows_bf16(
        &self,
        src: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        div: usize,
        n: usize,
        width: usize,
        dst: &mut CudaViewMut<'_, u16>,
    ) -> Result<()> {
        self.gather_into("gather_rows_bf16", src, idx, (div, n, width), dst)
    }

    /// The gather kernel `name` (f32 or bf16 rows out): a block row per output row.
    fn gather_into<T: DeviceRepr>(
        &self,
        name: &'static str,
        src: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        (div, n, width): (usize, usize, usize),
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        need(name, "idx", n, idx.len())?;
        need(name, "dst", n * width, dst.len())?;
        if n == 0 {
            return Ok(());
        }
        let cfg =
            LaunchConfig { grid_dim: ((width as u32).div_ceil(256), int(name, n)? as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (d, w) = (int(name, div.max(1))?, int(name, width)?);
        launch!(self, Source::Elementwise, name, cfg, src, idx, &d, &w, dst)
    }

    /// out[i] = table[ids[i]] for every i: ids looked up in a table on the GPU, with no
    /// host round trip. Every id must be below table.len(): the router's ids are below the
    /// expert count, the table's length, by construction (the host checks them later).
    pub fn map_ids(&self, ids: &CudaView<'_, i32>, table: &CudaView<'_, i32>, out: &mut CudaViewMut<'_, i32>) -> Result<()> {
        need("map_ids", "out", ids.len(), out.len())?;
        if ids.is_empty() {
            return Ok(());
        }
        if table.is_empty() {
            return Err(KernelError::Shape("map_ids: an empty table".into()));
        }
        let n = int("map_ids", ids.len())?;
        launch!(self, Source::Elementwise, "map_ids", grid1(ids.len(), 256), ids, table, &n, out)
    }

    /// dst[idx[i], :] = src[i, :] for i < n.
    pub fn scatter_rows(
        &self,
        src: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        n: usize,
        width: usize,
        dst: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        need("scatter_rows", "idx", n, idx.len())?;
        need("scatter_rows", "src", n * width, src.len())?;
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((width as u32).div_ceil(256), int("scatter_rows", n)? as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let w = int("scatter_rows", width)?;
        launch!(self, Source::Elementwise, "scatter_rows", cfg, src, idx, &w, dst)
    }

    /// For one token's choices `ids` (k) with experts in host memory where cold[e] != 0,
    /// every expert at its own place: hot[j] = ids[j] for a resident expert and -1 for a
    /// cold one, cold_at[j] the other way round (the matrix-vector products skip -1).
    pub fn split_places(
        &self,
        ids: &CudaView<'_, i32>,
        cold: &CudaView<'_, i32>,
        hot: &mut CudaViewMut<'_, i32>,
        cold_at: &mut CudaViewMut<'_, i32>,
    ) -> Result<()> {
        need("split_places", "hot", ids.len(), hot.len())?;
        need("split_places", "cold_at", ids.len(), cold_at.len())?;
        if cold.is_empty() {
            return Err(KernelError::Shape("split_places: an empty table".into()));
        }
        let k = int("split_places", ids.len())?;
        launch!(self, Source::Elementwise, "split_places", grid1(ids.len(), 32), ids, cold, &k, hot, cold_at)
    }

    /// y[r, :] = src[rows + r * width..][..width] for each row r < rows whose flag src[r]
    /// is not 0; other rows keep their values. src is a host call's output: `rows` flags,
    /// then rows x width values.
    pub fn take_flagged_rows(&self, src: &CudaView<'_, f32>, rows: usize, width: usize, y: &mut CudaViewMut<'_, f32>) -> Result<()> {
        self.flagged_rows("take_flagged_rows", src, rows, width, false, y)
    }

    /// [`Gpu::take_flagged_rows`] that adds the host's rows to y's (the host's share of a
    /// cold expert's hidden units to the GPU's).
    pub fn add_flagged_rows(&self, src: &CudaView<'_, f32>, rows: usize, width: usize, y: &mut CudaViewMut<'_, f32>) -> Result<()> {
        self.flagged_rows("add_flagged_rows", src, rows, width, true, y)
    }

    fn flagged_rows(
        &self,
        op: &'static str,
        src: &CudaView<'_, f32>,
        rows: usize,
        width: usize,
        add: bool,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        need(op, "src", rows + rows * width, src.len())?;
        need(op, "y", rows * width, y.len())?;
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((width as u32).div_ceil(256), int(op, rows)? as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r, w, a) = (int(op, rows)?, int(op, width)?, add as i32);
        launch!(self, Source::Elementwise, "take_flagged_rows", cfg, src, &r, &w, &a, y)
    }

    /// Top-k routing of each token's router logits [n_tokens, n_experts]: ids and
    /// renormalised weights [n_tokens, k]; counts[e] += 1 per choice.
    #[allow(clippy::too_many_arguments)]
    pub fn route_topk(
        &self,
        logits: &CudaView<'_, f32>,
        n_tokens: usize,
        n_experts: usize,
        k: usize,
        ids: &mut CudaViewMut<'_, i32>,
        weights: &mut CudaViewMut<'_, f32>,
        counts: &mut CudaSlice<u32>,
    ) -> Result<()> {
        check_route("route_topk", n_tokens, n_experts, k, [ids.len(), weights.len(), counts.len()])?;
        need("route_topk", "logits", n_tokens * n_experts, logits.len())?;
        let cfg = LaunchConfig { grid_dim: ((n_tokens as u32).div_ceil(4).max(1), 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (n, e, kk) = (int("route_topk", n_tokens)?, n_experts as i32, k as i32);
        launch!(self, Source::Moe, "route_topk", cfg, logits, &n, &e, &kk, ids, weights, counts)
    }

    /// The router's product (a float matrix of n_experts rows) over x [n_tokens, cols] and
    /// [`Gpu::route_topk`] on its logits, in one kernel, for up to [`ROUTE_FUSED_TOKENS`]
    /// tokens: the same ids, weights and counts as [`Gpu::matvec`] (whose few-row kernel
    /// makes the same sums) followed by `route_topk`. Ok(false), with nothing run, where it
    /// does not apply: more tokens, a quantized router, rows not whole 16-byte loads, or
    /// fusion turned off (`MXR_FUSE` without 1).
    #[allow(clippy::too_many_arguments)]
    pub fn route_fused(
        &self,
        router: &GpuMatrix,
        x: &CudaView<'_, f32>,
        n_tokens: usize,
        k: usize,
        ids: &mut CudaViewMut<'_, i32>,
        weights: &mut CudaViewMut<'_, f32>,
        counts: &mut CudaSlice<u32>,
    ) -> Result<bool> {
        let (n_experts, cols) = (router.rows, router.cols);
        let name = match router.qtype {
            QType::F32 if cols % 4 == 0 => "route_fused_f32",
            QType::BF16 if cols % 8 == 0 => "route_fused_bf16",
            QType::F16 if cols % 8 == 0 => "route_fused_f16",
            _ => return Ok(false),
        };
        if self.tuning.fuse & super::FUSE_ROUTE == 0 || router.n_experts != 1 || n_tokens > ROUTE_FUSED_TOKENS {
            return Ok(false);
        }
        check_route("route_fused", n_tokens, n_experts, k, [ids.len(), weights.len(), counts.len()])?;
        need("route_fused", "x", n_tokens * cols, x.len())?;
        if n_tokens == 0 {
            return Ok(true);
        }
        let mut logits = self.alloc::<f32>(n_tokens * n_experts)?;
        let cfg = LaunchConfig { grid_dim: (n_experts as u32, n_tokens as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (e, c, kk) = (n_experts as i32, int("route_fused", cols)?, k as i32);
        let tickets = self.tickets()?;
        launch!(self, Source::Moe, name, cfg, &*router.buf, &e, &c, x, &kk, &mut logits, ids, weights, counts, &tickets)?;
        Ok(true)
    }

    /// out[t, :] = Σ_j weights[t, j] y[t k + j, :]
    pub fn moe_combine(
        &self,
        y: &CudaView<'_, f32>,
        weights: &CudaView<'_, f32>,
        n_tokens: usize,
        k: usize,
        width: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        need("moe_combine", "y", n_tokens * k * width, y.len())?;
        need("moe_combine", "weights", n_tokens * k, weights.len())?;
        need("moe_combine", "out", n_tokens * width, out.len())?;
        if n_tokens == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((width as u32).div_ceil(256), int("moe_combine", n_tokens)? as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (kk, w) = (k as i32, int("moe_combine", width)?);
        launch!(self, Source::Moe, "moe_combine", cfg, y, weights, &kk, &w, out)
    }

    /// Partial NeoX RoPE on x [n_tokens, width] (heads of head_dim), positions *pos...
    /// (`pos`: one i32 in device memory).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        n_tokens: usize,
        width: usize,
        head_dim: usize,
        rotary_dim: usize,
        theta: f64,
        pos: &CudaSlice<i32>,
    ) -> Result<()> {
        need("rope", "x", n_tokens * width, x.len())?;
        if head_dim == 0 || !width.is_multiple_of(head_dim) || rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
            return Err(KernelError::Shape(format!("rope: width {width}, head_dim {head_dim}, rotary_dim {rotary_dim}")));
        }
        let n = n_tokens * (width / head_dim) * (rotary_dim / 2);
        if n == 0 {
            return Ok(());
        }
        let (nt, w, hd, rd) = (int("rope", n_tokens)?, int("rope", width)?, head_dim as i32, rotary_dim as i32);
        launch!(self, Source::Attention, "rope", grid1(n, 256), x, &nt, &w, &hd, &rd, &theta, pos)
    }
}
