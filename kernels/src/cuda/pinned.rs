//! Page-locked host buffers that stream-ordered (and graph-captured) copies read and write:
//! a decode step's token and position go in and its logits come out without the driver's
//! pageable staging and without a synchronisation per copy. With pageable copies (a
//! staging pass and a wait each) the GPU sat idle 190-280 us between steps of 1.6-2.0 ms
//! on an H200 (docs/PERF.md, eleventh session).
//!
//! The host side is reached only through [`Gpu::pinned_host`] and
//! [`Gpu::pinned_host_mut`], which first wait for the stream: a queued copy never races
//! the host.

use cudarc::driver::{DevicePtr, DevicePtrMut, PinnedHostSlice};

use super::{drv, CudaView, CudaViewMut, DeviceRepr, Gpu, Result, ValidAsZeroBits};
use crate::KernelError;

/// `len` values of page-locked host memory, zeroed at allocation. `at` is its address,
/// taken once: cudarc's accessors synchronise on an event first, which a capturing stream
/// does not allow.
pub struct Pinned<T> {
    host: PinnedHostSlice<T>,
    pub(super) at: usize,
}

impl<T> Pinned<T> {
    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The host values; the caller has waited for the stream that copies them.
    pub(super) fn host_values(&self) -> Result<&[T]>
    where
        T: ValidAsZeroBits,
    {
        self.host.as_slice().map_err(|e| drv("pinned memory", e))
    }

    /// The host values to write; the caller has waited for the stream that copies them.
    pub(super) fn host_values_mut(&mut self) -> Result<&mut [T]>
    where
        T: ValidAsZeroBits,
    {
        self.host.as_mut_slice().map_err(|e| drv("pinned memory", e))
    }
}

impl Gpu {
    /// `len` zeroed values of page-locked host memory for this GPU's stream.
    pub fn pinned<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<Pinned<T>> {
        self.pinned_with(len, 0)
    }

    /// As [`Gpu::pinned`], mapped for the GPU: kernels read and write it in place at the
    /// returned device address (host_call.rs's exchanges).
    pub(super) fn mapped<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<(Pinned<T>, u64)> {
        let p = self.pinned_with::<T>(len, cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP)?;
        let mut dev: cudarc::driver::sys::CUdeviceptr = 0;
        // SAFETY: p.at is the start of a live allocation made with DEVICEMAP in this context.
        let r = unsafe { cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut dev, p.at as *mut std::ffi::c_void, 0) };
        r.result().map_err(|e| drv("mapping page-locked memory for the GPU", e))?;
        Ok((p, dev))
    }

    fn pinned_with<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize, flags: u32) -> Result<Pinned<T>> {
        // SAFETY: the allocation is zeroed below before anything can read it, and zero bits
        // are a valid T. Cached memory (no WRITECOMBINED), not cudarc's default
        // write-combined kind, whose host reads bypass the caches (the logits, 800 KB a
        // token, are read here).
        let mut h = unsafe { self.ctx.alloc_pinned_with_flags::<T>(len.max(1), flags) }
            .map_err(|e| drv(&format!("page-locking {} bytes of host memory", len * std::mem::size_of::<T>()), e))?;
        let p = h.as_mut_ptr().map_err(|e| drv("pinned memory", e))?;
        // SAFETY: p points at h's len() values, owned by h.
        unsafe { std::ptr::write_bytes(p, 0, h.len()) };
        Ok(Pinned { host: h, at: p as usize })
    }

    /// The host values, once the stream has finished everything queued (a download into
    /// them included).
    pub fn pinned_host<'p, T: ValidAsZeroBits>(&self, p: &'p Pinned<T>) -> Result<&'p [T]> {
        self.sync()?;
        p.host_values()
    }

    /// The host values to write, once the stream has finished everything queued (an upload
    /// still reading them included).
    pub fn pinned_host_mut<'p, T: ValidAsZeroBits>(&self, p: &'p mut Pinned<T>) -> Result<&'p mut [T]> {
        self.sync()?;
        p.host_values_mut()
    }

    /// Queues dst = src[at..at + dst.len()] on the stream (a copy node when capturing): the
    /// copy reads the host values when the stream reaches it.
    pub fn upload_pinned<T: DeviceRepr + ValidAsZeroBits>(&self, src: &Pinned<T>, at: usize, dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        let n = dst.len();
        if at + n > src.len() {
            return Err(KernelError::Length { op: "upload from pinned memory", what: "source", expected: at + n, actual: src.len() });
        }
        let (ptr, _) = dst.device_ptr_mut(&self.stream);
        let base = src.at as *const T;
        // SAFETY: [at, at + n) lies inside src's page-locked allocation, which outlives the
        // copy only if the caller keeps it: the step that owns both the graph and its
        // buffers drops them together, and the host side is written only after a sync
        // (pinned_host_mut).
        unsafe {
            let host = std::slice::from_raw_parts(base.add(at), n);
            cudarc::driver::result::memcpy_htod_async(ptr, host, self.stream.cu_stream()).map_err(|e| drv("upload from pinned memory", e))
        }
    }

    /// Queues dst[at..at + src.len()] = src on the stream (a copy node when capturing);
    /// read the values with [`Gpu::pinned_host`].
    pub fn download_pinned<T: DeviceRepr + ValidAsZeroBits>(&self, src: &CudaView<'_, T>, dst: &mut Pinned<T>, at: usize) -> Result<()> {
        self.download_pinned_on(&self.stream, src, dst, at)
    }

    /// [`Gpu::download_pinned`] on the side stream (order it with [`Gpu::side_after_main`]
    /// and [`Gpu::main_after_side`]).
    pub fn download_pinned_side<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &CudaView<'_, T>,
        dst: &mut Pinned<T>,
        at: usize,
    ) -> Result<()> {
        self.download_pinned_on(&self.side, src, dst, at)
    }

    fn download_pinned_on<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        src: &CudaView<'_, T>,
        dst: &mut Pinned<T>,
        at: usize,
    ) -> Result<()> {
        let n = src.len();
        if at + n > dst.len() {
            return Err(KernelError::Length { op: "download to pinned memory", what: "destination", expected: at + n, actual: dst.len() });
        }
        let (ptr, _) = src.device_ptr(stream);
        let base = dst.at as *mut T;
        // SAFETY: [at, at + n) lies inside dst's page-locked allocation; the host reads it
        // only after a sync (pinned_host), and its owner keeps it as long as the graph that
        // holds this copy.
        unsafe {
            let host = std::slice::from_raw_parts_mut(base.add(at), n);
            cudarc::driver::result::memcpy_dtoh_async(host, ptr, stream.cu_stream()).map_err(|e| drv("download to pinned memory", e))
        }
    }
}
