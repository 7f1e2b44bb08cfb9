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
