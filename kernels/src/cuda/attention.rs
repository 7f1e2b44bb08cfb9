//! The softmax layers' KV cache on the GPU and the attention launchers over it.
//!
//! A cache holds f32 (exact: the CPU's own values), bf16 (half the memory and bandwidth;
//! attention then runs on tensor cores, `flash.cu`) or q8_0 (a little over a quarter:
//! int8 values and one scale per 32, dequantized to bf16 tiles inside the same kernels). Appends round f32 keys and values to
//! the cache's type on the GPU; copies to and from the host convert likewise. The
//! tensor-core kernels and `kv_append_roped` apply partial RoPE themselves, from a table of
//! the batch's rotations (`rope_table`); the f32 kernels take rotated q and k.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use mxr_quant::convert::{bf16_to_f32, f32_to_bf16};

use super::ops::{grid1, int, launch, launch_on, need};
use super::pages::PagedBuf;
use super::tma;
use super::{drv, Gpu, Result, Source};
use crate::KernelError;

/// Element type of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F32,
    Bf16,
    /// ggml's q8_0 blocks of 32 (d = max|x| / 127 rounded to f16, q = round(x / d)), held
    /// as two planes: int8 values, and each block's d as an f32 (4 bytes, so that a head's
    /// scales load as one aligned 4/8/16-byte copy): 36 bytes per 32 values.
    Q8_0,
}

impl KvType {
    /// Bytes per element, scales included.
    pub fn bytes(self) -> f64 {
        match self {
            KvType::F32 => 4.0,
            KvType::Bf16 => 2.0,
            KvType::Q8_0 => 36.0 / 32.0,
        }
    }

    /// Bytes per element of the value plane.
    fn value_bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::Bf16 => 2,
            KvType::Q8_0 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::Bf16 => "bf16",
            KvType::Q8_0 => "q8_0",
        }
    }
}

/// One K or V cache: [rows, kv_dim] of its element type (bf16 as raw u16 bits; q8_0 as
/// int8 values plus a plane of f32 block scales), in device memory that grows in pages
/// behind a fixed address ([`PagedBuf`]): room is reserved for the capacity, memory
/// committed as positions are used ([`KvBuf::ensure`]).
pub struct KvBuf {
    buf: PagedBuf,
    /// q8_0: one f32 per 32 values
    scales: Option<PagedBuf>,
    t: KvType,
}

impl KvBuf {
    /// Elements backed by memory now.
    pub fn len(&self) -> usize {
        let n = self.buf.committed() / self.t.value_bytes();
        match &self.scales {
            Some(s) => n.min(s.committed() / 4 * 32),
            None => n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements it can grow to.
    pub fn capacity(&self) -> usize {
        self.buf.capacity() / self.t.value_bytes()
    }

    pub fn kv_type(&self) -> KvType {
        self.t
    }

    /// Commits memory for at least `elems` elements (a no-op when they are).
    pub fn ensure(&mut self, elems: usize) -> Result<()> {
        self.buf.ensure(elems * self.t.value_bytes())?;
        match self.scales.as_mut() {
            Some(s) => s.ensure(elems.div_ceil(32) * 4),
            None => Ok(()),
        }
    }

    fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// The scale plane (q8_0), else 0.
    fn scale_ptr(&self) -> u64 {
        self.scales.as_ref().map_or(0, PagedBuf::ptr)
    }
}

/// The rotations of partial NeoX RoPE for a batch's positions (`Gpu::rope_table`), for
/// the kernels that apply RoPE as they read q or append k (the tensor-core attention
/// kernels and `kv_append_roped`): the same values as `Gpu::rope` computes.
pub struct RopeTable {
    pub rotary_dim: usize,
    pub n_tokens: usize,
    /// (cos, sin) pairs, [n_tokens, rotary_dim / 2]
    cs: CudaSlice<f32>,
}

impl RopeTable {
    /// The kernels' (rd, cs) arguments: 0 and null without a table.
    fn args(t: Option<&RopeTable>) -> (i32, u64) {
        match t {
            Some(t) => (t.rotary_dim as i32, t.cs.device_ptr(t.cs.stream()).0),
            None => (0, 0),
        }
    }
}

/// K/V tile buffers per block of the tensor-core decode kernel by default. `mxr bench
/// --kernels` on an H200 (docs/PERF.md), 3 against 2: 1.18 ms against 1.67 ms at depth
/// 1,048,576 (87% against 61% of copy bandwidth), 97 us against 137 us at 65,536.
pub const DECODE_STAGES: usize = 3;

/// Shared memory of one multiprocessor that blocks can take (H100/H200: 227 KiB).
const SMEM_PER_SM: usize = 227 * 1024;

/// Shared memory of the tensor-core decode kernel: `stages` buffers of 64-key K and V
/// tiles, rows padded by 8 (FK, LD in flash.cu).
fn decode_smem(hd_class: usize, stages: usize) -> usize {
    flash_smem(KvType::Bf16, hd_class, stages)
}

/// Shared memory of a tensor-core attention kernel (flash.cu) with `stages` stage buffers
/// of 64-key K and V tiles: bf16 rows padded by 8 (FK, LD); q8_0 raw tiles (int8 values
/// and f32 scales, `KvQ8::stage_u16`) plus one converted bf16 tile pair.
fn flash_smem(t: KvType, hd_class: usize, stages: usize) -> usize {
    let bf16_pair = 2 * 64 * (hd_class + 8) * 2;
    match t {
        KvType::Q8_0 => stages * (2 * 64 * hd_class + 2 * 64 * (hd_class / 32) * 4) + bf16_pair,
        _ => stages * bf16_pair,
    }
}

/// One of the warpgroup (wgmma) prefill attention kernels of flash_wgmma.cu, for head size
/// 128 over a bf16 cache on sm_90. Every one gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgmmaKernel {
    /// Heads of one KV group per block, one warpgroup each (1, or 2 for an even group).
    pub heads: u32,
    /// K/V tile stages (2, or 3 with the next tile's scores issued before this tile's P V).
    pub stages: u32,
    /// The two warpgroups take turns issuing products (named barriers).
    pub pingpong: bool,
    /// A producer warpgroup copies the tiles, published through mbarriers, so the two
    /// consumer warpgroups need no block-wide barrier per tile.
    pub producer: bool,
    /// The producer copies with the Tensor Memory Accelerator (four 128-byte-swizzled boxes
    /// per stage): 0 (cp.async instead), 1, or 2 to multicast each tile to a cluster of two
    /// blocks (the two head pairs of a KV group's half; the group size must be a multiple
    /// of 4).
    pub tma: u32,
}

impl WgmmaKernel {
    /// Every kernel there is, the simplest first.
    pub const ALL: [WgmmaKernel; 9] = [
        WgmmaKernel { heads: 1, stages: 2, pingpong: false, producer: false, tma: 0 },
        WgmmaKernel { heads: 2, stages: 2, pingpong: false, producer: false, tma: 0 },
        WgmmaKernel { heads: 1, stages: 3, pingpong: false, producer: false, tma: 0 },
        WgmmaKernel { heads: 2, stages: 3, pingpong: false, producer: false, tma: 0 },
        WgmmaKernel { heads: 2, stages: 3, pingpong: true, producer: false, tma: 0 },
        WgmmaKernel { heads: 2, stages: 3, pingpong: false, producer: true, tma: 0 },
        WgmmaKernel { heads: 2, stages: 3, pingpong: true, producer: true, tma: 0 },
        WgmmaKernel { heads: 2, stages: 4, pingpong: false, producer: true, tma: 1 },
        WgmmaKernel { heads: 2, stages: 4, pingpong: false, producer: true, tma: 2 },
    ];

    fn name(self) -> Option<&'static str> {
        Some(match (self.heads, self.stages, self.pingpong, self.producer, self.tma) {
            (1, 2, false, false, 0) => "flash_wg_bf16_128",
            (2, 2, false, false, 0) => "flash_wg2_bf16_128",
            (1, 3, false, false, 0) => "flash_wgp_bf16_128",
            (2, 3, false, false, 0) => "flash_wgp2_bf16_128",
            (2, 3, true, false, 0) => "flash_wgpp2_bf16_128",
            (2, 3, false, true, 0) => "flash_wgs2_bf16_128",
            (2, 3, true, true, 0) => "flash_wgspp2_bf16_128",
            (2, 4, false, true, 1) => "flash_wgt2_bf16_128",
            (2, 4, false, true, 2) => "flash_wgtc2_bf16_128",
            _ => return None,
        })
    }

    /// Threads per block: a warpgroup per head, plus the producer's.
    fn threads(self) -> u32 {
        128 * (self.heads + self.producer as u32)
    }

    /// Dynamic shared memory: stages x (K, V) tiles of 8 groups of 8 keys x 16 core
    /// matrices 144 bytes apart, and the producer's 6 mbarriers.
    /// With TMA: stages x 32 KiB of swizzled tiles, 1 KiB to align them, 2 mbarriers per
    /// stage.
    fn smem(self) -> usize {
        if self.tma > 0 {
            return self.stages as usize * (32 << 10) + 1024 + self.stages as usize * 2 * 8;
        }
        self.stages as usize * 2 * (64 / 8) * 16 * 144 + if self.producer { 6 * 8 } else { 0 }
    }

    /// "2 heads/block, 3 stages, ping-pong, producer" and the like.
    pub fn label(self) -> String {
        let mut s = format!("{} heads/block, {} stages", self.heads, self.stages);
        if self.pingpong {
            s += ", ping-pong";
        }
        if self.producer {
            s += ", producer";
        }
        match self.tma {
            0 => {}
            1 => s += ", TMA",
            n => s += &format!(", TMA multicast x{n}"),
        }
        s
    }

    /// Whether the kernel takes GQA groups of `group` query heads per KV head.
    pub fn takes_group(self, group: usize) -> bool {
        let per = if self.tma > 1 { 2 * self.tma as usize } else { self.heads.max(1) as usize };
        group.is_multiple_of(per)
    }
}

/// The q8_0 cache's kernels take heads of whole 32-value blocks.
fn q8_head_dim(what: &str, hd: usize) -> Result<()> {
    if hd.is_multiple_of(32) && hd <= 128 {
        Ok(())
    } else {
        Err(KernelError::Shape(format!("{what}: head_dim {hd} over a q8_0 KV cache (multiples of 32 up to 128; use --kv-type bf16)")))
    }
}

impl Gpu {
    /// The launch of a flash.cu kernel (4 warps) over `grid` with `smem` bytes of dynamic
    /// shared memory, which the kernel is allowed first.
    fn flash_cfg(&self, source: Source, name: &'static str, smem: usize, grid: (u32, u32, u32)) -> Result<LaunchConfig> {
        self.function(source, name)?
            .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| drv(name, e))?;
        Ok(LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 })
    }

    /// A cache with room for `n` elements, `committed` of them backed by (zeroed) memory.
    pub fn kv_reserve(&self, t: KvType, n: usize, committed: usize) -> Result<KvBuf> {
        let scales = match t {
            KvType::Q8_0 => Some(PagedBuf::reserve(self, n.div_ceil(32) * 4)?),
            _ => None,
        };
        let mut b = KvBuf { buf: PagedBuf::reserve(self, n * t.value_bytes())?, scales, t };
        b.ensure(committed)?;
        Ok(b)
    }

    /// A cache of `n` elements, all backed by zeroed memory.
    pub fn kv_zeros(&self, t: KvType, n: usize) -> Result<KvBuf> {
        self.kv_reserve(t, n, n)
    }

    /// The first `n` elements as f32 (bf16 widens exactly; q8_0 gives q * d).
    pub fn kv_download(&self, b: &KvBuf, n: usize) -> Result<Vec<f32>> {
        need("kv_download", "cache", n, b.len())?;
        let mut bytes = vec![0u8; n * b.t.value_bytes()];
        b.buf.read(self, 0, &mut bytes)?;
        let f32s = |bytes: &[u8]| -> Vec<f32> { bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect() };
        Ok(match (b.t, &b.scales) {
            (KvType::Q8_0, Some(sc)) => {
                let mut d = vec![0u8; n.div_ceil(32) * 4];
                sc.read(self, 0, &mut d)?;
                let d = f32s(&d);
                bytes.iter().enumerate().map(|(i, &q)| q as i8 as f32 * d[i / 32]).collect()
            }
            (KvType::Bf16, _) => bytes.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            _ => f32s(&bytes),
        })
    }

    /// Writes `src` into the first src.len() elements (bf16: rounded to nearest even, as
    /// kv_append does; q8_0: quantized in blocks of 32 as kv_append does, so that a cache
    /// read back and written again is unchanged), committing memory as needed.
    pub fn kv_write(&self, src: &[f32], b: &mut KvBuf) -> Result<()> {
        if src.len() > b.capacity() {
            return Err(KernelError::Length { op: "kv_write", what: "cache", expected: src.len(), actual: b.capacity() });
        }
        match (b.t, b.scales.as_mut()) {
            (KvType::Q8_0, Some(sc)) => {
                if !src.len().is_multiple_of(32) {
                    return Err(KernelError::Length {
                        op: "kv_write q8_0",
                        what: "values (whole blocks of 32)",
                        expected: src.len().next_multiple_of(32),
                        actual: src.len(),
                    });
                }
                let blocks = crate::cpu::ggml::quantize_chunk(mxr_quant::QType::Q8_0, src, 32)?;
                // ggml's block: f16 d, then 32 int8
                let (mut q, mut d) = (Vec::with_capacity(src.len()), Vec::with_capacity(src.len() / 8));
                for blk in blocks.chunks_exact(34) {
                    d.extend(mxr_quant::convert::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])).to_le_bytes());
                    q.extend_from_slice(&blk[2..]);
                }
                b.buf.write(self, 0, &q)?;
                sc.write(self, 0, &d)
            }
            (KvType::Bf16, _) => b.buf.write(self, 0, &src.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect::<Vec<u8>>()),
            _ => b.buf.write(self, 0, &src.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
        }
    }

    /// cache[*pos + t, :] = src[t, :] for t < n_tokens; `pos_host` is the value *pos holds
    /// (checked here, read by the kernel on the GPU).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        src: &CudaView<'_, f32>,
        cache: &mut KvBuf,
        pos: &CudaSlice<i32>,
        pos_host: usize,
        n_tokens: usize,
        width: usize,
    ) -> Result<()> {
        need("kv_append", "src", n_tokens * width, src.len())?;
        need("kv_append", "cache", (pos_host + n_tokens) * width, cache.len())?;
        let (n, w) = (int("kv_append", n_tokens)?, int("kv_append", width)?);
        int("kv_append", (pos_host + n_tokens) * width)?;
        let cfg = grid1(n_tokens * width, 256);
        let (c, cd) = (cache.ptr(), cache.scale_ptr());
        match cache.t {
            KvType::F32 => launch!(self, Source::Attention, "kv_append_f32", cfg, src, &c, pos, &n, &w),
            KvType::Bf16 => launch!(self, Source::Attention, "kv_append_bf16", cfg, src, &c, pos, &n, &w),
            KvType::Q8_0 => {
                if !width.is_multiple_of(32) {
                    return Err(KernelError::Shape(format!("kv_append: width {width} over a q8_0 cache (whole blocks of 32)")));
                }
                launch!(self, Source::Attention, "kv_append_plain_q8", cfg, src, &c, &cd, pos, &n, &w)
            }
        }
    }

    /// The rotation table of partial NeoX RoPE (rotary_dim of each head rotated, pairs
    /// (i, i + rotary_dim / 2)) for positions *pos .. *pos + n_tokens.
    pub fn rope_table(&self, n_tokens: usize, rotary_dim: usize, theta: f64, pos: &CudaSlice<i32>) -> Result<RopeTable> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(KernelError::Shape(format!("rope_table: rotary_dim {rotary_dim} (a positive even number)")));
        }
        let n = n_tokens * rotary_dim / 2;
        let mut cs = self.alloc::<f32>(2 * n)?;
        if n > 0 {
            let (nt, rd) = (int("rope_table", n_tokens)?, int("rope_table", rotary_dim)?);
            launch!(self, Source::Attention, "rope_table", grid1(n, 256), &mut cs, &nt, &rd, &theta, pos)?;
        }
        Ok(RopeTable { rotary_dim, n_tokens, cs })
    }

    /// [`Gpu::kv_append`] of keys rotated by `rope` on the way in (heads of `head_dim`):
    /// the cache holds what `rope` and then `kv_append` would put there.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append_roped(
        &self,
        src: &CudaView<'_, f32>,
        cache: &mut KvBuf,
        pos: &CudaSlice<i32>,
        pos_host: usize,
        (n_tokens, width, head_dim): (usize, usize, usize),
        rope: &RopeTable,
    ) -> Result<()> {
        need("kv_append_roped", "src", n_tokens * width, src.len())?;
        need("kv_append_roped", "cache", (pos_host + n_tokens) * width, cache.len())?;
        need("kv_append_roped", "rope table", n_tokens, rope.n_tokens)?;
        if head_dim == 0 || !width.is_multiple_of(head_dim) || rope.rotary_dim > head_dim {
            return Err(KernelError::Shape(format!("kv_append_roped: width {width}, head_dim {head_dim}, rotary_dim {}", rope.rotary_dim)));
        }
        let (n, w, hd) = (int("kv_append_roped", n_tokens)?, int("kv_append_roped", width)?, head_dim as i32);
        int("kv_append_roped", (pos_host + n_tokens) * width)?;
        let (rd, cs) = RopeTable::args(Some(rope));
        let cfg = grid1(n_tokens * width, 256);
        let (c, cd) = (cache.ptr(), cache.scale_ptr());
        match cache.t {
            KvType::F32 => launch!(self, Source::Attention, "kv_append_rope_f32", cfg, src, &c, pos, &n, &w, &hd, &rd, &cs),
            KvType::Bf16 => launch!(self, Source::Attention, "kv_append_rope_bf16", cfg, src, &c, pos, &n, &w, &hd, &rd, &cs),
            KvType::Q8_0 => {
                q8_head_dim("kv_append_roped", head_dim)?;
                launch!(self, Source::Attention, "kv_append_rope_q8", cfg, src, &c, &cd, pos, &n, &w, &hd, &rd, &cs)
            }
        }
    }

    /// Causal GQA attention of n_tokens queries at positions *pos.. over caches holding
    /// keys and values of positions 0..*pos + n_tokens (`pos_host` = *pos, for the checks).
    /// f32 caches: the exact SIMT kernel (f32 throughout); bf16 caches: tensor cores (q and
    /// the probabilities rounded to bf16, f32 accumulation); head size 128 on an sm_90 GPU
    /// takes the warpgroup kernel ([`Gpu::attend_wgmma`]) unless `MXR_FLASH_WGMMA=0`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &CudaView<'_, f32>,
        kc: &KvBuf,
        vc: &KvBuf,
        out: &mut CudaViewMut<'_, f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        hd: usize,
        pos: &CudaSlice<i32>,
        pos0: usize,
        rope: Option<&RopeTable>,
    ) -> Result<()> {
        let fits = kc.t == KvType::Bf16 && hd == 128 && Source::FlashWgmma.target(self.arch).is_ok();
        let heads = match self.tuning.flash_wgmma {
            2 if fits && n_kv_heads > 0 && (n_heads / n_kv_heads).is_multiple_of(2) => 2,
            1 | 2 if fits => 1,
            _ => 0,
        };
        let stages = self.tuning.flash_stages;
        let two_three = heads == 2 && stages == 3;
        let mut k = WgmmaKernel {
            heads,
            stages,
            pingpong: self.tuning.flash_pingpong && two_three,
            producer: self.tuning.flash_producer && two_three,
            tma: 0,
        };
        if k.producer && !k.pingpong && self.tuning.flash_tma > 0 {
            let t = WgmmaKernel { stages: 4, tma: self.tuning.flash_tma, ..k };
            if t.takes_group(n_heads / n_kv_heads) {
                k = t;
            }
        }
        self.attend_on(q, kc, vc, out, (n_tokens, n_heads, n_kv_heads, hd), (pos, pos0), rope, (heads > 0).then_some(k))
    }

    /// [`Gpu::attend`] on Hopper's warpgroup tensor cores with the kernel `k`
    /// (flash_wgmma.cu): bf16 caches, head size 128, an sm_90 GPU, a GQA group that `k`'s
    /// heads per block divide; anything else is refused. The same arithmetic as the mma.sync
    /// kernel up to the order of the f32 sums; every kernel gives the same bits.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_wgmma(
        &self,
        q: &CudaView<'_, f32>,
        kc: &KvBuf,
        vc: &KvBuf,
        out: &mut CudaViewMut<'_, f32>,
        (n_tokens, n_heads, n_kv_heads, hd): (usize, usize, usize, usize),
        (pos, pos0): (&CudaSlice<i32>, usize),
        rope: Option<&RopeTable>,
        k: WgmmaKernel,
    ) -> Result<()> {
        Source::FlashWgmma.target(self.arch)?;
        if kc.t != KvType::Bf16 || hd != 128 {
            return Err(KernelError::Shape(format!("wgmma attention: a bf16 cache and head size 128 (got {} and {hd})", kc.t.name())));
        }
        let group_ok = n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads) && k.takes_group(n_heads / n_kv_heads);
        if k.name().is_none() || !group_ok {
            return Err(KernelError::Shape(format!(
                "wgmma attention: no kernel for {} over {n_heads} query heads and {n_kv_heads} KV heads",
                k.label()
            )));
        }
        self.attend_on(q, kc, vc, out, (n_tokens, n_heads, n_kv_heads, hd), (pos, pos0), rope, Some(k))
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_on(
        &self,
        q: &CudaView<'_, f32>,
        kc: &KvBuf,
        vc: &KvBuf,
        out: &mut CudaViewMut<'_, f32>,
        (n_tokens, n_heads, n_kv_heads, hd): (usize, usize, usize, usize),
        (pos, pos0): (&CudaSlice<i32>, usize),
        rope: Option<&RopeTable>,
        wgmma: Option<WgmmaKernel>,
    ) -> Result<()> {
        let hd_class = match hd {
            1..=32 => 32,
            33..=64 => 64,
            65..=128 => 128,
            _ => return Err(KernelError::Shape(format!("attention: head_dim {hd} (the GPU kernel takes up to 128)"))),
        };
        let max_group = if kc.kv_type() == KvType::F32 { 8 } else { usize::MAX };
        if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || n_heads / n_kv_heads > max_group {
            return Err(KernelError::Shape(format!(
                "attention: {n_heads} query heads over {n_kv_heads} KV heads (the f32 prefill kernel takes groups of at most 8)"
            )));
        }
        need("attend", "q", n_tokens * n_heads * hd, q.len())?;
        need("attend", "k cache", (pos0 + n_tokens) * n_kv_heads * hd, kc.len())?;
        need("attend", "v cache", (pos0 + n_tokens) * n_kv_heads * hd, vc.len())?;
        need("attend", "out", n_tokens * n_heads * hd, out.len())?;
        if n_tokens == 0 {
            return Ok(());
        }
        int("attend", (pos0 + n_tokens) * n_kv_heads * hd)?;
        let (h, kvh, nt, d, scale) = (n_heads as i32, n_kv_heads as i32, int("attend", n_tokens)?, hd as i32, 1.0 / (hd as f32).sqrt());
        if kc.t != vc.t {
            return Err(KernelError::Shape("attention: K and V caches of different types".into()));
        }
        let (k, v) = (kc.ptr(), vc.ptr());
        if let Some(r) = rope {
            if kc.t == KvType::F32 || r.n_tokens != n_tokens || r.rotary_dim > hd {
                return Err(KernelError::Shape(
                    "attention: RoPE is fused into the tensor-core kernels only, with a table for these tokens".into(),
                ));
            }
        }
        let (rd, cs) = RopeTable::args(rope);
        match kc.t {
            KvType::F32 => {
                let name = match hd_class {
                    32 => "attend_32",
                    64 => "attend_64",
                    _ => "attend_128",
                };
                let group = (n_heads / n_kv_heads) as u32;
                let cfg = LaunchConfig {
                    // 4 queries per block (QT in attention.cu)
                    grid_dim: ((n_tokens as u32).div_ceil(4), n_kv_heads as u32, 1),
                    block_dim: (32 * group, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch!(self, Source::Attention, name, cfg, q, &k, &v, out, &h, &kvh, &nt, &d, pos, &scale)
            }
            KvType::Bf16 => {
                let name = match hd_class {
                    32 => "flash_bf16_32",
                    64 => "flash_bf16_64",
                    _ => "flash_bf16_128",
                };
                if !hd.is_multiple_of(8) {
                    return Err(KernelError::Shape(format!(
                        "attention: head_dim {hd} over a bf16 KV cache (the tensor-core kernel takes multiples of 8; use --kv-type f32)"
                    )));
                }
                // two stages of 64-key K and V tiles; 64 queries per block (FQ in flash.cu),
                // heads fastest
                let grid = (n_heads as u32, (n_tokens as u32).div_ceil(64), 1);
                if let Some(w) = wgmma {
                    // the same tiles in the core-matrix layout; one warpgroup per head,
                    // `w.heads` heads of one KV group per block
                    let name = w.name().ok_or_else(|| KernelError::Shape(format!("wgmma attention: no kernel for {}", w.label())))?;
                    let mut cfg = self.flash_cfg(Source::FlashWgmma, name, w.smem(), (grid.0 / w.heads.max(1), grid.1, 1))?;
                    cfg.block_dim.0 = w.threads();
                    if w.tma > 0 {
                        // maps over the positions filled so far (the causal tiles read no further)
                        let tk = tma::kv_map(k, hd, n_kv_heads, pos0 + n_tokens)?;
                        let tv = tma::kv_map(v, hd, n_kv_heads, pos0 + n_tokens)?;
                        return launch!(
                            self,
                            Source::FlashWgmma,
                            name,
                            cfg,
                            q,
                            &k,
                            &v,
                            out,
                            &h,
                            &kvh,
                            &nt,
                            &d,
                            pos,
                            &scale,
                            &rd,
                            &cs,
                            &tk,
                            &tv
                        );
                    }
                    return launch!(self, Source::FlashWgmma, name, cfg, q, &k, &v, out, &h, &kvh, &nt, &d, pos, &scale, &rd, &cs);
                }
                let cfg = self.flash_cfg(Source::Flash, name, flash_smem(KvType::Bf16, hd_class, 2), grid)?;
                launch!(self, Source::Flash, name, cfg, q, &k, &v, out, &h, &kvh, &nt, &d, pos, &scale, &rd, &cs)
            }
            KvType::Q8_0 => {
                q8_head_dim("attention", hd)?;
                let name = match hd_class {
                    32 => "flash_q8_32",
                    64 => "flash_q8_64",
                    _ => "flash_q8_128",
                };
                let grid = (n_heads as u32, (n_tokens as u32).div_ceil(64), 1);
                let cfg = self.flash_cfg(Source::Flash, name, flash_smem(KvType::Q8_0, hd_class, 2), grid)?;
                let (kd, vd) = (kc.scale_ptr(), vc.scale_ptr());
                launch!(self, Source::Flash, name, cfg, q, &k, &v, &kd, &vd, out, &h, &kvh, &nt, &d, pos, &scale, &rd, &cs)
            }
        }
    }

    /// The key-split count for decode attention over a cache of `capacity` positions and
    /// `n_kv_heads` KV heads, with the default pipeline depth ([`DECODE_STAGES`]).
    pub fn decode_splits(&self, capacity: usize, n_kv_heads: usize) -> usize {
        self.decode_splits_staged(capacity, n_kv_heads, DECODE_STAGES)
    }

    /// The key-split count for `stages` buffers per block: one wave of blocks (as many per
    /// multiprocessor as the tensor-core kernel's shared memory allows at head size 128),
    /// fewer for short caches (at least 128 positions per split). Fixed per cache, so that
    /// one captured decode graph serves every position; few splits keep the combining pass
    /// short.
    pub fn decode_splits_staged(&self, capacity: usize, n_kv_heads: usize, stages: usize) -> usize {
        let per_sm = (SMEM_PER_SM / (decode_smem(128, stages) + 1024)).max(1);
        let wave = (self.info().sm_count.max(1) as usize * per_sm).div_ceil(n_kv_heads.max(1));
        wave.min(capacity.div_ceil(128)).clamp(1, 256)
    }

    /// Attention of one query at position *pos (decode) over the caches, split over the
    /// keys into `splits` parts scanned in parallel, then combined. `splits` must not
    /// depend on the position when the call is captured into a graph.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_decode(
        &self,
        q: &CudaView<'_, f32>,
        kc: &KvBuf,
        vc: &KvBuf,
        out: &mut CudaViewMut<'_, f32>,
        n_heads: usize,
        n_kv_heads: usize,
        hd: usize,
        pos: &CudaSlice<i32>,
        pos_host: usize,
        splits: usize,
        rope: Option<&RopeTable>,
    ) -> Result<()> {
        self.attend_decode_staged(q, kc, vc, out, (n_heads, n_kv_heads, hd), (pos, pos_host), splits, DECODE_STAGES, rope)
    }

    /// [`Gpu::attend_decode`] with `stages` (2 or 3) K/V tile buffers per block in the
    /// tensor-core kernel (bf16 caches): `stages - 1` tiles load while one is used.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_decode_staged(
        &self,
        q: &CudaView<'_, f32>,
        kc: &KvBuf,
        vc: &KvBuf,
        out: &mut CudaViewMut<'_, f32>,
        (n_heads, n_kv_heads, hd): (usize, usize, usize),
        (pos, pos_host): (&CudaSlice<i32>, usize),
        splits: usize,
        stages: usize,
        rope: Option<&RopeTable>,
    ) -> Result<()> {
        let name = match (kc.kv_type(), hd) {
            (KvType::F32, 1..=32) => "attend_split_f32_32",
            (KvType::F32, 33..=64) => "attend_split_f32_64",
            (KvType::F32, 65..=128) => "attend_split_f32_128",
            (KvType::Bf16, 1..=32) => "attend_split_bf16_32",
            (KvType::Bf16, 33..=64) => "attend_split_bf16_64",
            (KvType::Bf16, 65..=128) => "attend_split_bf16_128",
            // tensor cores only (below)
            (KvType::Q8_0, _) => q8_head_dim("decode attention", hd).map(|_| "")?,
            _ => return Err(KernelError::Shape(format!("attention: head_dim {hd} (the GPU kernel takes up to 128)"))),
        };
        if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || n_heads / n_kv_heads > 16 {
            return Err(KernelError::Shape(format!("attention: {n_heads} query heads over {n_kv_heads} KV heads (groups of at most 16)")));
        }
        let splits = splits.clamp(1, 1024);
        need("attend_decode", "q", n_heads * hd, q.len())?;
        need("attend_decode", "k cache", (pos_host + 1) * n_kv_heads * hd, kc.len())?;
        need("attend_decode", "v cache", (pos_host + 1) * n_kv_heads * hd, vc.len())?;
        need("attend_decode", "out", n_heads * hd, out.len())?;
        int("attend_decode", (pos_host + 1) * n_kv_heads * hd)?;
        let mut part = self.alloc::<f32>(n_heads * splits * (hd + 2))?;
        let group = (n_heads / n_kv_heads) as u32;
        let cfg = LaunchConfig { grid_dim: (n_kv_heads as u32, splits as u32, 1), block_dim: (32 * group, 1, 1), shared_mem_bytes: 0 };
        let (h, kvh, d, scale) = (n_heads as i32, n_kv_heads as i32, hd as i32, 1.0 / (hd as f32).sqrt());
        if kc.t != vc.t {
            return Err(KernelError::Shape("attention: K and V caches of different types".into()));
        }
        let (k, v) = (kc.ptr(), vc.ptr());
        let tensor_cores = (kc.t == KvType::Bf16 && hd.is_multiple_of(8)) || kc.t == KvType::Q8_0;
        if rope.is_some_and(|r| !tensor_cores || r.n_tokens != 1 || r.rotary_dim > hd) {
            return Err(KernelError::Shape(
                "decode attention: RoPE is fused into the tensor-core kernel only, with a one-token table".into(),
            ));
        }
        let (rd, cs) = RopeTable::args(rope);
        if tensor_cores {
            // tensor cores: the group's heads are the rows of one tile (flash.cu)
            let hd_class = match hd {
                1..=32 => 32usize,
                33..=64 => 64,
                _ => 128,
            };
            let q8 = kc.t == KvType::Q8_0;
            let name = match (stages, hd_class, q8) {
                (2, 32, false) => "flash_decode_bf16_32",
                (2, 64, false) => "flash_decode_bf16_64",
                (2, _, false) => "flash_decode_bf16_128",
                (3, 32, false) => "flash_decode3_bf16_32",
                (3, 64, false) => "flash_decode3_bf16_64",
                (3, _, false) => "flash_decode3_bf16_128",
                (2, 32, true) => "flash_decode_q8_32",
                (2, 64, true) => "flash_decode_q8_64",
                (2, _, true) => "flash_decode_q8_128",
                (3, 32, true) => "flash_decode3_q8_32",
                (3, 64, true) => "flash_decode3_q8_64",
                (3, _, true) => "flash_decode3_q8_128",
                _ => return Err(KernelError::Shape(format!("decode attention: {stages} stages (2 or 3)"))),
            };
            let cfg = self.flash_cfg(Source::Flash, name, flash_smem(kc.t, hd_class, stages), (n_kv_heads as u32, splits as u32, 1))?;
            if q8 {
                let (kd, vd) = (kc.scale_ptr(), vc.scale_ptr());
                launch!(self, Source::Flash, name, cfg, q, &k, &v, &kd, &vd, &mut part, &h, &kvh, &d, pos, &scale, &rd, &cs)?;
            } else {
                launch!(self, Source::Flash, name, cfg, q, &k, &v, &mut part, &h, &kvh, &d, pos, &scale, &rd, &cs)?;
            }
        } else {
            launch!(self, Source::Attention, name, cfg, q, &k, &v, &mut part, &h, &kvh, &d, pos, &scale)?;
        }
        let cfg = LaunchConfig { grid_dim: (n_heads as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let sp = splits as i32;
        launch!(self, Source::Attention, "attend_combine", cfg, &part, &sp, &d, out)
    }
}
