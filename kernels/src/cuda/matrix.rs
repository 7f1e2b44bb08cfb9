//! Weight matrices on the GPU. A [`GpuMatrix`] holds one matrix or a stack of equally
//! shaped experts, each expert starting on a 256-byte boundary. The layouts (formats.cuh):
//! Q8_0 and Q4_0 are repacked per expert into values then f16 scales, Q6_K blocks are
//! padded from 210 to 212 bytes, so that the kernels load aligned words; every other
//! type keeps ggml's bytes as in the file.

use std::mem::ManuallyDrop;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use mxr_quant::QType;

use super::placed::{HostPages, PlacedStack};
use super::{Gpu, Result};
use crate::KernelError;

const ALIGN: usize = 256;

/// The part of each matrix a product computes: rows 0..rows and columns 0..cols of its
/// layout ([`super::Gpu::matvec_part`]; the GPU's share of a cold expert's hidden units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub rows: usize,
    pub cols: usize,
}

impl Part {
    /// The whole matrix.
    pub fn whole(w: &GpuMatrix) -> Part {
        Part { rows: w.rows, cols: w.cols }
    }

    /// The columns a narrower part of a `q` matrix ends on a multiple of: whole blocks of
    /// the type, and of the 32 values the activations are quantized in.
    pub fn unit(q: QType) -> usize {
        q.block_size().max(32)
    }

    /// Whether the part lies in `w` and, if narrower, ends on a [`Part::unit`].
    pub(crate) fn check(self, op: &str, w: &GpuMatrix) -> Result<()> {
        self.check_in(op, w.qtype, w.rows, w.cols)
    }

    /// [`Part::check`] against a `rows` x `cols` matrix of type `q`.
    fn check_in(self, op: &str, q: QType, rows: usize, cols: usize) -> Result<()> {
        let unit = Part::unit(q);
        if self.rows > rows || self.cols > cols || (self.cols < cols && !self.cols.is_multiple_of(unit)) {
            return Err(KernelError::Shape(format!(
                "{op}: part {}x{} of a {rows}x{cols} {q} matrix (it must lie inside, and a narrower part end on {unit} columns)",
                self.rows, self.cols
            )));
        }
        Ok(())
    }
}

pub struct GpuMatrix {
    /// The weights; for a placed stack a view of its address range, which the stack (not
    /// this slice) frees.
    pub buf: ManuallyDrop<CudaSlice<u8>>,
    pub qtype: QType,
    /// Rows of one expert (of the whole matrix when `n_experts` is 1).
    pub rows: usize,
    pub cols: usize,
    pub n_experts: usize,
    /// Bytes from one expert to the next.
    pub stride: usize,
    /// Experts some in device and some in host memory ([`GpuMatrix::upload_placed`]).
    placed: Option<PlacedStack>,
}

impl Drop for GpuMatrix {
    fn drop(&mut self) {
        // SAFETY: buf is taken once, here, and not used again.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        if self.placed.is_some() {
            // the address range is the placed stack's to unmap and free (when it drops next)
            buf.leak();
        } else {
            drop(buf);
        }
    }
}

impl GpuMatrix {
    /// Uploads `data` (ggml bytes of `n_experts * rows` rows of `cols` values).
    pub fn upload(gpu: &Gpu, qtype: QType, n_experts: usize, rows: usize, cols: usize, data: &[u8]) -> Result<GpuMatrix> {
        let host = pack(qtype, n_experts, rows, cols, data)?;
        let stride = host.len() / n_experts.max(1);
        // An empty stack (every expert of a layer in host memory) holds no weights.
        let buf = if host.is_empty() { gpu.zeros::<u8>(ALIGN)? } else { gpu.upload(&host)? };
        Ok(GpuMatrix { buf: ManuallyDrop::new(buf), qtype, rows, cols, n_experts, stride, placed: None })
    }

    /// As [`GpuMatrix::upload`] for a stack of `n_experts` experts of which expert e stays
    /// in device memory when `on_gpu[e]` and in page-locked host memory otherwise, all
    /// behind one address range: the kernels read a host expert in place over PCIe. Each
    /// expert takes whole pages (2 MiB on current GPUs), so the stride is padded to them.
    pub fn upload_placed(gpu: &Gpu, qtype: QType, rows: usize, cols: usize, data: &[u8], on_gpu: &[bool]) -> Result<GpuMatrix> {
        let n_experts = on_gpu.len();
        let host = pack(qtype, n_experts, rows, cols, data)?;
        let each = host.len() / n_experts.max(1);
        let stack = PlacedStack::new(gpu, &host, each, on_gpu)?;
        // SAFETY: the range [ptr, ptr + len) stays mapped while `stack` lives, which is as
        // long as this matrix; Drop leaks the slice instead of freeing it.
        let buf = unsafe { gpu.stream.upgrade_device_ptr::<u8>(stack.ptr(), stack.len()) };
        Ok(GpuMatrix { buf: ManuallyDrop::new(buf), qtype, rows, cols, n_experts, stride: stack.stride(), placed: Some(stack) })
    }

    /// Bytes of page-locked host memory this matrix's experts take (a placed stack's cold
    /// experts; 0 for any other matrix).
    pub fn host_bytes(&self) -> usize {
        self.placed.as_ref().map_or(0, PlacedStack::host_bytes)
    }

    /// Of a placed stack whose type keeps the file's layout ([`as_in_file`]): the CPU's way
    /// to its experts in host pages, the same bytes as the file's. None for any other, or
    /// where the driver did not open the host pages to the CPU.
    pub fn host_pages(&self) -> Option<HostPages> {
        self.placed.as_ref().filter(|_| as_in_file(self.qtype)).and_then(PlacedStack::host_pages)
    }

    /// Of a placed stack ([`GpuMatrix::upload_placed`]): whether expert `e` is in device
    /// memory. None for any other matrix (or no such expert).
    pub fn placed_on_gpu(&self, e: usize) -> Option<bool> {
        self.placed.as_ref()?.on_gpu(e)
    }

    /// Of a placed stack: moves expert `e` into device memory (`to_gpu`) or page-locked
    /// host memory at the same address, so captured graphs stay valid
    /// ([`PlacedStack::relocate`]; waits for the GPU first).
    pub fn relocate_expert(&mut self, e: usize, to_gpu: bool) -> Result<()> {
        match self.placed.as_mut() {
            Some(p) => p.relocate(e, to_gpu),
            None => Err(KernelError::Shape("relocate_expert: not a placed stack (every expert is in device memory)".into())),
        }
    }

    /// A stack of `n_experts` experts whose weights are copied in afterwards, one by one,
    /// by [`GpuMatrix::file_bytes_mut`] (types the GPU keeps as in the file only). The
    /// side stream is ordered after the main stream's work queued so far.
    pub fn empty(gpu: &Gpu, qtype: QType, n_experts: usize, rows: usize, cols: usize) -> Result<GpuMatrix> {
        if !as_in_file(qtype) || !supported(qtype) {
            return Err(KernelError::Unsupported { what: "copying file bytes as they are", qtype });
        }
        let stride = gpu_bytes(qtype, rows, cols).div_ceil(ALIGN) * ALIGN;
        // every expert's bytes are copied in before use; the padding is never read
        let buf = gpu.alloc::<u8>((stride * n_experts).max(ALIGN))?;
        // the side stream's copies wait for this allocation (made on the main stream) only
        gpu.side_after_main()?;
        Ok(GpuMatrix { buf: ManuallyDrop::new(buf), qtype, rows, cols, n_experts, stride, placed: None })
    }

    /// Expert `e`'s device bytes, for the file's bytes to be copied in as they are
    /// ([`crate::cuda::host::CopyScope`]; types the GPU keeps as in the file only).
    pub fn file_bytes_mut(&mut self, e: usize) -> Result<CudaViewMut<'_, u8>> {
        let bytes = gpu_bytes(self.qtype, self.rows, self.cols);
        if e >= self.n_experts || !as_in_file(self.qtype) {
            return Err(KernelError::Shape(format!("file_bytes_mut: expert {e} of a {} stack of {}", self.qtype, self.n_experts)));
        }
        Ok(self.buf.slice_mut(e * self.stride..e * self.stride + bytes))
    }

    /// Replaces expert `e`'s weights with `data` (ggml bytes of one expert, `rows` rows
    /// of `cols` values, the stack's type), as `--expert-rebalance` does.
    pub fn write_expert(&mut self, gpu: &Gpu, e: usize, data: &[u8]) -> Result<()> {
        if e >= self.n_experts {
            return Err(KernelError::Shape(format!("write_expert: expert {e} of a stack of {}", self.n_experts)));
        }
        if self.placed.is_some() {
            return Err(KernelError::Shape("write_expert: a stack with experts in host memory is placed at upload".into()));
        }
        let host = pack(self.qtype, 1, self.rows, self.cols, data)?;
        if host.len() != self.stride {
            return Err(KernelError::Length { op: "write_expert", what: "packed expert", expected: self.stride, actual: host.len() });
        }
        gpu.write(&host, &mut self.buf.slice_mut(e * self.stride..(e + 1) * self.stride))
    }

    /// Device bytes of expert `e`.
    pub fn expert(&self, e: usize) -> CudaView<'_, u8> {
        self.buf.slice(e * self.stride..(e + 1) * self.stride)
    }

    /// Expert `e`'s values as 16-bit words, for a BF16 or F16 matrix: cuBLAS reads it as is.
    pub fn expert_u16(&self, e: usize) -> Option<CudaView<'_, u16>> {
        if !matches!(self.qtype, QType::BF16 | QType::F16) || e >= self.n_experts {
            return None;
        }
        // SAFETY: each expert holds rows * cols 2-byte values (checked at upload) from a
        // 256-byte aligned start; u16 has no invalid bit patterns.
        unsafe { self.expert(e).transmute::<u16>(self.rows * self.cols) }
    }

    /// Expert `e`'s values as f32, for an F32 matrix.
    pub fn expert_f32(&self, e: usize) -> Option<CudaView<'_, f32>> {
        if self.qtype != QType::F32 || e >= self.n_experts {
            return None;
        }
        // SAFETY: as for expert_u16, with 4-byte values; every bit pattern is a valid f32.
        unsafe { self.expert(e).transmute::<f32>(self.rows * self.cols) }
    }

    /// Bytes of device memory the weights take (a placed stack: its hot experts).
    pub fn bytes(&self) -> usize {
        self.placed.as_ref().map_or(self.buf.len(), PlacedStack::device_bytes)
    }

    /// Bytes one product reads from one expert's matrix.
    pub fn expert_bytes(&self) -> usize {
        gpu_bytes(self.qtype, self.rows, self.cols)
    }
}

/// The host image of the device buffer: experts padded to [`ALIGN`], Q8_0 repacked.
pub fn pack(qtype: QType, n_experts: usize, rows: usize, cols: usize, data: &[u8]) -> Result<Vec<u8>> {
    let row_bytes = qtype.row_bytes(cols).ok_or(KernelError::PartialBlock { op: "upload", qtype, n: cols, block: qtype.block_size() })?;
    let expert_bytes = row_bytes * rows;
    if data.len() != expert_bytes * n_experts {
        return Err(KernelError::Length { op: "upload", what: "weight bytes", expected: expert_bytes * n_experts, actual: data.len() });
    }
    if !supported(qtype) {
        return Err(KernelError::Unsupported { what: "GPU kernel", qtype });
    }
    let packed = gpu_bytes(qtype, rows, cols);
    let stride = packed.div_ceil(ALIGN) * ALIGN;
    let mut out = vec![0u8; stride * n_experts];
    for e in 0..n_experts {
        let (src, dst) = (&data[e * expert_bytes..(e + 1) * expert_bytes], &mut out[e * stride..e * stride + packed]);
        match qtype {
            QType::Q8_0 => split_blocks(src, 34, rows * cols, dst),
            QType::Q4_0 => split_blocks(src, 18, rows * cols / 2, dst),
            QType::Q6K => {
                for (b, d) in src.chunks_exact(210).zip(dst.chunks_exact_mut(212)) {
                    d[..210].copy_from_slice(b);
                }
            }
            _ => dst.copy_from_slice(src),
        }
    }
    Ok(out)
}

/// Whether the GPU layout of a type is the file's bytes (no repacking at upload).
pub fn as_in_file(q: QType) -> bool {
    !matches!(q, QType::Q8_0 | QType::Q4_0 | QType::Q6K)
}

/// Bytes of one rows x cols matrix in the GPU layout.
fn gpu_bytes(q: QType, rows: usize, cols: usize) -> usize {
    let canonical = q.row_bytes(cols).unwrap_or(0) * rows;
    if q == QType::Q6K {
        canonical / 210 * 212
    } else {
        canonical
    }
}

/// The types the GPU kernels read.
pub fn supported(q: QType) -> bool {
    matches!(q, QType::F32 | QType::F16 | QType::BF16 | QType::Q8_0 | QType::Q4_0 | QType::Q4K | QType::Q6K)
}

/// Blocks of (f16 d, payload) -> all payloads (`values` bytes), then all scales:
/// ggml's block_q8_0 (34 bytes) and block_q4_0 (18 bytes) as formats.cuh reads them.
fn split_blocks(src: &[u8], block: usize, values: usize, dst: &mut [u8]) {
    let payload = block - 2;
    let (vals, scales) = dst.split_at_mut(values);
    for (i, b) in src.chunks_exact(block).enumerate() {
        scales[2 * i..2 * i + 2].copy_from_slice(&b[..2]);
        vals[payload * i..payload * (i + 1)].copy_from_slice(&b[2..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_lies_inside_and_ends_on_whole_blocks() {
        let part = |rows, cols| Part { rows, cols };
        // a real q4_k down projection (6144 x 9216): the GPU's 3840 hidden units
        assert_eq!(Part::unit(QType::Q4K), 256);
        assert!(part(6144, 3840).check_in("t", QType::Q4K, 6144, 9216).is_ok());
        assert!(part(6144, 9216).check_in("t", QType::Q4K, 6144, 9216).is_ok(), "the whole matrix");
        assert!(part(0, 0).check_in("t", QType::Q4K, 6144, 9216).is_ok(), "nothing");
        let inside_a_block = part(6144, 3840 + 32).check_in("t", QType::Q4K, 6144, 9216).unwrap_err().to_string();
        assert!(inside_a_block.contains("t: part 6144x3872 of a 6144x9216 Q4_K matrix"), "{inside_a_block}");
        assert!(inside_a_block.contains("end on 256 columns"), "{inside_a_block}");
        assert!(part(6145, 256).check_in("t", QType::Q4K, 6144, 9216).is_err(), "rows past the matrix");
        assert!(part(10, 9216 + 256).check_in("t", QType::Q4K, 6144, 9216).is_err(), "columns past the matrix");
        // Q8_0 and the float types take 32 columns at a time (the activations' blocks);
        // a float matrix whose width is no multiple of 32 is taken whole
        assert_eq!((Part::unit(QType::Q8_0), Part::unit(QType::F32), Part::unit(QType::BF16)), (32, 32, 32));
        assert!(part(20, 64).check_in("t", QType::Q8_0, 37, 128).is_ok());
        assert!(part(20, 48).check_in("t", QType::Q8_0, 37, 128).is_err());
        assert!(part(1029, 64).check_in("t", QType::F32, 1030, 70).is_ok());
        assert!(part(1030, 70).check_in("t", QType::F32, 1030, 70).is_ok());
        assert!(part(1030, 69).check_in("t", QType::F32, 1030, 70).is_err());
    }

    #[test]
    fn q8_0_repack_moves_values_and_scales() {
        // 2 rows x 64 cols = 4 blocks; block i: d = [i, 0x3c], values = i*32 + j.
        let mut src = Vec::new();
        for i in 0..4u8 {
            src.extend_from_slice(&[i, 0x3c]);
            src.extend((0..32u8).map(|j| i * 32 + j));
        }
        let out = pack(QType::Q8_0, 1, 2, 64, &src).unwrap();
        assert_eq!(out.len(), 256);
        for i in 0..4usize {
            assert_eq!(&out[128 + 2 * i..128 + 2 * i + 2], &[i as u8, 0x3c]);
            assert_eq!(out[32 * i + 5], (i * 32 + 5) as u8);
        }
    }

    #[test]
    fn experts_are_aligned_and_sizes_checked() {
        let row = QType::Q4K.row_bytes(256).unwrap(); // 144
        let data: Vec<u8> = (0..3 * 5 * row).map(|i| i as u8).collect();
        let out = pack(QType::Q4K, 3, 5, 256, &data).unwrap();
        assert_eq!(out.len(), 3 * 768); // 720 bytes per expert, padded to 768
        assert_eq!(&out[768..768 + 5 * row], &data[5 * row..10 * row]);
        // Q4_0: nibbles of both blocks, then both scales
        let q4: Vec<u8> = (0..36u8).collect();
        let out = pack(QType::Q4_0, 1, 1, 64, &q4).unwrap();
        assert_eq!(&out[..16], &q4[2..18]);
        assert_eq!(&out[16..32], &q4[20..36]);
        assert_eq!(&out[32..36], &[0, 1, 18, 19]);
        // Q6_K: 210-byte blocks in 212-byte slots
        let q6: Vec<u8> = (0..420).map(|i| (i % 251) as u8).collect();
        let out = pack(QType::Q6K, 1, 1, 512, &q6).unwrap();
        assert_eq!(&out[..210], &q6[..210]);
        assert_eq!(&out[212..422], &q6[210..]);
        assert!(pack(QType::Q4K, 3, 5, 256, &data[1..]).is_err());
        assert!(pack(QType::Q4_0, 1, 1, 31, &[0; 18]).is_err());
        assert!(pack(QType::Q8K, 1, 1, 256, &[0; 292]).is_err());
    }
}
