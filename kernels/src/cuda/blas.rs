//! Dense products on tensor cores through cuBLAS: bf16 inputs, f32 accumulation and output.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{Gpu, Result};
use crate::KernelError;

impl Gpu {
    /// y[t, r] = Σ_c W[r, c] · x[t, c]: W [rows, cols] bf16 (row-major, ggml order),
    /// x [n, cols] bf16, y [n, rows] f32.
    pub fn gemm_bf16(
        &self,
        w: &CudaView<'_, u16>,
        x: &CudaView<'_, u16>,
        y: &mut CudaViewMut<'_, f32>,
        rows: usize,
        cols: usize,
        n: usize,
    ) -> Result<()> {
        let check = |what, expected: usize, actual: usize| {
            if actual < expected {
                Err(KernelError::Length { op: "gemm_bf16", what, expected, actual })
            } else {
                Ok(())
            }
        };
        check("w", rows * cols, w.len())?;
        check("x", n * cols, x.len())?;
        check("y", n * rows, y.len())?;
        let dim = |v: usize| i32::try_from(v).map_err(|_| KernelError::Shape(format!("gemm_bf16: dimension {v} exceeds cuBLAS's int")));
        let (m, nn, k) = (dim(rows)?, dim(n)?, dim(cols)?);
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1f32, 0f32);
        let stream = &self.stream;
        let (wp, _w) = w.device_ptr(stream);
        let (xp, _x) = x.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        // Column-major view: W is [cols, rows] with ld cols, so C[rows, n] = Wᵀ · X.
        // SAFETY: pointers are live device allocations of at least the sizes checked above,
        // and cuBLAS runs on our stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas().handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                nn,
                k,
                &alpha as *const f32 as *const _,
                wp as *const _,
                cudaDataType::CUDA_R_16BF,
                k,
                xp as *const _,
                cudaDataType::CUDA_R_16BF,
                k,
                &beta as *const f32 as *const _,
                yp as *mut _,
                cudaDataType::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| KernelError::Cuda(format!("cuBLAS gemm [{rows}x{cols}] x {n}: {e:?}")))
    }
}
