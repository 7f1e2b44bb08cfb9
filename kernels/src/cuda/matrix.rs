//! Weight matrices on the GPU. A [`GpuMatrix`] holds one matrix or a stack of equally
//! shaped experts, each expert starting on a 256-byte boundary. The bytes are ggml's blocks
//! as in the file, except Q8_0, which is repacked per expert into int8 values [rows][cols]
//! then f16 scales [rows][cols/32] (formats.cuh), so the kernels load 16 aligned bytes.

use cudarc::driver::{CudaSlice, CudaView};
use mxr_quant::QType;

use super::{Gpu, Result};
use crate::KernelError;

const ALIGN: usize = 256;

pub struct GpuMatrix {
    pub buf: CudaSlice<u8>,
    pub qtype: QType,
    /// Rows of one expert (of the whole matrix when `n_experts` is 1).
    pub rows: usize,
    pub cols: usize,
    pub n_experts: usize,
    /// Bytes from one expert to the next.
    pub stride: usize,
}

impl GpuMatrix {
    /// Uploads `data` (ggml bytes of `n_experts * rows` rows of `cols` values).
    pub fn upload(gpu: &Gpu, qtype: QType, n_experts: usize, rows: usize, cols: usize, data: &[u8]) -> Result<GpuMatrix> {
        let host = pack(qtype, n_experts, rows, cols, data)?;
        let stride = host.len() / n_experts.max(1);
        Ok(GpuMatrix { buf: gpu.upload(&host)?, qtype, rows, cols, n_experts, stride })
    }

    /// Device bytes of expert `e`.
    pub fn expert(&self, e: usize) -> CudaView<'_, u8> {
        self.buf.slice(e * self.stride..(e + 1) * self.stride)
    }

    /// The values as 16-bit words, for a single BF16 (or F16) matrix: cuBLAS reads it as is.
    pub fn as_u16(&self) -> Option<CudaView<'_, u16>> {
        if !matches!(self.qtype, QType::BF16 | QType::F16) || self.n_experts != 1 {
            return None;
        }
        let n = self.rows * self.cols;
        // SAFETY: the buffer holds at least rows * cols 2-byte values (checked at upload);
        // u16 has no invalid bit patterns.
        unsafe { self.buf.transmute::<u16>(n) }
    }

    /// The values as f32, for a single F32 matrix.
    pub fn as_f32(&self) -> Option<CudaView<'_, f32>> {
        if self.qtype != QType::F32 || self.n_experts != 1 {
            return None;
        }
        // SAFETY: the buffer holds at least rows * cols f32 values (checked at upload) and
        // is 256-byte aligned; every bit pattern is a valid f32.
        unsafe { self.buf.transmute::<f32>(self.rows * self.cols) }
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Bytes one product reads from one expert's matrix.
    pub fn expert_bytes(&self) -> usize {
        self.qtype.row_bytes(self.cols).unwrap_or(0) * self.rows
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
    let stride = expert_bytes.div_ceil(ALIGN) * ALIGN;
    let mut out = vec![0u8; stride * n_experts.max(1)];
    for e in 0..n_experts {
        let (src, dst) = (&data[e * expert_bytes..(e + 1) * expert_bytes], &mut out[e * stride..e * stride + expert_bytes]);
        if qtype == QType::Q8_0 {
            repack_q8_0(src, rows, cols, dst);
        } else {
            dst.copy_from_slice(src);
        }
    }
    Ok(out)
}

/// The types the GPU kernels read.
pub fn supported(q: QType) -> bool {
    matches!(q, QType::F32 | QType::F16 | QType::BF16 | QType::Q8_0 | QType::Q4_0 | QType::Q4K | QType::Q6K)
}

/// ggml block_q8_0 (f16 d, 32 x i8) -> values [rows][cols] then scales [rows][cols/32].
fn repack_q8_0(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    let blocks = cols / 32;
    let (values, scales) = dst.split_at_mut(rows * cols);
    for (i, b) in src.chunks_exact(34).enumerate() {
        scales[2 * i..2 * i + 2].copy_from_slice(&b[..2]);
        values[32 * i..32 * i + 32].copy_from_slice(&b[2..]);
    }
    debug_assert_eq!(src.len(), rows * blocks * 34);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let row = QType::Q4_0.row_bytes(32).unwrap(); // 18
        let data: Vec<u8> = (0..3 * 5 * row).map(|i| i as u8).collect();
        let out = pack(QType::Q4_0, 3, 5, 32, &data).unwrap();
        assert_eq!(out.len(), 3 * 256);
        assert_eq!(&out[256..256 + 5 * row], &data[5 * row..10 * row]);
        assert!(pack(QType::Q4_0, 3, 5, 32, &data[1..]).is_err());
        assert!(pack(QType::Q4_0, 1, 1, 31, &[0; 18]).is_err());
        assert!(pack(QType::Q8K, 1, 1, 256, &[0; 292]).is_err());
    }
}
