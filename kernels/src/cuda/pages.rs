//! Device memory that grows in pages behind a fixed address (CUDA virtual memory
//! management): the address range for the whole capacity is reserved up front, and
//! physical memory is created and mapped page by page as the content grows. Kernels see
//! one contiguous buffer whose address never changes, so a captured decode graph stays
//! valid while a KV cache grows from a few tokens to a million.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::{cu_ok, drv, Gpu, Result};
use crate::KernelError;

/// Physical memory is committed in pages of at least this many bytes (a multiple of the
/// device's allocation granularity, 2 MiB on current GPUs).
const PAGE: usize = 32 << 20;

pub struct PagedBuf {
    ctx: Arc<CudaContext>,
    device: i32,
    base: sys::CUdeviceptr,
    reserved: usize,
    page: usize,
    /// Physical allocations, each `page` bytes, mapped from `base` on.
    pages: Vec<sys::CUmemGenericAllocationHandle>,
}

impl PagedBuf {
    /// Reserves room for `capacity` bytes; nothing is committed yet.
    pub fn reserve(gpu: &Gpu, capacity: usize) -> Result<PagedBuf> {
        let ctx = gpu.context().clone();
        ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        let device = gpu.info().ordinal as i32;
        let prop = Self::prop(device);
        let mut gran = 0usize;
        // SAFETY: prop describes pinned device memory on `device`; gran is written.
        cu_ok("allocation granularity", unsafe {
            sys::cuMemGetAllocationGranularity(&mut gran, &prop, sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        })?;
        let page = PAGE.div_ceil(gran.max(1)) * gran.max(1);
        let reserved = capacity.max(1).div_ceil(page) * page;
        let mut base: sys::CUdeviceptr = 0;
        // SAFETY: reserves address space only; base is written.
        cu_ok("reserving device address space", unsafe { sys::cuMemAddressReserve(&mut base, reserved, page, 0, 0) })?;
        Ok(PagedBuf { ctx, device, base, reserved, page, pages: Vec::new() })
    }

    fn prop(device: i32) -> sys::CUmemAllocationProp {
        // SAFETY: an all-zero CUmemAllocationProp is valid (no handle types, no flags).
        let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        p.location.id = device;
        p
    }

    /// Commits pages until at least `bytes` are backed by memory (zeroed). An error, out of
    /// memory included, leaves what was committed before.
    pub fn ensure(&mut self, bytes: usize) -> Result<()> {
        if bytes > self.reserved {
            return Err(KernelError::Length { op: "paged buffer", what: "bytes", expected: self.reserved, actual: bytes });
        }
        self.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        let prop = Self::prop(self.device);
        while self.committed() < bytes {
            let at = self.base + self.committed() as u64;
            let mut h: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: h is written; the size is a multiple of the granularity.
            let r = unsafe { sys::cuMemCreate(&mut h, self.page, &prop, 0) };
            if let Err(e) = r.result() {
                return Err(if format!("{e:?}").contains("OUT_OF_MEMORY") {
                    KernelError::OutOfMemory { what: "growing a KV cache".into(), bytes: self.page }
                } else {
                    drv("creating device memory", e)
                });
            }
            // SAFETY: [at, at + page) lies inside the reserved range and is not mapped yet.
            if let Err(e) = cu_ok("mapping device memory", unsafe { sys::cuMemMap(at, self.page, 0, h, 0) }) {
                // SAFETY: h was created above and is not mapped.
                unsafe { sys::cuMemRelease(h) };
                return Err(e);
            }
            let access = sys::CUmemAccessDesc {
                location: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: self.device },
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            // SAFETY: the range was just mapped; then it is zeroed before any kernel reads it.
            let r = unsafe { sys::cuMemSetAccess(at, self.page, &access, 1) }
                .result()
                .and_then(|_| unsafe { sys::cuMemsetD8_v2(at, 0, self.page) }.result());
            if let Err(e) = r {
                // SAFETY: undo this page's mapping and allocation.
                unsafe {
                    sys::cuMemUnmap(at, self.page);
                    sys::cuMemRelease(h);
                }
                return Err(drv("enabling device memory", e));
            }
            self.pages.push(h);
        }
        Ok(())
    }

    /// Bytes backed by memory.
    pub fn committed(&self) -> usize {
        self.pages.len() * self.page
    }

    pub fn capacity(&self) -> usize {
        self.reserved
    }

    /// The device address, for kernel arguments and copies.
    pub fn ptr(&self) -> u64 {
        self.base
    }

    /// Copies `host.len()` bytes from offset `at` to the host (waits for `gpu`'s work).
    pub fn read(&self, gpu: &Gpu, at: usize, host: &mut [u8]) -> Result<()> {
        if at + host.len() > self.committed() {
            return Err(KernelError::Length { op: "paged read", what: "bytes", expected: self.committed(), actual: at + host.len() });
        }
        gpu.sync()?;
        // SAFETY: the source range is committed (checked) and the host slice is writable.
        cu_ok("download", unsafe { sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), self.base + at as u64, host.len()) })
    }

    /// Copies `host` to offset `at` (after `gpu`'s queued work).
    pub fn write(&mut self, gpu: &Gpu, at: usize, host: &[u8]) -> Result<()> {
        self.ensure(at + host.len())?;
        gpu.sync()?;
        // SAFETY: the destination range is committed (ensured) and the host slice readable.
        cu_ok("upload", unsafe { sys::cuMemcpyHtoD_v2(self.base + at as u64, host.as_ptr().cast(), host.len()) })
    }
}

impl Drop for PagedBuf {
    fn drop(&mut self) {
        // work still queued on the pages must be finished: callers drop caches only
        // between forward passes, after a download or a sync
        release_range(&self.ctx, self.base, self.reserved, self.page, &self.pages);
    }
}

/// Unmaps and releases `handles` (mapped in order from `base`, `each` bytes apart), then
/// frees the reservation of `reserved` bytes, after the context's queued work.
pub(super) fn release_range(
    ctx: &Arc<CudaContext>,
    base: sys::CUdeviceptr,
    reserved: usize,
    each: usize,
    handles: &[sys::CUmemGenericAllocationHandle],
) {
    let _ = ctx.bind_to_thread();
    // SAFETY: the handles were mapped in order from base; nothing reads them once the
    // context is idle. Unmap, release, then free the reservation.
    unsafe {
        let _ = sys::cuCtxSynchronize();
        for (i, &h) in handles.iter().enumerate() {
            sys::cuMemUnmap(base + (i * each) as u64, each);
            sys::cuMemRelease(h);
        }
        sys::cuMemAddressFree(base, reserved);
    }
}
