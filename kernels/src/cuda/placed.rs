//! Expert stacks whose experts lie some in device memory and some in host memory, behind
//! one device address range (CUDA virtual memory management; issue 7, `--cold-experts in-place`).
//! Each expert gets whole pages of the allocation granularity: device pages for a hot
//! expert, page-locked host pages (`CU_MEM_LOCATION_TYPE_HOST`) for a cold one, all mapped
//! for the GPU. The products index experts by stride as in any stack, so a cold expert is
//! read in place over PCIe by the same kernels, the router's choices never go to the host,
//! and the decode step stays one CUDA graph. An expert moves between device and host pages
//! at the same address ([`PlacedStack::relocate`], for `--expert-rebalance`).
//!
//! The CPU may read a cold expert's host pages at the same address ([`HostPages`]): with
//! `--cold-experts mixed` the CPU computes its share of a cold expert from this copy, so
//! the mapped file's pages of cold experts are not needed in memory as well.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use cudarc::driver::{sys, CudaContext};

use super::pages::release_range;
use super::{cu_ok, drv, Gpu, Result};
use crate::KernelError;

pub struct PlacedStack {
    map: Arc<Mapping>,
    device: i32,
    /// Bytes of one expert's weights (the stride pads them to whole pages).
    each: usize,
    /// Whether expert e's pages are device memory.
    hot: Vec<bool>,
    /// The address-space alignment the mappings need.
    gran: usize,
    device_bytes: usize,
    host_bytes: usize,
}

/// The address range and its pages, freed when the stack and every [`HostPages`] of it
/// have gone.
struct Mapping {
    ctx: Arc<CudaContext>,
    base: sys::CUdeviceptr,
    reserved: usize,
    stride: usize,
    /// written only while nothing reads the pages (a relocation holds the lock)
    pages: RwLock<Pages>,
}

struct Pages {
    /// Physical allocations in expert order, each `stride` bytes; all mapped from `base`.
    handles: Vec<sys::CUmemGenericAllocationHandle>,
    /// Whether the CPU may read expert e's pages at their address (host pages it was given
    /// access to).
    cpu: Vec<bool>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let pages = self.pages.get_mut().unwrap_or_else(|p| p.into_inner());
        release_range(&self.ctx, self.base, self.reserved, self.stride, &pages.handles);
    }
}

/// Lets the CPU read the host pages at [at, at + n) (whole allocations, mapped). False
/// where the driver refuses: the CPU then reads the file instead.
fn open_to_cpu(at: sys::CUdeviceptr, n: usize) -> bool {
    let cpu = sys::CUmemAccessDesc {
        location: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, id: 0 },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: [at, at + n) is mapped, from host allocations; only access flags change.
    unsafe { sys::cuMemSetAccess(at, n, &cpu, 1) }.result().is_ok()
}

/// The CPU's way to the cold experts of a [`PlacedStack`], in the file's layout where the
/// type keeps it ([`super::matrix::as_in_file`]). It keeps the pages mapped.
#[derive(Clone)]
pub struct HostPages {
    map: Arc<Mapping>,
    each: usize,
}

impl HostPages {
    /// The pages as they are now; no expert moves while the answer is held.
    pub fn read(&self) -> HostPagesRead<'_> {
        HostPagesRead { pages: self.map.pages.read().ok(), map: &self.map, each: self.each }
    }
}

pub struct HostPagesRead<'a> {
    /// None: the lock was poisoned (a relocation panicked): nothing is readable
    pages: Option<RwLockReadGuard<'a, Pages>>,
    map: &'a Mapping,
    each: usize,
}

impl HostPagesRead<'_> {
    /// Expert e's weights where the CPU can read them in host pages; None for an expert in
    /// device memory (or none such).
    pub fn expert(&self, e: usize) -> Option<&[u8]> {
        let pages = self.pages.as_ref()?;
        if !*pages.cpu.get(e)? {
            return None;
        }
        let at = self.map.base as usize + e * self.map.stride;
        // SAFETY: expert e's `stride` >= `each` bytes at `at` are host pages mapped at this
        // address with CPU access (pages.cpu), kept mapped while `map` lives; the read lock
        // keeps a relocation from changing them while the slice is borrowed. The GPU only
        // reads the weights.
        Some(unsafe { std::slice::from_raw_parts(at as *const u8, self.each) })
    }
}

fn prop(on_gpu: bool, device: i32) -> sys::CUmemAllocationProp {
    // SAFETY: an all-zero CUmemAllocationProp is valid (no handle types, no flags).
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    if on_gpu {
        p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        p.location.id = device;
    } else {
        // host memory on no particular NUMA node (the id is ignored)
        p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST;
    }
    p
}

fn granularity(p: &sys::CUmemAllocationProp, what: &str) -> Result<usize> {
    let mut g = 0usize;
    // SAFETY: p is a valid property; g is written.
    cu_ok(what, unsafe {
        sys::cuMemGetAllocationGranularity(&mut g, p, sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM)
    })?;
    Ok(g.max(1))
}

fn access(device: i32) -> sys::CUmemAccessDesc {
    sys::CUmemAccessDesc {
        location: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: device },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    }
}

/// Creates one allocation of `bytes` in device memory (`on_gpu`) or page-locked host memory.
fn create(bytes: usize, on_gpu: bool, device: i32) -> Result<sys::CUmemGenericAllocationHandle> {
    let mut h: sys::CUmemGenericAllocationHandle = 0;
    // SAFETY: h is written; bytes is a multiple of the granularity of both kinds.
    match unsafe { sys::cuMemCreate(&mut h, bytes, &prop(on_gpu, device), 0) }.result() {
        Ok(()) => Ok(h),
        Err(err) => Err(if format!("{err:?}").contains("OUT_OF_MEMORY") {
            if on_gpu {
                KernelError::OutOfMemory { what: "an expert's pages".into(), bytes }
            } else {
                KernelError::Cuda(format!("out of page-locked host memory: an expert's pages of {bytes} bytes"))
            }
        } else {
            drv(if on_gpu { "creating device memory for an expert" } else { "creating host memory for an expert" }, err)
        }),
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl PlacedStack {
    /// Experts of `each` bytes (`packed` holds them one after another, `each` apart), expert
    /// e in device memory when `on_gpu[e]`, in host memory otherwise; copied in before this
    /// returns. An error (out of device or host memory included) leaves nothing allocated.
    pub fn new(gpu: &Gpu, packed: &[u8], each: usize, on_gpu: &[bool]) -> Result<PlacedStack> {
        let n = on_gpu.len();
        if n == 0 || each == 0 || packed.len() != each * n {
            return Err(KernelError::Length {
                op: "placed expert stack",
                what: "packed experts",
                expected: each * n,
                actual: packed.len(),
            });
        }
        let ctx = gpu.context().clone();
        ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        let device = gpu.info().ordinal as i32;
        let (gd, gh) = (
            granularity(&prop(true, device), "device allocation granularity")?,
            granularity(&prop(false, device), "host allocation granularity")?,
        );
        let gran = gd / gcd(gd, gh) * gh;
        let stride = each.div_ceil(gran) * gran;
        let reserved = stride * n;
        let mut base: sys::CUdeviceptr = 0;
        // SAFETY: reserves address space only; base is written.
        cu_ok("reserving device address space", unsafe { sys::cuMemAddressReserve(&mut base, reserved, gran, 0, 0) })?;
        // from here on, Drop undoes whatever was done
        let pages = RwLock::new(Pages { handles: Vec::with_capacity(n), cpu: Vec::with_capacity(n) });
        let mut s = PlacedStack {
            map: Arc::new(Mapping { ctx, base, reserved, stride, pages }),
            device,
            each,
            hot: Vec::with_capacity(n),
            gran,
            device_bytes: 0,
            host_bytes: 0,
        };
        let pages = Arc::get_mut(&mut s.map).map(|m| m.pages.get_mut().unwrap_or_else(|p| p.into_inner()));
        let pages = pages.ok_or_else(|| KernelError::Cuda("a new expert stack is shared".into()))?;
        for (e, &hot) in on_gpu.iter().enumerate() {
            let h = create(stride, hot, device)?;
            // SAFETY: [at, at + stride) lies inside the reservation and is not mapped yet.
            if let Err(err) = cu_ok("mapping an expert", unsafe { sys::cuMemMap(base + (e * stride) as u64, stride, 0, h, 0) }) {
                // SAFETY: h was created above and is not mapped.
                unsafe { sys::cuMemRelease(h) };
                return Err(err);
            }
            pages.handles.push(h);
            pages.cpu.push(false);
            s.hot.push(hot);
            if hot {
                s.device_bytes += stride;
            } else {
                s.host_bytes += stride;
            }
        }
        // SAFETY: the whole range is mapped (above).
        cu_ok("letting the GPU read the experts", unsafe { sys::cuMemSetAccess(base, reserved, &access(device), 1) })?;
        for (e, &hot) in on_gpu.iter().enumerate() {
            pages.cpu[e] = !hot && open_to_cpu(base + (e * stride) as u64, stride);
        }
        for (e, src) in packed.chunks_exact(each).enumerate() {
            // SAFETY: [e stride, e stride + each) is mapped and readable by the device; the
            // copy is synchronous and src is readable.
            cu_ok("copying an expert in", unsafe { sys::cuMemcpyHtoD_v2(base + (e * stride) as u64, src.as_ptr().cast(), each) })?;
        }
        Ok(s)
    }

    /// The device address of expert 0.
    pub fn ptr(&self) -> u64 {
        self.map.base
    }

    /// Bytes from one expert to the next (whole pages).
    pub fn stride(&self) -> usize {
        self.map.stride
    }

    /// Bytes of the whole range.
    pub fn len(&self) -> usize {
        self.map.reserved
    }

    pub fn is_empty(&self) -> bool {
        self.map.reserved == 0
    }

    /// The CPU's way to the experts in host pages (each expert's bytes as packed); None
    /// where the driver did not open some of them to the CPU (the CPU reads the file then).
    pub fn host_pages(&self) -> Option<HostPages> {
        let pages = self.map.pages.read().ok()?;
        let open = self.hot.iter().zip(&pages.cpu).all(|(&hot, &cpu)| hot || cpu);
        open.then(|| HostPages { map: self.map.clone(), each: self.each })
    }

    /// Bytes of device memory the hot experts take.
    pub fn device_bytes(&self) -> usize {
        self.device_bytes
    }

    /// Bytes of page-locked host memory the cold experts take.
    pub fn host_bytes(&self) -> usize {
        self.host_bytes
    }

    /// Whether expert `e` is in device memory (None: no such expert).
    pub fn on_gpu(&self, e: usize) -> Option<bool> {
        self.hot.get(e).copied()
    }

    /// Moves expert `e`'s weights into device memory (`to_gpu`) or page-locked host
    /// memory, at the same device address: kernels and captured graphs that read the stack
    /// read it as before. Waits for the context's queued work first (nothing may read the
    /// expert while its pages change). On an error the expert stays where it was.
    pub fn relocate(&mut self, e: usize, to_gpu: bool) -> Result<()> {
        let Some(&was) = self.hot.get(e) else {
            return Err(KernelError::Shape(format!("relocating expert {e} of a stack of {}", self.hot.len())));
        };
        if was == to_gpu {
            return Ok(());
        }
        let map = self.map.clone();
        map.ctx.bind_to_thread().map_err(|err| drv("binding the context", err))?;
        let (at, n) = (map.base + (e * map.stride) as u64, map.stride);
        // SAFETY: waits for every queued kernel of the context; no arguments.
        cu_ok("waiting for the GPU before moving an expert", unsafe { sys::cuCtxSynchronize() })?;
        // then the CPU reads no expert of the stack meanwhile (locked after the wait: a
        // decode graph in flight waits for the host worker, which may need to read)
        let mut pages = map.pages.write().map_err(|_| KernelError::Cuda("an expert stack's pages: lock poisoned".into()))?;
        let new = create(n, to_gpu, self.device)?;
        // the new pages, mapped at a spare address, get a copy of the expert
        let mut spare: sys::CUdeviceptr = 0;
        // SAFETY: reserves address space only; spare is written.
        let copied = cu_ok("reserving address space", unsafe { sys::cuMemAddressReserve(&mut spare, n, self.gran, 0, 0) }).and_then(|_| {
            // SAFETY: [spare, spare + n) is reserved and unmapped; new is n bytes. The copy
            // reads the expert's current mapping (readable by the device) into the new
            // pages; cuCtxSynchronize makes it complete before the spare mapping goes.
            let r = unsafe {
                cu_ok("mapping the moved expert", sys::cuMemMap(spare, n, 0, new, 0))
                    .and_then(|_| cu_ok("opening it to the GPU", sys::cuMemSetAccess(spare, n, &access(self.device), 1)))
                    .and_then(|_| cu_ok("copying the expert", sys::cuMemcpyDtoD_v2(spare, at, n)))
                    .and_then(|_| cu_ok("waiting for the copy", sys::cuCtxSynchronize()))
            };
            // SAFETY: unmapping a range that may or may not be mapped, then freeing the
            // reservation; the copy is complete (or failed).
            unsafe {
                sys::cuMemUnmap(spare, n);
                sys::cuMemAddressFree(spare, n);
            }
            r
        });
        if let Err(err) = copied {
            // SAFETY: new is unmapped everywhere.
            unsafe { sys::cuMemRelease(new) };
            return Err(err);
        }
        let old = pages.handles[e];
        // SAFETY: [at, at + n) maps `old` and nothing reads it (the context is idle, the CPU
        // is locked out); it is mapped again (new pages, or the old ones back on a failure)
        // before returning.
        let swapped = unsafe {
            cu_ok("unmapping the expert's old pages", sys::cuMemUnmap(at, n)).and_then(|_| {
                match cu_ok("mapping the expert's new pages", sys::cuMemMap(at, n, 0, new, 0))
                    .and_then(|_| cu_ok("opening them to the GPU", sys::cuMemSetAccess(at, n, &access(self.device), 1)))
                {
                    Ok(()) => Ok(()),
                    Err(err) => {
                        sys::cuMemUnmap(at, n);
                        let _ = sys::cuMemMap(at, n, 0, old, 0);
                        let _ = sys::cuMemSetAccess(at, n, &access(self.device), 1);
                        Err(err)
                    }
                }
            })
        };
        let gone = if swapped.is_ok() { old } else { new };
        // SAFETY: `gone` is no longer mapped anywhere.
        unsafe { sys::cuMemRelease(gone) };
        // the host pages mapped now, new or old, open to the CPU again
        let on_host = if swapped.is_ok() { !to_gpu } else { !was };
        pages.cpu[e] = on_host && open_to_cpu(at, n);
        swapped?;
        pages.handles[e] = new;
        self.hot[e] = to_gpu;
        if to_gpu {
            (self.device_bytes, self.host_bytes) = (self.device_bytes + n, self.host_bytes - n);
        } else {
            (self.device_bytes, self.host_bytes) = (self.device_bytes - n, self.host_bytes + n);
        }
        Ok(())
    }
}
