//! Host memory page-locked for the GPU: the mapped model's cold experts, so that copying
//! them to the GPU runs at DMA speed (tens of GB/s) instead of through the driver's
//! pageable staging (a few GB/s).

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use super::{drv, Gpu, Result};

const PAGE: usize = 4096;

/// Pages of host memory registered with the driver (read-only); unregistered on drop. The
/// memory itself belongs to someone else (the model's mapping), which must outlive this.
pub struct HostPin {
    base: usize,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl HostPin {
    pub fn bytes(&self) -> usize {
        self.len
    }
}

impl Gpu {
    /// Page-locks the pages that hold `ranges` (merged where pages touch), read-only. An
    /// error leaves nothing registered.
    pub fn pin_host(&self, ranges: &[&[u8]]) -> Result<Vec<HostPin>> {
        let merged = page_spans(ranges.iter().map(|r| (r.as_ptr() as usize, r.len())));
        self.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        let mut pins = Vec::with_capacity(merged.len());
        for (s, e) in merged {
            let flags = sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE;
            // SAFETY: [s, e) are whole pages of live, mapped host memory (the caller's
            // slices); the driver only reads them, and `HostPin` unregisters them.
            let r = unsafe { sys::cuMemHostRegister_v2(s as *mut std::ffi::c_void, e - s, flags) };
            // on error, `pins` drops and unregisters what was registered so far
            r.result().map_err(|err| drv("page-locking host memory", err))?;
            pins.push(HostPin { base: s, len: e - s, ctx: self.ctx.clone() });
        }
        Ok(pins)
    }
}

/// The whole pages that hold the byte ranges (address, length), merged where they touch
/// or overlap, in address order: what can be registered once each.
pub fn page_spans(ranges: impl IntoIterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = ranges
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .map(|(start, len)| (start / PAGE * PAGE, (start + len).div_ceil(PAGE) * PAGE))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

impl Drop for HostPin {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: base was registered by pin_host and not yet unregistered.
        let _ = unsafe { sys::cuMemHostUnregister(self.base as *mut std::ffi::c_void) };
    }
}

/// Copies from host memory queued on the side stream without the host waiting for each,
/// so that the host can work (a cold expert's CPU share) while they run. Made only by
/// [`Gpu::copy_scope`], which waits for the side stream before it returns: the sources,
/// borrowed for `'s`, outlive every copy.
pub struct CopyScope<'g, 's> {
    gpu: &'g Gpu,
    _sources: std::marker::PhantomData<&'s [u8]>,
}

impl<'s> CopyScope<'_, 's> {
    /// dst = src, queued on the side stream (after its earlier work).
    pub fn copy(&self, src: &'s [u8], dst: &mut cudarc::driver::CudaViewMut<'_, u8>) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        if src.len() != dst.len() {
            return Err(super::KernelError::Length { op: "copy_scope", what: "destination", expected: src.len(), actual: dst.len() });
        }
        let side = &self.gpu.side;
        let (ptr, _sync) = dst.device_ptr_mut(side);
        // SAFETY: dst is a live device range of src.len() bytes; src stays borrowed until
        // the scope's closure returns, and the scope then waits for the side stream.
        let r = unsafe { sys::cuMemcpyHtoDAsync_v2(ptr, src.as_ptr().cast(), src.len(), side.cu_stream()) };
        r.result().map_err(|e| drv("copying to the GPU", e))
    }

    /// Copies `height` rows of `width` bytes, `pitch` bytes apart in `src`, into `dst`
    /// packed (row i at i * width): a column block of a row-major matrix.
    pub fn copy_2d(
        &self,
        src: &'s [u8],
        pitch: usize,
        width: usize,
        height: usize,
        dst: &mut cudarc::driver::CudaViewMut<'_, u8>,
    ) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        let need_src = if height == 0 { 0 } else { (height - 1) * pitch + width };
        if width > pitch || src.len() < need_src {
            return Err(super::KernelError::Length { op: "copy_scope 2d", what: "source", expected: need_src, actual: src.len() });
        }
        if dst.len() != width * height {
            return Err(super::KernelError::Length {
                op: "copy_scope 2d",
                what: "destination",
                expected: width * height,
                actual: dst.len(),
            });
        }
        if height == 0 || width == 0 {
            return Ok(());
        }
        let side = &self.gpu.side;
        let (ptr, _sync) = dst.device_ptr_mut(side);
        let p = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
            srcHost: src.as_ptr().cast(),
            srcDevice: 0,
            srcArray: std::ptr::null_mut(),
            srcPitch: pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: ptr,
            dstArray: std::ptr::null_mut(),
            dstPitch: width,
            WidthInBytes: width,
            Height: height,
        };
        // SAFETY: the source rows lie inside src (checked above), dst holds width * height
        // bytes; src outlives the copy as in `copy`.
        let r = unsafe { sys::cuMemcpy2DAsync_v2(&p, side.cu_stream()) };
        r.result().map_err(|e| drv("copying to the GPU", e))
    }

    /// The main stream's later work waits for the copies queued so far.
    pub fn main_waits(&self) -> Result<()> {
        self.gpu.main_after_side()
    }
}

impl Gpu {
    /// Runs `f` with a [`CopyScope`]: copies queued in it run on the side stream while `f`
    /// goes on, and the side stream is waited for before this returns (also if `f`
    /// unwinds), so no copy outlives the data it reads. The side stream first waits for
    /// the main stream's work so far (the destinations' allocations).
    pub fn copy_scope<'s, R>(&self, f: impl for<'g> FnOnce(&CopyScope<'g, 's>) -> R) -> Result<R> {
        struct WaitOnDrop<'a>(&'a Gpu);
        impl Drop for WaitOnDrop<'_> {
            fn drop(&mut self) {
                let t = std::time::Instant::now();
                // an error here surfaces again on the next call on the stream
                let _ = self.0.side.synchronize();
                self.0.waited(t);
            }
        }
        self.side_after_main()?;
        let guard = WaitOnDrop(self);
        let r = f(&CopyScope { gpu: self, _sources: std::marker::PhantomData });
        drop(guard);
        // report a failed copy here rather than at some later call
        self.side.synchronize().map_err(|e| drv("copying to the GPU", e))?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_whole_merged_pages() {
        // inside one page; straddling two pages; touching those pages; far away; empty
        let got = page_spans([(5 * PAGE + 10, 20), (7 * PAGE - 1, 2), (8 * PAGE, PAGE), (20 * PAGE + 1, 1), (30 * PAGE, 0)]);
        // pages 5, 6-7 and 8 touch: one registration
        assert_eq!(got, vec![(5 * PAGE, 9 * PAGE), (20 * PAGE, 21 * PAGE)]);
        // overlapping and unordered ranges merge into one span
        assert_eq!(page_spans([(3 * PAGE, 2 * PAGE), (PAGE, 3 * PAGE)]), vec![(PAGE, 5 * PAGE)]);
        assert!(page_spans([]).is_empty());
    }
}
