//! Dense products through cuBLAS: bf16 inputs on tensor cores, or f32 inputs in full f32
//! (no TF32); f32 accumulation and output either way.

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
        self.gemm(w, x, cudaDataType::CUDA_R_16BF, y, (rows, cols, n))
    }

    /// As [`Gpu::gemm_bf16`] with f32 W and x, computed in f32 (for full-precision weights:
    /// the router, F32 conversions).
    pub fn gemm_f32(
        &self,
        w: &CudaView<'_, f32>,
        x: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
        rows: usize,
        cols: usize,
        n: usize,
    ) -> Result<()> {
        self.gemm(w, x, cudaDataType::CUDA_R_32F, y, (rows, cols, n))
    }

    fn gemm<T>(
        &self,
        w: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        dtype: cudaDataType,
        y: &mut CudaViewMut<'_, f32>,
        shape: (usize, usize, usize),
    ) -> Result<()> {
        let (rows, cols, n) = shape;
        let check = |what, expected: usize, actual: usize| {
            if actual < expected {
                Err(KernelError::Length { op: "gemm", what, expected, actual })
            } else {
                Ok(())
            }
        };
        check("w", rows * cols, w.len())?;
        check("x", n * cols, x.len())?;
        check("y", n * rows, y.len())?;
        let dim = |v: usize| i32::try_from(v).map_err(|_| KernelError::Shape(format!("gemm: dimension {v} exceeds cuBLAS's int")));
        let (m, nn, k) = (dim(rows)?, dim(n)?, dim(cols)?);
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1f32, 0f32);
        let algo = if dtype == cudaDataType::CUDA_R_32F {
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT
        } else {
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP
        };
        let stream = &self.stream;
        let (wp, _w) = w.device_ptr(stream);
        let (xp, _x) = x.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        // Column-major view: W is [cols, rows] with ld cols, so C[rows, n] = Wᵀ · X.
        // SAFETY: pointers are live device allocations of at least the sizes checked above,
        // of the element type `dtype` names, and cuBLAS runs on our stream.
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
                dtype,
                k,
                xp as *const _,
                dtype,
                k,
                &beta as *const f32 as *const _,
                yp as *mut _,
                cudaDataType::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                algo,
            )
        }
        .map_err(|e| KernelError::Cuda(format!("cuBLAS gemm [{rows}x{cols}] x {n}: {e:?}")))
    }
}
