//! The CUDA backend, on cudarc with the CUDA libraries loaded at run time: the binary
//! builds and runs where there is no CUDA, and [`Gpu::open`] says clearly why there is no
//! GPU. Kernels are the .cu files of kernels/cuda, compiled by NVRTC at first use for
//! the device's architecture and cached on disk ([`nvrtc`]); dense bf16 products go to
//! cuBLAS ([`blas`]). Every launch goes through a typed, shape-checked function in
//! [`ops`]; `unsafe` is confined to this module.

#![allow(unsafe_code)]

pub mod attention;
pub mod blas;
pub mod check;
pub mod graph;
pub mod host;
pub mod host_call;
pub mod lane;
pub mod lightning;
pub mod matrix;
pub mod nvrtc;
pub mod ops;
pub mod pages;
pub mod pinned;
pub mod placed;
pub mod timeline;
pub mod tma;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DevicePtr};
pub use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

use crate::KernelError;
pub use attention::{KvBuf, KvType, RopeTable, WgmmaKernel};
pub use graph::Graph;
pub use host_call::{CostFn, HostCall, HostFn};
pub use lane::Lane;
pub use matrix::{GpuMatrix, Part};
pub use nvrtc::Source;
pub use ops::{quantized, NormRouted, QAct, Residual, ROUTE_FUSED_TOKENS};
pub use pinned::Pinned;
pub use timeline::{by_kernel, KernelTime, Stamp};

type Result<T> = std::result::Result<T, KernelError>;

/// What the device is.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
    /// e.g. 13000 for CUDA 13.0
    pub driver_version: i32,
    pub sm_count: i32,
}

impl DeviceInfo {
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} {} ({}, {} SMs, {:.1} GiB, {:.1} GiB free, driver {}.{})",
            self.ordinal,
            self.name,
            self.arch(),
            self.sm_count,
            self.total_bytes as f64 / (1u64 << 30) as f64,
            self.free_bytes as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }
}

/// Launch geometry that can be tuned per run (MXR_MATVEC_ROWS, MXR_MATVEC_WARPS, ...), for
/// kernel experiments; the defaults are the measured best on H100/H200.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Output rows per warp of the matrix-vector kernels.
    pub matvec_rows: u32,
    /// Warps per block of the matrix-vector kernels (default 4: at 8, Q4_K ran at 48-53% of
    /// the copy bandwidth against 58-66% at 4, and Q8_0's expert pairs at 76-79% against
    /// 79-83%; `gpu-session.sh tune-kernels` on an H200).
    pub matvec_warps: u32,
    /// Q8_0's own rows per warp and warps per block (`MXR_MATVEC_Q8_ROWS`,
    /// `MXR_MATVEC_Q8_WARPS`; default 2 x 4, as the other types). `tune-kernels` put 1 x 8
    /// ahead on the products alone (down pair 85% of the copy bandwidth against 80%), but
    /// S8 decode on an H200 at 02778ac was slower with it: 423.9 / 421.8 tokens/s against
    /// 429.5 / 432.8 at 2 x 4, alternated in one call.
    pub matvec_q8_rows: u32,
    pub matvec_q8_warps: u32,
    /// Units in flight per lane in the matrix-vector kernels' main loop (`MXR_MATVEC_UNROLL`,
    /// 1 to 4).
    pub matvec_unroll: u32,
    /// Two products of one input in one launch (`matvec_pair`); `MXR_MATVEC_PAIR=0` gives
    /// two launches instead, the same values (for timing one against the other).
    pub matvec_pair: bool,
    /// The types whose matrix-vector kernels run software-pipelined, a bit set
    /// (`MXR_MATVEC_PIPELINE`; [`PIPELINE_DEFAULT`], Q8_0, Q6_K and Q4_0, the types that
    /// gained on an H200; 0 for none): each lane loads its next unit while it computes the
    /// current one (matvec.cu, `Pipelined`).
    pub matvec_pipeline: u32,
    /// Matrix-vector products from shared memory (`MXR_MATVEC_STAGE` = S, 1 to 4, default
    /// 2; 0 reads global memory) for the types in `matvec_staged`: the block copies its
    /// activation row once and each warp keeps S chunks of its rows in flight by cp.async
    /// (matvec.cu, `Staged`). On an H200 (tenth session) S8 q4_k decode went from 528.1 /
    /// 534.2 to 548.0 / 548.4 tokens/s at S = 2, alternated in one call; Q8_0 staged
    /// measured no change (438.0 / 435.3 against 446.9 / 433.2), so it is left out.
    pub matvec_stage: u32,
    /// The types staged when `matvec_stage` > 0 (`MXR_MATVEC_STAGED`, [`PIPELINE_Q8_0`] and
    /// [`PIPELINE_Q4_K`] bits; default Q4_K).
    pub matvec_staged: u32,
    /// Dense staged products issue their first chunks before waiting for the previous
    /// kernel (`MXR_MATVEC_EARLY=1`; default 0). Slower on an H200: S8 q4_k 492.9 / 507.7
    /// tokens/s against 548.0 / 548.4 without, S8 q8_0 426.6 / 403.9 against 438.0 / 435.3.
    pub matvec_early: bool,
    /// Prefill attention (bf16 cache, head size 128, sm_90) on the warpgroup kernel with
    /// this many heads per block (`MXR_FLASH_WGMMA`: 1, or 2 (default; even GQA groups
    /// only, others take 1)); 0 gives flash.cu's mma.sync kernel, for comparison.
    pub flash_wgmma: u32,
    /// K/V stages of the warpgroup kernel (`MXR_FLASH_STAGES`): 2, or 3 (default) with the
    /// next tile's scores issued before this tile's P V.
    pub flash_stages: u32,
    /// Two-head, three-stage warpgroup kernel with its warpgroups taking turns to issue
    /// products, so that one's softmax runs under the other's (`MXR_FLASH_PINGPONG=1`).
    pub flash_pingpong: bool,
    /// Two-head, three-stage warpgroup kernel with a producer warpgroup copying the tiles
    /// through mbarriers (`MXR_FLASH_PRODUCER`: 1, the default; 0 gives the kernel whose
    /// consumers also copy, with a block-wide barrier per tile).
    pub flash_producer: bool,
    /// The producer kernel's copies by the Tensor Memory Accelerator (`MXR_FLASH_TMA`): 0
    /// (cp.async), 1 (the default), or 2 (multicast to clusters of two blocks, for GQA
    /// groups that are a multiple of 4; others take cp.async).
    pub flash_tma: u32,
    /// Captured graphs with programmatic edges into mxr's kernels (`MXR_PDL`: 1, the
    /// default, or 0 for plain edges): see graph.rs.
    pub pdl: bool,
    /// Decode's fused kernels (`MXR_FUSE`, a bit set, default 13: all three): 1 the router's
    /// product with its top-k (`route_fused`), 4 the MoE's combination inside the next norm,
    /// 8 the MoE's norm inside the router (`moe_norm_route`: one token, f32 router; with 1
    /// and 4). A fusion left out is its own kernel again, with the same values (the router's
    /// logits of bit 8 are summed in another order, so they may differ in the last bits). (Bit 2 was SwiGLU's
    /// int8 form as the gate/up products' epilogue: the same values, no measurable gain on
    /// an H200, a fence and an atomic in every block of the step's largest kernel; removed.)
    pub fuse: u32,
    /// Every kernel stamps when its first block starts and when its wait for the kernel
    /// ahead returns (`MXR_TIMELINE=1`, default 0; timeline.rs), for `mxr bench --timeline`.
    pub timeline: bool,
    /// The decode step's float lm_head in two launches, the first half's logits copied to
    /// the host on the side stream while the second half computes (`MXR_LOGITS_SPLIT=1`;
    /// default 0: built in the eleventh session, not yet measured). The same bits.
    pub logits_split: bool,
    /// Captured kernels carry priorities (`MXR_NODE_PRIORITY`: 1, the default, or 0):
    /// bulk work ([`Gpu::bulk`]: lm_head; products over PCIe with `pcie_bulk`) the
    /// least, every other kernel the greatest, so that when decode graphs of several
    /// sequences run at once (lanes) one sequence's short kernels on its critical path are
    /// not queued behind another's lm_head.
    pub node_priority: bool,
    /// Blocks in all that a quantized product reading host memory over PCIe may take
    /// ([`Gpu::over_pcie`]; `MXR_PCIE_BLOCKS`, default a quarter of the SMs, 0: as many as
    /// it has blocks of rows), each block taking every so many blocks of rows: such
    /// products wait on PCIe, and with one block per block of rows they fill every SM while
    /// other sequences' kernels wait. On an H200, S2x32 at 25% (docs/PERF.md): two
    /// sequences 746.40 tokens/s at 66 blocks, 751.46 at 33, 720.62 at 132, 683.29
    /// unlimited; eight sequences 919.51 at 33, 925.31 at 16, 858.89 at 8 and 857.71 at 66;
    /// one sequence 589.13 at 33 against 593.06 at 66, 551.15 at 16.
    pub pcie_blocks: u32,
    /// Products over PCIe ([`Gpu::over_pcie`]) are bulk work at the least priority
    /// (`MXR_PCIE_BULK=1`; default 0: the greatest, as the other kernels on a sequence's
    /// critical path). As bulk work their few blocks could queue behind other sequences'
    /// lm_head blocks while the sequence's step waited for them. On an H200, S2x32 at
    /// 25%, a quarter of the SMs: eight sequences 1,158.60 tokens/s against 895.59 as
    /// bulk work, four 983.22 against 882.23, one 599.77 against 598.77 (docs/PERF.md).
    pub pcie_bulk: bool,
}

/// `Tuning::matvec_pipeline` bits, one per weight type (matvec.cu's `Pipelined`).
pub const PIPELINE_Q8_0: u32 = 1;
pub const PIPELINE_Q6_K: u32 = 2;
pub const PIPELINE_Q4_0: u32 = 4;
pub const PIPELINE_Q4_K: u32 = 8;
pub const PIPELINE_FLOAT: u32 = 16;
pub const PIPELINE_DEFAULT: u32 = PIPELINE_Q8_0 | PIPELINE_Q6_K | PIPELINE_Q4_0;

/// `Tuning::fuse` bits.
pub const FUSE_ROUTE: u32 = 1;
pub const FUSE_COMBINE: u32 = 4;
pub const FUSE_NORM_ROUTE: u32 = 8;

impl Tuning {
    /// The matrix-vector kernels' (warps per block, rows per warp) for weights of type `q`.
    pub fn matvec_shape(&self, q: mxr_quant::QType) -> (u32, u32) {
        match q {
            mxr_quant::QType::Q8_0 => (self.matvec_q8_warps, self.matvec_q8_rows),
            _ => (self.matvec_warps, self.matvec_rows),
        }
    }

    /// Dynamic shared memory for a matrix-vector block over `cols`-wide rows of type `q`:
    /// when `q` is staged (`matvec_stage` > 0, Q8_0 or Q4_K in `matvec_staged`, `cols` a
    /// multiple of 256), the activation row (int8 values and f32 scales, 9/8 byte a column;
    /// Q4_K also keeps its activation block sums, 1/8 byte a column) and each warp's ring
    /// of `matvec_stage` chunks of its rows (32 units: 1088 bytes a row for Q8_0, 1152 for
    /// Q4_K), if that fits the 48 KiB a launch gets without opting in; else 0, and the
    /// kernel reads global memory. matvec.cu's `stage_fits` makes the same sum.
    pub fn matvec_stage_bytes(&self, q: mxr_quant::QType, cols: usize) -> u32 {
        let (bit, chunk_row_bytes) = match q {
            mxr_quant::QType::Q8_0 => (PIPELINE_Q8_0, 1088),
            mxr_quant::QType::Q4K => (PIPELINE_Q4_K, 8 * 144),
            _ => return 0,
        };
        if self.matvec_stage == 0 || self.matvec_staged & bit == 0 || !cols.is_multiple_of(256) {
            return 0;
        }
        let (warps, rows) = self.matvec_shape(q);
        let ring = (warps * rows * self.matvec_stage) as usize * chunk_row_bytes;
        // Q4_K's activation block sums too (an int per 32 columns)
        let sums = if q == mxr_quant::QType::Q4K { cols / 8 } else { 0 };
        let bytes = cols.saturating_add(cols / 8).saturating_add(sums).saturating_add(ring);
        if bytes <= 48 * 1024 {
            bytes as u32
        } else {
            0
        }
    }

    fn from_env() -> Tuning {
        let get = |k: &str, d: u32, ok: fn(u32) -> bool| std::env::var(k).ok().and_then(|v| v.parse().ok()).filter(|&v| ok(v)).unwrap_or(d);
        Tuning {
            matvec_rows: get("MXR_MATVEC_ROWS", 2, |v| (1..=16).contains(&v)),
            matvec_warps: get("MXR_MATVEC_WARPS", 4, |v| (1..=32).contains(&v)),
            matvec_q8_rows: get("MXR_MATVEC_Q8_ROWS", 2, |v| (1..=16).contains(&v)),
            matvec_q8_warps: get("MXR_MATVEC_Q8_WARPS", 4, |v| (1..=32).contains(&v)),
            matvec_unroll: get("MXR_MATVEC_UNROLL", 2, |v| (1..=4).contains(&v)),
            matvec_pair: get("MXR_MATVEC_PAIR", 1, |v| v <= 1) == 1,
            matvec_pipeline: get("MXR_MATVEC_PIPELINE", PIPELINE_DEFAULT, |v| v <= 31),
            matvec_stage: get("MXR_MATVEC_STAGE", 2, |v| v <= 4),
            matvec_staged: get("MXR_MATVEC_STAGED", PIPELINE_Q4_K, |v| v <= 31),
            matvec_early: get("MXR_MATVEC_EARLY", 0, |v| v <= 1) == 1,
            flash_wgmma: get("MXR_FLASH_WGMMA", 2, |v| v <= 2),
            flash_stages: get("MXR_FLASH_STAGES", 3, |v| (2..=3).contains(&v)),
            flash_pingpong: get("MXR_FLASH_PINGPONG", 0, |v| v <= 1) == 1,
            flash_producer: get("MXR_FLASH_PRODUCER", 1, |v| v <= 1) == 1,
            flash_tma: get("MXR_FLASH_TMA", 1, |v| v <= 2),
            pdl: get("MXR_PDL", 1, |v| v <= 1) == 1,
            fuse: get("MXR_FUSE", 13, |v| v <= 15),
            logits_split: get("MXR_LOGITS_SPLIT", 0, |v| v <= 1) == 1,
            node_priority: get("MXR_NODE_PRIORITY", 1, |v| v <= 1) == 1,
            pcie_blocks: get("MXR_PCIE_BLOCKS", PCIE_BLOCKS_QUARTER, |v| v <= 1 << 20),
            pcie_bulk: get("MXR_PCIE_BULK", 0, |v| v <= 1) == 1,
            timeline: get("MXR_TIMELINE", 0, |v| v <= 1) == 1,
        }
    }
}

/// The grid's x for a product of `n_bx` blocks of rows and `others` blocks per x, at most
/// `limit` blocks in all (0: no limit): at least one block per x, never more than `n_bx`.
fn row_grid(n_bx: u32, others: u32, limit: u32) -> u32 {
    if limit == 0 {
        return n_bx;
    }
    n_bx.min((limit / others.max(1)).max(1))
}

/// `Tuning::pcie_blocks` before the GPU is open: a quarter of its SMs.
const PCIE_BLOCKS_QUARTER: u32 = u32::MAX;

/// One GPU: its context, one stream all work is ordered on, cuBLAS, and compiled modules.
pub struct Gpu {
    pub tuning: Tuning,
    ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// A second stream for work that overlaps `stream`'s (weight dequantization ahead of
    /// the prefill GEMMs); ordered against it only by explicit events (`side_*`).
    side: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    info: DeviceInfo,
    arch: &'static str,
    nvrtc_version: (i32, i32),
    modules: Mutex<HashMap<Source, Arc<CudaModule>>>,
    // keyed by module and name: two modules may define kernels of one name
    functions: Mutex<HashMap<(Source, &'static str), CudaFunction>>,
    /// Nanoseconds the host has spent blocked on the GPU (downloads and syncs), for
    /// `mxr bench`: wall time minus this is the time the host spent issuing work.
    waited_ns: std::sync::atomic::AtomicU64,
    /// Nanoseconds the host has spent in graph launches ([`Gpu::launch_graph`]), for the
    /// same report.
    launched_ns: std::sync::atomic::AtomicU64,
    /// `capture` is recording the main stream (launches then set programmatic edges).
    capturing: std::sync::atomic::AtomicBool,
    /// Kernels captured now are bulk work ([`Gpu::bulk`]).
    bulk: std::sync::atomic::AtomicBool,
    /// Quantized products launched now read host memory over PCIe ([`Gpu::over_pcie`]).
    over_pcie: std::sync::atomic::AtomicBool,
    /// The context's (least, greatest) stream priorities: captured kernels' priorities
    /// (`Tuning::node_priority`).
    priorities: (i32, i32),
    /// The host calls posted by the capture in progress ([`Gpu::host_post`]), kept
    /// by the graph it makes.
    graph_calls: Mutex<Vec<Arc<host_call::HostCall>>>,
    /// The thread that answers the host calls of this GPU's live graphs.
    worker: host_call::WorkerSlot,
    /// Counters for kernels whose last block finishes a shared piece of work (common.cuh's
    /// `arrived_last`), zero between kernels: each such kernel resets what it counted. Only
    /// kernels on `stream` use them, one at a time.
    tickets: CudaSlice<u32>,
    /// While capturing: the graph's own counters, kept by the graph (graphs of sequences
    /// decoded side by side, on lanes, run such kernels at the same time).
    graph_tickets: Mutex<Option<CudaSlice<u32>>>,
    /// With `tuning.timeline`: the stamps' buffer and the captured kernels' names.
    pub(crate) timeline: Option<timeline::Timeline>,
}

/// Why there is no usable GPU, without touching a library that is absent.
pub fn probe() -> std::result::Result<usize, String> {
    // SAFETY: these only try to dlopen the libraries.
    let (driver, nvrtc, cublas) = unsafe {
        (cudarc::driver::sys::is_culib_present(), cudarc::nvrtc::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present())
    };
    if !driver {
        return Err("no CUDA driver (libcuda.so) was found".into());
    }
    if !nvrtc {
        return Err("the CUDA driver is present but NVRTC (libnvrtc.so) was not found: install the CUDA toolkit's runtime libraries or add them to LD_LIBRARY_PATH".into());
    }
    if !cublas {
        return Err("the CUDA driver is present but cuBLAS (libcublas.so) was not found: add the CUDA libraries to LD_LIBRARY_PATH".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the CUDA driver reports no GPU".into()),
        Err(e) => Err(format!("the CUDA driver could not start: {e}")),
    }
}

/// Later work on `then` waits for the work queued on `first` so far (an event recorded on
/// one, waited for by the other; also inside a capture, where it forks or joins).
pub(crate) fn order(first: &CudaStream, then: &CudaStream) -> Result<()> {
    let e = first.record_event(None).map_err(|e| drv("recording an event", e))?;
    then.wait(&e).map_err(|e| drv("stream wait", e))
}

impl Gpu {
    /// How many GPUs the driver sees.
    pub fn count() -> Result<usize> {
        probe().map_err(KernelError::NoGpu)
    }

    /// Opens GPU `ordinal`.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let n = probe().map_err(KernelError::NoGpu)?;
        if ordinal >= n {
            return Err(KernelError::NoGpu(format!("GPU {ordinal} asked for, but there are {n}")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("opening the device", e))?;
        // All work is ordered on one stream, so cudarc's per-buffer event tracking (for
        // cross-stream hazards) is pure overhead, and its event records would get in the
        // way of graph capture.
        // SAFETY: buffers are used on `stream`; the only other stream, `side`, reads weights
        // and writes scratch buffers under explicit events (see `to_bf16_side`).
        unsafe { ctx.disable_event_tracking() };
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx)?;
        }
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(|e| drv("creating a stream", e))?;
        let worker_ctx = ctx.clone();
        let side = ctx.new_stream().map_err(|e| drv("creating a stream", e))?;
        let blas = cudarc::cublas::CudaBlas::new(stream.clone()).map_err(|e| match format!("{e:?}") {
            s if s.contains("ALLOC_FAILED") => KernelError::Cuda(format!("out of GPU memory while starting cuBLAS ({s})")),
            s => KernelError::Cuda(format!("cuBLAS: {s}")),
        })?;
        let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(|e| drv("memory info", e))?;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
        let (mut maj, mut min) = (0, 0);
        // SAFETY: writes two ints.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) };
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| drv("device attributes", e))?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(|e| drv("device name", e))?,
            compute_capability: ctx.compute_capability().map_err(|e| drv("compute capability", e))?,
            total_bytes,
            free_bytes,
            driver_version,
            sm_count,
        };
        let arch: &'static str = Box::leak(info.arch().into_boxed_str());
        let priorities = cudarc::driver::result::stream::get_priority_range().map_err(|e| drv("stream priorities", e))?;
        let tickets = stream.alloc_zeros::<u32>(ops::TICKETS).map_err(|e| oom_or("allocation", ops::TICKETS * 4, e))?;
        let mut tuning = Tuning::from_env();
        if tuning.pcie_blocks == PCIE_BLOCKS_QUARTER {
            tuning.pcie_blocks = (sm_count.max(4) / 4) as u32;
        }
        let timeline = if tuning.timeline { Some(timeline::Timeline::new(&stream)?) } else { None };
        let gpu = Gpu {
            tuning,
            ctx,
            stream,
            side,
            blas,
            info,
            arch,
            nvrtc_version: (maj, min),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            waited_ns: std::sync::atomic::AtomicU64::new(0),
            launched_ns: std::sync::atomic::AtomicU64::new(0),
            capturing: std::sync::atomic::AtomicBool::new(false),
            bulk: std::sync::atomic::AtomicBool::new(false),
            over_pcie: std::sync::atomic::AtomicBool::new(false),
            priorities,
            graph_calls: Mutex::new(Vec::new()),
            worker: host_call::WorkerSlot::new(worker_ctx),
            tickets,
            graph_tickets: Mutex::new(None),
            timeline,
        };
        // the timeline points every module at its buffer when the module loads, which must
        // not happen inside a capture: load them all now
        if gpu.timeline.is_some() {
            gpu.warm_up()?;
        }
        Ok(gpu)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Free and total device memory now.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| drv("memory info", e))
    }

    /// Compiles (or loads from the cache) every kernel source now; returns how many came
    /// from the cache. Without this, each source compiles at its first use.
    /// The kernel sources this device compiles (all but the Hopper-only one elsewhere).
    pub fn sources(&self) -> Vec<Source> {
        Source::ALL.into_iter().filter(|s| s.target(self.arch).is_ok()).collect()
    }

    pub fn warm_up(&self) -> Result<usize> {
        let mut cached = 0;
        for s in self.sources() {
            if self.module(s)?.1 {
                cached += 1;
            }
        }
        Ok(cached)
    }

    fn module(&self, s: Source) -> Result<(Arc<CudaModule>, bool)> {
        let mut mods = self.modules.lock().map_err(|_| KernelError::Threads("module cache poisoned".into()))?;
        if let Some(m) = mods.get(&s) {
            return Ok((m.clone(), true));
        }
        let mut defines = match s {
            Source::Matvec => vec![
                format!("ROWS={}", self.tuning.matvec_rows),
                format!("WARPS={}", self.tuning.matvec_warps),
                format!("Q8_ROWS={}", self.tuning.matvec_q8_rows),
                format!("Q8_WARPS={}", self.tuning.matvec_q8_warps),
                format!("UNROLL={}", self.tuning.matvec_unroll),
                format!("PIPELINE={}", self.tuning.matvec_pipeline),
                format!("STAGE={}", self.tuning.matvec_stage),
                format!("STAGED={}", self.tuning.matvec_staged),
                format!("EARLY={}", self.tuning.matvec_early as u32),
            ],
            _ => Vec::new(),
        };
        if self.timeline.is_some() {
            defines.push("TIMELINE=1".into());
        }
        let c = nvrtc::compile(s, s.target(self.arch)?, self.nvrtc_version, &defines)?;
        let m = self.ctx.load_module(c.ptx).map_err(|e| drv("loading a compiled kernel module", e))?;
        if let Some(t) = &self.timeline {
            if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(KernelError::Cuda("timeline: a kernel module loaded during a graph capture".into()));
            }
            t.attach(&m, &self.stream)?;
        }
        mods.insert(s, m.clone());
        Ok((m, c.from_cache))
    }

    /// The kernel `name` of `source`.
    pub(crate) fn function(&self, source: Source, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().map_err(|_| KernelError::Threads("function cache poisoned".into()))?.get(&(source, name)) {
            return Ok(f.clone());
        }
        let (m, _) = self.module(source)?;
        let f = m.load_function(name).map_err(|e| drv(name, e))?;
        self.functions.lock().map_err(|_| KernelError::Threads("function cache poisoned".into()))?.insert((source, name), f.clone());
        Ok(f)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(|e| oom_or("upload", std::mem::size_of_val(host), e))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(|e| oom_or("allocation", n * std::mem::size_of::<T>(), e))
    }

    /// Uninitialised device memory for outputs that a kernel writes in full.
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: callers only hand the buffer to kernels that write every element before it is read.
        unsafe { self.stream.alloc(n.max(1)) }.map_err(|e| oom_or("allocation", n * std::mem::size_of::<T>(), e))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaView<'_, T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); dev.len()];
        let t = std::time::Instant::now();
        self.stream.memcpy_dtoh(dev, &mut host).map_err(|e| drv("download", e))?;
        self.waited(t);
        Ok(host)
    }

    /// Counts the time since `since` as the host blocked on the GPU (also a caller that
    /// polls lanes until a step is done).
    pub fn waited(&self, since: std::time::Instant) {
        self.waited_ns.fetch_add(since.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Seconds the host has spent blocked on the GPU so far (downloads and syncs).
    pub fn host_waited(&self) -> f64 {
        self.waited_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }

    /// Replays `graph` on this GPU's stream, timing the host's part (the launch call).
    pub fn launch_graph(&self, graph: &Graph) -> Result<()> {
        let t = std::time::Instant::now();
        let r = graph.launch();
        self.launched(t);
        r
    }

    fn launched(&self, since: std::time::Instant) {
        self.launched_ns.fetch_add(since.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Seconds the GPU's host worker has spent answering decode graphs' host calls so far
    /// (computing cold experts on the CPU).
    pub fn host_worker_busy(&self) -> f64 {
        self.worker.0.busy()
    }

    /// Seconds the host has spent launching graphs so far.
    pub fn host_launching(&self) -> f64 {
        self.launched_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }

    pub fn copy<T: DeviceRepr>(&self, src: &CudaView<'_, T>, dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        if src.len() != dst.len() {
            return Err(KernelError::Length { op: "copy", what: "destination", expected: src.len(), actual: dst.len() });
        }
        self.stream.memcpy_dtod(src, dst).map_err(|e| drv("device copy", e))
    }

    /// `dev` on the host, read on the side stream: after [`Gpu::side_after_main`], the copy
    /// waits only for the main stream's work queued before that call, not for what the main
    /// stream was given since (a layer's resident experts, while the host decides about the
    /// others).
    pub fn download_side<T: DeviceRepr + Default + Clone>(&self, dev: &CudaView<'_, T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); dev.len()];
        let t = std::time::Instant::now();
        self.side.memcpy_dtoh(dev, &mut host).map_err(|e| drv("download", e))?;
        self.side.synchronize().map_err(|e| drv("download", e))?;
        self.waited(t);
        Ok(host)
    }

    /// A copy on this GPU of `x`, which lives on `src` (another GPU, or another [`Gpu`] of
    /// the same device): device to device, peer to peer where the driver can. The copy
    /// waits for `src`'s queued work, and `src`'s later work (freeing `x` included) waits
    /// for the copy.
    pub fn take_from<T: DeviceRepr>(&self, src: &Gpu, x: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        let mut y = self.alloc::<T>(x.len())?;
        self.copy_from(src, x, &mut y)?;
        Ok(y)
    }

    /// dst (on this GPU) = x (on `src`), ordered as [`Gpu::take_from`].
    pub fn copy_from<T: DeviceRepr>(&self, src: &Gpu, x: &CudaSlice<T>, dst: &mut CudaSlice<T>) -> Result<()> {
        if x.len() != dst.len() {
            return Err(KernelError::Length { op: "copy between GPUs", what: "destination", expected: x.len(), actual: dst.len() });
        }
        let ready = src.stream.record_event(None).map_err(|e| drv("recording an event", e))?;
        self.stream.wait(&ready).map_err(|e| drv("stream wait", e))?;
        self.stream.memcpy_dtod(x, dst).map_err(|e| drv("copying between GPUs", e))?;
        let done = self.stream.record_event(None).map_err(|e| drv("recording an event", e))?;
        src.stream.wait(&done).map_err(|e| drv("stream wait", e))
    }

    pub fn write<T: DeviceRepr>(&self, host: &[T], dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        if host.len() != dst.len() {
            return Err(KernelError::Length { op: "write", what: "destination", expected: host.len(), actual: dst.len() });
        }
        self.stream.memcpy_htod(host, dst).map_err(|e| drv("upload", e))
    }

    pub fn memset_zero<T: DeviceRepr + ValidAsZeroBits>(&self, dst: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memset_zeros(dst).map_err(|e| drv("memset", e))
    }

    /// Waits for all queued work; reports a kernel fault here.
    pub fn sync(&self) -> Result<()> {
        let t = std::time::Instant::now();
        self.side.synchronize().map_err(|e| drv("running kernels", e))?;
        self.stream.synchronize().map_err(|e| drv("running kernels", e))?;
        self.waited(t);
        Ok(())
    }

    /// Returns the memory pool's freed memory to the driver (the pool keeps it otherwise,
    /// see `keep_freed_memory`), after the queued work is done.
    pub fn trim_pool(&self) -> Result<()> {
        use cudarc::driver::{result, sys};
        self.sync()?;
        if !self.ctx.has_async_alloc() {
            return Ok(());
        }
        // SAFETY: the device comes from a live context.
        unsafe {
            let pool = result::device::get_mem_pool(self.ctx.cu_device()).map_err(|e| drv("getting the memory pool", e))?;
            sys::cuMemPoolTrimTo(pool, 0).result().map_err(|e| drv("trimming the memory pool", e))
        }
    }

    /// An event to order the two streams with ([`Gpu::record_main`], [`Gpu::side_wait`],
    /// ...); made once and recorded again and again. Waiting on an event never recorded
    /// waits for nothing.
    pub fn event(&self) -> Result<CudaEvent> {
        self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(|e| drv("creating an event", e))
    }

    /// An event that keeps time, for profiling: record it with [`Gpu::record_main`] and
    /// read the time between two with [`Gpu::elapsed`].
    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| drv("creating an event", e))
    }

    /// Seconds from `start` to `end` on the GPU's clock (both recorded, with timing, and
    /// done: call after [`Gpu::sync`]).
    pub fn elapsed(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
        start.elapsed_ms(end).map(|ms| f64::from(ms) * 1e-3).map_err(|e| drv("reading an event's time", e))
    }

    /// `e` marks the work queued on the main stream so far.
    pub fn record_main(&self, e: &CudaEvent) -> Result<()> {
        e.record(&self.stream).map_err(|e| drv("recording an event", e))
    }

    /// `e` marks the work queued on the side stream so far.
    pub fn record_side(&self, e: &CudaEvent) -> Result<()> {
        e.record(&self.side).map_err(|e| drv("recording an event", e))
    }

    /// Later work on the side stream waits for the main stream's work queued so far.
    pub fn side_after_main(&self) -> Result<()> {
        order(&self.stream, &self.side)
    }

    /// Later work on the main stream waits for the side stream's work queued so far (the
    /// join of [`Gpu::side_after_main`]'s fork, also inside a capture).
    pub fn main_after_side(&self) -> Result<()> {
        order(&self.side, &self.stream)
    }

    /// Later work on the side stream waits for `e`.
    pub fn side_wait(&self, e: &CudaEvent) -> Result<()> {
        self.side.wait(e).map_err(|e| drv("stream wait", e))
    }

    /// Later work on the main stream waits for `e`.
    pub fn main_wait(&self, e: &CudaEvent) -> Result<()> {
        self.stream.wait(e).map_err(|e| drv("stream wait", e))
    }

    /// Device memory bandwidth as a device-to-device copy sees it: bytes read plus bytes
    /// written per second, best of `reps` copies of `bytes` (after one warm-up copy).
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let src = self.zeros::<u8>(bytes)?;
        let mut dst = self.zeros::<u8>(bytes)?;
        let mut best = f64::INFINITY;
        for i in 0..=reps.max(1) {
            self.sync()?;
            let t = std::time::Instant::now();
            self.stream.memcpy_dtod(&src, &mut dst).map_err(|e| drv("device copy", e))?;
            self.sync()?;
            if i > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        Ok(2.0 * bytes as f64 / best)
    }

    /// Host-to-device copy bandwidth in bytes/s, best of `reps` copies of `bytes` (after a
    /// warm-up): from pageable memory (as weights mapped from a file are), or from pinned
    /// (page-locked) memory.
    pub fn upload_bandwidth(&self, bytes: usize, pinned: bool, reps: usize) -> Result<f64> {
        let mut dst = self.zeros::<u8>(bytes)?;
        let mut best = f64::INFINITY;
        let pageable = if pinned { Vec::new() } else { vec![1u8; bytes] };
        // SAFETY: the pinned buffer is fully written below before any copy reads it.
        let mut locked =
            if pinned { Some(unsafe { self.ctx.alloc_pinned::<u8>(bytes) }.map_err(|e| drv("pinned allocation", e))?) } else { None };
        if let Some(h) = locked.as_mut() {
            h.as_mut_slice().map_err(|e| drv("pinned memory", e))?.fill(1);
        }
        for i in 0..=reps.max(1) {
            self.sync()?;
            let t = std::time::Instant::now();
            match &locked {
                Some(h) => self.stream.memcpy_htod(h, &mut dst),
                None => self.stream.memcpy_htod(&pageable, &mut dst),
            }
            .map_err(|e| drv("upload", e))?;
            self.sync()?;
            if i > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        Ok(bytes as f64 / best)
    }

    /// Records the work `f` queues (without running it) as a CUDA graph, for replay with
    /// [`Graph::launch`]. `f` must not wait for the GPU (no downloads, no sync).
    /// Whether [`Gpu::capture`] is recording.
    pub fn is_capturing(&self) -> bool {
        self.capturing.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let tickets = self.zeros::<u32>(ops::TICKETS)?;
        *self.lock_graph_tickets()? = Some(tickets);
        let graph = self.capture_with(f);
        let tickets = self.lock_graph_tickets()?.take();
        let mut graph = graph?;
        graph.tickets = tickets;
        Ok(graph)
    }

    /// `f`'s kernels, if captured, are bulk work: the least priority
    /// (`Tuning::node_priority`), so that other sequences' kernels go first.
    pub fn bulk<R>(&self, f: impl FnOnce() -> R) -> R {
        let was = self.bulk.swap(true, std::sync::atomic::Ordering::Relaxed);
        let r = f();
        self.bulk.store(was, std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// `f`'s quantized products read host memory over PCIe: on at most
    /// `Tuning::pcie_blocks` blocks, so that other sequences' kernels find SMs, and bulk
    /// work ([`Gpu::bulk`]) where `Tuning::pcie_bulk`.
    pub fn over_pcie<R>(&self, f: impl FnOnce() -> R) -> R {
        let was = self.over_pcie.swap(true, std::sync::atomic::Ordering::Relaxed);
        let r = if self.tuning.pcie_bulk { self.bulk(f) } else { f() };
        self.over_pcie.store(was, std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// The grid's x for a quantized product of `n_bx` blocks of rows whose grid has
    /// `others` blocks per x (pairs, matrices): all of them, or over PCIe at most
    /// `Tuning::pcie_blocks` blocks in all.
    pub(crate) fn row_blocks(&self, n_bx: u32, others: u32) -> u32 {
        let limit = if self.over_pcie.load(std::sync::atomic::Ordering::Relaxed) { self.tuning.pcie_blocks } else { 0 };
        row_grid(n_bx, others, limit)
    }

    /// The priority of a kernel captured now.
    pub(crate) fn captured_priority(&self) -> i32 {
        let (least, greatest) = self.priorities;
        if self.bulk.load(std::sync::atomic::Ordering::Relaxed) {
            least
        } else {
            greatest
        }
    }

    fn lock_graph_tickets(&self) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<u32>>>> {
        self.graph_tickets.lock().map_err(|_| KernelError::Cuda("the graph's tickets: lock poisoned".into()))
    }

    /// The device address of the counters `arrived_last` kernels take: the capturing
    /// graph's own, else the GPU's.
    pub(crate) fn tickets(&self) -> Result<u64> {
        let own = self.lock_graph_tickets()?;
        let t = match own.as_ref() {
            Some(t) if self.is_capturing() => t,
            _ => &self.tickets,
        };
        let (at, _) = t.device_ptr(&self.stream);
        Ok(at)
    }

    fn capture_with(&self, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
        self.stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| drv("starting graph capture", e))?;
        if let Some(t) = &self.timeline {
            t.begin_capture()?;
        }
        let calls = |v: Option<Vec<Arc<host_call::HostCall>>>| -> Result<Vec<Arc<host_call::HostCall>>> {
            let mut c = self.graph_calls.lock().map_err(|_| KernelError::Cuda("the graph's host calls: lock poisoned".into()))?;
            Ok(std::mem::replace(&mut *c, v.unwrap_or_default()))
        };
        calls(None)?;
        self.capturing.store(true, std::sync::atomic::Ordering::Relaxed);
        // timed graphs end in a kernel that only stamps (timeline.rs): the last real kernel
        // is then charged until it completes
        let body = f().and_then(|_| if self.timeline.is_some() { self.timeline_mark() } else { Ok(()) });
        self.capturing.store(false, std::sync::atomic::Ordering::Relaxed);
        let flags = if self.tuning.node_priority {
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
        } else {
            cudarc::driver::sys::CUgraphInstantiate_flags(0)
        };
        let end = self.stream.end_capture(flags);
        let kept = calls(None)?;
        body?;
        match end.map_err(|e| drv("ending graph capture", e))? {
            Some(g) => {
                if !kept.is_empty() {
                    self.worker.0.register(&kept)?;
                }
                Ok(Graph { graph: g, calls: kept, stream: self.stream.clone(), worker: self.worker.0.clone(), tickets: None })
            }
            None => Err(KernelError::Cuda("graph capture recorded nothing".into())),
        }
    }

    /// Empties the timeline's slots (`MXR_TIMELINE=1`), so that the next graph replay's
    /// kernels fill them from the first.
    pub fn timeline_reset(&self) -> Result<()> {
        match &self.timeline {
            Some(t) => t.reset(&self.stream),
            None => Err(KernelError::Cuda("the timeline is off: run with MXR_TIMELINE=1".into())),
        }
    }

    /// The kernels stamped since [`Gpu::timeline_reset`], named by the last capture.
    pub fn timeline_read(&self) -> Result<Vec<Stamp>> {
        match &self.timeline {
            Some(t) => t.read(&self.stream),
            None => Err(KernelError::Cuda("the timeline is off: run with MXR_TIMELINE=1".into())),
        }
    }

    pub(crate) fn blas(&self) -> &cudarc::cublas::CudaBlas {
        &self.blas
    }
}

/// A raw driver call's status as a Result, the error naming `what`.
pub(super) fn cu_ok(what: &str, r: cudarc::driver::sys::CUresult) -> Result<()> {
    r.result().map_err(|e| drv(what, e))
}

/// The stream-ordered allocator returns freed memory to the driver at every
/// synchronisation by default, so the next large allocation maps fresh pages (milliseconds
/// for the prefill's activations, which are freed and allocated again each layer). Keep
/// freed memory in the pool instead; it is reused by later allocations.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::{result, sys};
    ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
    // SAFETY: the device comes from a live context; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device()).map_err(|e| drv("getting the memory pool", e))?;
        let mut keep = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(|e| drv("setting the memory pool's release threshold", e))
    }
}

pub(crate) fn drv(what: &str, e: cudarc::driver::DriverError) -> KernelError {
    KernelError::Cuda(format!("{what}: {e}"))
}

fn oom_or(what: &str, bytes: usize, e: cudarc::driver::DriverError) -> KernelError {
    if format!("{e:?}").contains("OUT_OF_MEMORY") {
        KernelError::OutOfMemory { what: what.to_string(), bytes }
    } else {
        drv(what, e)
    }
}

#[cfg(test)]
mod tests {
    use super::Tuning;
    use mxr_quant::QType;

    /// The launcher gives a Q8_0 or Q4_K block room for its activation row and its warps'
    /// rings only when staging is on for the type, the columns are whole 256-column groups
    /// and it all fits 48 KiB; any other type, or wider rows, read global memory (0 bytes).
    #[test]
    fn matvec_stage_bytes_fit_the_block_rows() {
        let mut t = Tuning::from_env();
        t.matvec_staged = super::PIPELINE_Q8_0 | super::PIPELINE_Q4_K;
        t.matvec_stage = 0;
        assert_eq!(t.matvec_stage_bytes(QType::Q4K, 6144), 0);
        assert_eq!(t.matvec_stage_bytes(QType::Q8_0, 6144), 0);
        // per column: Q8_0 an int8 value and 1/8 of an f32 scale; Q4_K its block sums too
        for (q, chunk_row_bytes, eighths) in [(QType::Q4K, 1152, 10), (QType::Q8_0, 1088, 9)] {
            let (warps, rows) = t.matvec_shape(q);
            let warp_rows = (warps * rows) as usize;
            for stages in 1..=4u32 {
                t.matvec_stage = stages;
                let ring = warp_rows * stages as usize * chunk_row_bytes;
                assert_eq!(t.matvec_stage_bytes(q, 6144) as usize, 6144 * eighths / 8 + ring);
                assert_eq!(t.matvec_stage_bytes(QType::Q6K, 6144), 0);
                assert_eq!(t.matvec_stage_bytes(q, 6144 + 128), 0, "not whole 256-column groups");
                // the widest rows that fit, and one group of 256 more
                let fit = (48 * 1024 - ring) * 8 / eighths / 256 * 256;
                assert_eq!(t.matvec_stage_bytes(q, fit) as usize, fit * eighths / 8 + ring);
                assert_eq!(t.matvec_stage_bytes(q, fit + 256), 0);
            }
        }
        // a type left out of matvec_staged reads global memory
        t.matvec_staged = super::PIPELINE_Q4_K;
        assert_eq!(t.matvec_stage_bytes(QType::Q8_0, 6144), 0);
        assert!(t.matvec_stage_bytes(QType::Q4K, 6144) > 0);
    }

    /// Products over PCIe: no limit keeps one block per block of rows; a limit is shared
    /// among the blocks per x (pairs, matrices), never below one block per x nor above the
    /// blocks of rows there are.
    #[test]
    fn row_grid_shares_the_limit_among_pairs_and_matrices() {
        use super::row_grid;
        assert_eq!(row_grid(2304, 4, 0), 2304);
        // S2x32's gate and up share at 25%: 2 pairs x 2 matrices, 66 blocks in all
        assert_eq!(row_grid(2304, 4, 66), 16);
        assert_eq!(row_grid(2304, 2, 66), 33);
        assert_eq!(row_grid(10, 2, 66), 10);
        assert_eq!(row_grid(2304, 8, 5), 1);
        assert_eq!(row_grid(2304, 0, 66), 66);
        assert_eq!(row_grid(0, 2, 66), 0);
    }
}
