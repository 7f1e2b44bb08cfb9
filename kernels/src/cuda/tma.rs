//! Tensor maps for the Tensor Memory Accelerator: what the TMA attention kernels
//! (flash_wgmma.cu, `flash_wgt*`) are given to copy K and V tiles with.

use cudarc::driver::sys::{
    cuTensorMapEncodeTiled, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};
use cudarc::driver::DeviceRepr;

use super::cu_ok;
use crate::KernelError;

type Result<T> = std::result::Result<T, KernelError>;

/// A CUtensorMap, passed to a kernel by value (`const __grid_constant__ TmaMap`).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct TmaMap(CUtensorMap);

// SAFETY: a plain 128-byte struct that the kernel reads as its TmaMap parameter.
unsafe impl DeviceRepr for TmaMap {}

/// The map of one bf16 KV cache (`base`: position-major, `n_kv_heads` heads of `hd` values
/// per position, `positions` filled) as a 3-d tensor (dims, heads, positions) in boxes of
/// 64 dims x 1 head x 64 positions, 128-byte swizzled in shared memory (the layout the
/// kernels' wgmma descriptors read); positions past `positions` read as zeros.
pub fn kv_map(base: u64, hd: usize, n_kv_heads: usize, positions: usize) -> Result<TmaMap> {
    if hd != 128 || !base.is_multiple_of(16) || positions == 0 || positions > u32::MAX as usize {
        return Err(KernelError::Shape(format!("TMA map of a KV cache: head_dim {hd}, {positions} positions at {base:#x}")));
    }
    let dims: [u64; 3] = [hd as u64, n_kv_heads as u64, positions as u64];
    // bytes from one head to the next and from one position to the next
    let strides: [u64; 2] = [(hd * 2) as u64, (n_kv_heads * hd * 2) as u64];
    let bx: [u32; 3] = [64, 1, 64];
    let es: [u32; 3] = [1, 1, 1];
    let mut m = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: every pointer names an array of the rank the call is told; the map is written
    // by the call and read only after it succeeds.
    let r = unsafe {
        cuTensorMapEncodeTiled(
            m.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            bx.as_ptr(),
            es.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    cu_ok(&format!("cuTensorMapEncodeTiled for a KV cache ({positions} positions x {n_kv_heads} heads)"), r)?;
    // SAFETY: initialised by the successful call above.
    Ok(TmaMap(unsafe { m.assume_init() }))
}
