//! Where a captured graph's time goes, kernel by kernel (`MXR_TIMELINE=1`, `mxr bench
//! --timeline`). Without Nsight Systems there is no other view of a graph's kernels as
//! they run with programmatic edges, where a kernel's blocks start before the one ahead
//! of it has finished.
//!
//! With the option on, every source is compiled with `TIMELINE=1`: the first block of each
//! kernel (block 0, thread 0) stamps `%globaltimer` in `PDL_ENTRY` (common.cuh) when it
//! starts and again when its wait for the kernel ahead returns, into the next slot of a
//! device buffer each module points at (`mxr_timeline`). Kernels run in capture order on
//! one stream, so slot i belongs to the i-th kernel the graph captured; this module keeps
//! those kernels' names. A kernel's share of the step is the time from its release to the
//! next kernel's release (the last one's is not known). The timer ticks in microseconds
//! on some cards, so a report averages several replays.

use super::{drv, oom_or, KernelError, Result};
use cudarc::driver::{CudaModule, CudaSlice, CudaStream, DevicePtr};
use std::sync::{Arc, Mutex};

/// Slots in the device buffer: more than a decode step of the real model launches.
pub const TIMELINE_SLOTS: usize = 8192;

/// The device buffer (a count, the capacity, then a (start, release) pair per slot) and the
/// names of the kernels captured last.
pub struct Timeline {
    buf: Mutex<CudaSlice<u64>>,
    names: Mutex<Vec<String>>,
}

fn poisoned<T>(_: T) -> KernelError {
    KernelError::Threads("timeline poisoned".into())
}

/// One kernel of a replay: its name and grid as captured ("matvec_q8_0 768x2x1"; None when
/// more kernels ran than were captured), when its first block started and when that
/// block's wait returned, in timer nanoseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamp {
    pub name: Option<String>,
    pub start: u64,
    pub release: u64,
}

impl Timeline {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Timeline> {
        let n = 2 + 2 * TIMELINE_SLOTS;
        let mut buf = stream.alloc_zeros::<u64>(n).map_err(|e| oom_or("the timeline buffer", n * 8, e))?;
        stream.memcpy_htod(&[0u64, TIMELINE_SLOTS as u64], &mut buf.slice_mut(0..2)).map_err(|e| drv("timeline", e))?;
        Ok(Timeline { buf: Mutex::new(buf), names: Mutex::new(Vec::new()) })
    }

    /// Points a freshly loaded module's `mxr_timeline` at the buffer.
    pub(super) fn attach(&self, m: &Arc<CudaModule>, stream: &Arc<CudaStream>) -> Result<()> {
        let ptr = {
            let buf = self.buf.lock().map_err(poisoned)?;
            let (p, _sync) = buf.device_ptr(stream);
            p
        };
        let mut global =
            m.get_global("mxr_timeline", stream).map_err(|e| drv("a kernel module's mxr_timeline (built with TIMELINE=1?)", e))?;
        if global.len() != 8 {
            return Err(KernelError::Cuda(format!("mxr_timeline is {} bytes, not a pointer's 8", global.len())));
        }
        stream.memcpy_htod(&ptr.to_le_bytes(), &mut global).map_err(|e| drv("timeline", e))
    }

    /// A capture starts: the names recorded from here are the new graph's kernels.
    pub(super) fn begin_capture(&self) -> Result<()> {
        self.names.lock().map_err(poisoned)?.clear();
        Ok(())
    }

    /// A kernel was captured, with this grid.
    pub(crate) fn captured(&self, name: &str, grid: (u32, u32, u32)) -> Result<()> {
        self.names.lock().map_err(poisoned)?.push(format!("{name} {}x{}x{}", grid.0, grid.1, grid.2));
        Ok(())
    }

    /// Empties the slots (queued on `stream`).
    pub(super) fn reset(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let mut buf = self.buf.lock().map_err(poisoned)?;
        stream.memcpy_htod(&[0u64], &mut buf.slice_mut(0..1)).map_err(|e| drv("timeline", e))
    }

    /// The slots filled since the last reset, named by capture order.
    pub(super) fn read(&self, stream: &Arc<CudaStream>) -> Result<Vec<Stamp>> {
        let mut host = vec![0u64; 2 + 2 * TIMELINE_SLOTS];
        stream.memcpy_dtoh(&*self.buf.lock().map_err(poisoned)?, &mut host).map_err(|e| drv("timeline", e))?;
        let names = self.names.lock().map_err(poisoned)?;
        if host[0] as usize != names.len() {
            return Err(KernelError::Cuda(format!(
                "timeline: {} kernels stamped, but the last graph captured {} (read it after one replay of that graph)",
                host[0],
                names.len()
            )));
        }
        Ok(stamps(&host, &names))
    }
}

/// The buffer's filled slots, named in order.
fn stamps(host: &[u64], names: &[String]) -> Vec<Stamp> {
    let n = (host[0] as usize).min(TIMELINE_SLOTS).min((host.len() - 2) / 2);
    (0..n).map(|i| Stamp { name: names.get(i).cloned(), start: host[2 + 2 * i], release: host[3 + 2 * i] }).collect()
}

/// One kernel name's total over one or more replays of a graph.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub calls: usize,
    /// Nanoseconds from each call's release to the next kernel's release (the last kernel
    /// of a replay has no successor and counts none).
    pub ns: u64,
    /// Nanoseconds each call's first block was resident before its release (PDL: started
    /// while the kernel ahead was still running).
    pub early_ns: u64,
}

/// Per kernel name over replays of the same graph, most time first. Every stamp must carry
/// a name, else an error says so.
pub fn by_kernel(replays: &[Vec<Stamp>]) -> Result<Vec<KernelTime>> {
    let mut rows: Vec<KernelTime> = Vec::new();
    for stamps in replays {
        for (i, s) in stamps.iter().enumerate() {
            let name = s
                .name
                .as_deref()
                .ok_or_else(|| KernelError::Cuda(format!("timeline: {} kernels ran, more than the graph captured", stamps.len())))?;
            let ns = stamps.get(i + 1).map_or(0, |next| next.release.saturating_sub(s.release));
            let early_ns = s.release.saturating_sub(s.start);
            match rows.iter_mut().find(|r| r.name == name) {
                Some(r) => {
                    r.calls += 1;
                    r.ns += ns;
                    r.early_ns += early_ns;
                }
                None => rows.push(KernelTime { name: name.to_string(), calls: 1, ns, early_ns }),
            }
        }
    }
    rows.sort_by(|a, b| b.ns.cmp(&a.ns).then(a.name.cmp(&b.name)));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::{by_kernel, stamps, KernelTime, Stamp};

    /// Slots are named in capture order, and a count past the names leaves the rest unnamed.
    #[test]
    fn stamps_take_the_captured_names_in_order() {
        let host = [3, 8, 10, 12, 20, 25, 30, 31, 0, 0];
        let names = ["norm 1x1x1".to_string(), "matvec 768x1x1".to_string()];
        let s = stamps(&host, &names);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], Stamp { name: Some(names[0].clone()), start: 10, release: 12 });
        assert_eq!(s[1], Stamp { name: Some(names[1].clone()), start: 20, release: 25 });
        assert_eq!(s[2].name, None);
        // a count beyond the buffer is cut to what it holds
        assert_eq!(stamps(&[99, 8, 1, 2], &names[..1]).len(), 1);
    }

    /// Each kernel is charged from its release to the next one's, and with the time its
    /// first block waited; names add up over replays; an unnamed stamp is an error, not a
    /// guess.
    #[test]
    fn by_kernel_charges_release_to_release() {
        let st = |name: &str, start, release| Stamp { name: Some(name.to_string()), start, release };
        let one = vec![st("norm", 90, 100), st("matvec", 101, 104), st("norm", 130, 130), st("matvec", 120, 133)];
        let two = vec![st("norm", 1000, 1000), st("matvec", 1001, 1006), st("norm", 1030, 1030), st("matvec", 1031, 1031)];
        let rows = by_kernel(&[one, two]).unwrap();
        let k = |name: &str, calls, ns, early_ns| KernelTime { name: name.to_string(), calls, ns, early_ns };
        assert_eq!(rows, vec![k("matvec", 4, 26 + 24, 3 + 13 + 5), k("norm", 4, 4 + 3 + 6 + 1, 10)]);
        let unnamed = vec![Stamp { name: None, start: 0, release: 5 }];
        assert!(by_kernel(&[unnamed]).is_err());
    }
}
