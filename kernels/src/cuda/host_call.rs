//! Host work inside a captured graph (issue 7): a decode step whose layers keep experts in
//! host memory computes them on the CPU without leaving the step's CUDA graph.
//!
//! Each [`HostCall`] owns page-locked host memory mapped for the GPU. In the graph,
//! `host_post` (host_exchange.cu) writes the layer's input row and the router's choices
//! there and raises a posted count; the GPU goes on with its own experts; `host_wait` spins
//! until the count is answered and copies the answer into device memory. A host worker
//! thread (one per GPU) watches the posted counts of the calls of live graphs, runs each
//! call's work on the values as the kernel left them, and raises the answered count.
//! Leaving the graph instead (the step launched kernel by kernel, the host waiting for
//! each such layer's choices) cost about 0.25 ms a layer on an H200, and a CUDA host node
//! in the graph (cuLaunchHostFunc) 0.13-0.16 ms (docs/PERF.md).
//!
//! The worker spins for [`SPIN`] after the last graph launch or answer, then parks for a
//! millisecond at a time, and after a second idle for 50 ms at a time; a launch unparks it. A failure of the work (an error or a panic) is kept for
//! [`HostCall::take_error`] and its answer is NaN, so that nothing computed from it passes
//! for a result; a worker that does not answer within [`TIMEOUT`] makes the wait give NaN
//! and the call report it.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::ops::{int, launch, launch_on};
use super::pinned::Pinned;
use super::{drv, CudaView, CudaViewMut, Gpu, Result, Source};
use crate::KernelError;

/// The work of a host call: (input row, choices, output) -> Ok, or what went wrong.
pub type HostFn = dyn Fn(&[f32], &[i32], &mut [f32]) -> std::result::Result<(), String> + Send + Sync;

/// What a post costs the host, from its choices (say, how many of them the CPU computes):
/// the worker answers the cheapest post waiting first, so that a step with little or no
/// host work is not held behind another's long one.
pub type CostFn = dyn Fn(&[i32]) -> u32 + Send + Sync;

/// How long the worker spins for the next post after the last launch or answer.
pub const SPIN: Duration = Duration::from_millis(20);
/// How long a graph's wait gives the worker to answer.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Values at a fixed host address, in memory a [`HostCall`] owns.
struct Region {
    at: usize,
    len: usize,
}

/// What holds a host call's regions: page-locked memory mapped for the GPU, or (unit tests
/// of the worker, no GPU) plain heap memory.
enum Memory {
    Mapped {
        _x: Pinned<f32>,
        _words: Pinned<u32>,
        _out: Pinned<f32>,
        /// device addresses of x, words and out
        dev: [u64; 3],
        /// on the device: the count of posts (host_post raises it, host_wait reads it),
        /// host_wait's words to its other blocks (the post waited for, and whether
        /// answered), and host_post's count of blocks done
        seq: CudaSlice<u32>,
    },
    /// owns the memory the regions point into (read only through them)
    #[cfg(test)]
    Heap(#[allow(dead_code)] Vec<u64>),
}

/// Mapped inputs and output of one exchange, its counts, and its work.
pub struct HostCall {
    x: Region,
    /// choices [0, k), then posted, answered, and the post that timed out (0: none)
    words: Region,
    out: Region,
    memory: Memory,
    k: usize,
    /// the last post the worker answered (the worker's alone)
    answered: AtomicU32,
    /// the last timed-out post reported
    reported_timeout: AtomicU32,
    work: Box<HostFn>,
    /// what a post costs (None: all alike)
    cost: Option<Box<CostFn>>,
    /// the first failure since the last `take_error`
    error: Mutex<Option<String>>,
}

impl HostCall {
    /// The first failure since the last call: of the work, or a wait that timed out (graph
    /// replays go on after one; their owner asks after each).
    pub fn take_error(&self) -> Option<String> {
        let timed_out = self.word(2).load(Ordering::Acquire);
        if timed_out != 0 && self.reported_timeout.swap(timed_out, Ordering::Relaxed) != timed_out {
            return Some(format!("the host worker did not answer within {} s", TIMEOUT.as_secs()));
        }
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    /// The device side: addresses of x, words and out, and the count of posts.
    fn device(&self) -> Result<([u64; 3], &CudaSlice<u32>)> {
        match &self.memory {
            Memory::Mapped { dev, seq, .. } => Ok((*dev, seq)),
            #[cfg(test)]
            Memory::Heap(_) => Err(KernelError::Cuda("a host call in heap memory has no device side".into())),
        }
    }

    /// Word k + j of `words`, j < 3 (posted, answered, timed out).
    fn word(&self, j: usize) -> &AtomicU32 {
        let i = (self.k + j.min(2)).min(self.words.len - 1);
        // SAFETY: i < words.len() (k + 3 values, a live page-locked allocation owned by
        // self, aligned for u32); the GPU and the worker touch these words only atomically
        // (volatile accesses with fences on the GPU's side).
        unsafe { &*((self.words.at as *const u32).add(i) as *const AtomicU32) }
    }

    /// The cost of a post not answered yet, if there is one.
    fn waiting(&self) -> Option<u32> {
        if self.word(0).load(Ordering::Acquire) == self.answered.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.cost.as_ref().map_or(0, |cost| {
            // SAFETY: the choices lie in memory owned by self; host_post wrote them before
            // raising the count just read (Acquire), and does not write again before the
            // answer.
            cost(unsafe { std::slice::from_raw_parts(self.words.at as *const i32, self.k) })
        }))
    }

    /// Answers a new post, if there is one: runs the work and raises the answered count.
    fn serve(&self) -> bool {
        let posted = self.word(0).load(Ordering::Acquire);
        if posted == self.answered.load(Ordering::Relaxed) {
            return false;
        }
        self.run();
        self.answered.store(posted, Ordering::Relaxed);
        // the answer's values before its count
        self.word(1).store(posted, Ordering::Release);
        true
    }

    fn run(&self) {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: x, the choices and out lie in memory owned by self (`memory`), of the
            // lengths given. host_post wrote x and the choices before raising the count
            // this answers, and host_wait reads out only after the answered count, so only
            // the worker (one thread) touches them now.
            let (x, ids, out) = unsafe {
                (
                    std::slice::from_raw_parts(self.x.at as *const f32, self.x.len),
                    std::slice::from_raw_parts(self.words.at as *const i32, self.k),
                    std::slice::from_raw_parts_mut(self.out.at as *mut f32, self.out.len),
                )
            };
            let r = (self.work)(x, ids, out);
            if r.is_err() {
                out.fill(f32::NAN);
            }
            r
        }));
        let why = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(p) => format!(
                "the host work panicked: {}",
                p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
            ),
        };
        if let Ok(mut e) = self.error.lock() {
            e.get_or_insert(why);
        }
    }
}

/// The calls of live graphs, watched by one thread.
pub(super) struct Worker {
    calls: Mutex<Vec<Arc<HostCall>>>,
    /// raised whenever `calls` changes
    changed: AtomicU64,
    /// nanoseconds since `start` of the last launch of a graph with calls
    kicked: AtomicU64,
    start: Instant,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// bound on the thread: a call whose last owner is the thread frees its memory there
    /// (None: unit tests, no GPU)
    ctx: Option<Arc<cudarc::driver::CudaContext>>,
    /// how long one park lasts after a second idle
    idle_park: Duration,
    /// nanoseconds spent answering posts (running their work)
    busy_ns: AtomicU64,
}

impl Worker {
    fn new(ctx: Option<Arc<cudarc::driver::CudaContext>>, idle_park: Duration) -> Arc<Worker> {
        Arc::new(Worker {
            ctx,
            idle_park,
            calls: Mutex::new(Vec::new()),
            changed: AtomicU64::new(0),
            kicked: AtomicU64::new(0),
            start: Instant::now(),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            busy_ns: AtomicU64::new(0),
        })
    }

    /// Seconds spent answering posts so far.
    pub(super) fn busy(&self) -> f64 {
        self.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn lock_calls(&self) -> Result<std::sync::MutexGuard<'_, Vec<Arc<HostCall>>>> {
        self.calls.lock().map_err(|_| KernelError::Cuda("the host worker's calls: lock poisoned".into()))
    }

    /// Watches `calls` (from the next round on), starting the thread if it is not running.
    pub(super) fn register(self: &Arc<Self>, calls: &[Arc<HostCall>]) -> Result<()> {
        self.lock_calls()?.extend(calls.iter().cloned());
        self.changed.fetch_add(1, Ordering::Release);
        let mut t = self.thread.lock().map_err(|_| KernelError::Cuda("the host worker: lock poisoned".into()))?;
        if t.is_none() {
            let w = self.clone();
            let handle = std::thread::Builder::new()
                .name("mxr-host-calls".into())
                .spawn(move || w.watch())
                .map_err(|e| KernelError::Cuda(format!("starting the host worker thread: {e}")))?;
            *t = Some(handle);
        }
        Ok(())
    }

    /// Stops watching `calls` (a graph that drops).
    pub(super) fn unregister(&self, calls: &[Arc<HostCall>]) {
        if let Ok(mut v) = self.calls.lock() {
            v.retain(|c| !calls.iter().any(|d| Arc::ptr_eq(c, d)));
        }
        self.changed.fetch_add(1, Ordering::Release);
    }

    /// A graph with calls was launched: spin from now on.
    pub(super) fn kick(&self) {
        self.kicked.store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Ok(t) = self.thread.lock() {
            if let Some(h) = t.as_ref() {
                h.thread().unpark();
            }
        }
    }

    /// Ends the thread (the GPU closes).
    pub(super) fn shut(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            h.thread().unpark();
            let _ = h.join();
        }
    }

    fn watch(&self) {
        // an error here surfaces as the calls' frees failing, recorded by the context
        if let Some(ctx) = &self.ctx {
            let _ = ctx.bind_to_thread();
        }
        let (mut seen, mut calls): (u64, Vec<Arc<HostCall>>) = (u64::MAX, Vec::new());
        let mut active = 0u64;
        // the call after the one last answered
        let mut next = 0;
        while !self.stop.load(Ordering::Relaxed) {
            let changed = self.changed.load(Ordering::Acquire);
            if changed != seen {
                calls = self.calls.lock().map(|v| v.clone()).unwrap_or_default();
                seen = changed;
            }
            let mut served = false;
            let before = self.start.elapsed().as_nanos() as u64;
            // the cheapest post waiting first; among equals, the first after the one last
            // answered (in turn). A change of the calls (a new graph's) is taken up at once,
            // even while others' posts keep coming.
            while self.changed.load(Ordering::Acquire) == seen && !self.stop.load(Ordering::Relaxed) {
                let Some((_, _, i)) = calls
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.waiting().map(|cost| (cost, (i + calls.len() - next % calls.len()) % calls.len(), i)))
                    .min()
                else {
                    break;
                };
                served |= calls[i].serve();
                next = i + 1;
            }
            let now = self.start.elapsed().as_nanos() as u64;
            if served {
                active = now;
                self.busy_ns.fetch_add(now - before, Ordering::Relaxed);
            }
            let idle = now.saturating_sub(active.max(self.kicked.load(Ordering::Relaxed)));
            if idle < SPIN.as_nanos() as u64 {
                std::hint::spin_loop();
            } else if idle < 1_000_000_000 {
                // a step whose first post comes late (a long attention before the first
                // layer with host experts) waits a millisecond at most
                std::thread::park_timeout(Duration::from_millis(1));
            } else {
                // idle: a launch unparks the thread (an unpark before the park counts)
                std::thread::park_timeout(self.idle_park);
            }
        }
    }
}

impl Gpu {
    /// A host call's mapped buffers (`x_len` inputs, `ids_len` choices, `out_len` outputs)
    /// and its work, for [`Gpu::host_post`] and [`Gpu::host_wait`]. Not while capturing:
    /// page-locked memory cannot be allocated then.
    /// `cost` orders the posts waiting for the worker (None: all alike).
    pub fn host_call(
        &self,
        x_len: usize,
        ids_len: usize,
        out_len: usize,
        work: Box<HostFn>,
        cost: Option<Box<CostFn>>,
    ) -> Result<Arc<HostCall>> {
        let (x, xd) = self.mapped::<f32>(x_len)?;
        let (words, wd) = self.mapped::<u32>(ids_len + 3)?;
        let (out, od) = self.mapped::<f32>(out_len)?;
        Ok(Arc::new(HostCall {
            x: Region { at: x.at, len: x.len() },
            words: Region { at: words.at, len: words.len() },
            out: Region { at: out.at, len: out.len() },
            memory: Memory::Mapped { _x: x, _words: words, _out: out, dev: [xd, wd, od], seq: self.zeros::<u32>(4)? },
            k: ids_len,
            answered: AtomicU32::new(0),
            reported_timeout: AtomicU32::new(0),
            work,
            cost,
            error: Mutex::new(None),
        }))
    }

    fn capturing_call(&self, call: &Arc<HostCall>) -> Result<()> {
        if !self.capturing.load(Ordering::Relaxed) {
            return Err(KernelError::Cuda("a host call outside a graph capture".into()));
        }
        let mut kept = self.graph_calls.lock().map_err(|_| KernelError::Cuda("the graph's host calls: lock poisoned".into()))?;
        if !kept.iter().any(|c| Arc::ptr_eq(c, call)) {
            kept.push(call.clone());
        }
        Ok(())
    }

    /// While capturing a graph: x and ids to `call`'s mapped inputs, and the post that
    /// hands them to the host worker. The graph keeps `call`.
    pub fn host_post(&self, call: &Arc<HostCall>, x: &CudaView<'_, f32>, ids: &CudaView<'_, i32>) -> Result<()> {
        for (what, want, got) in [("input", call.x.len, x.len()), ("choices", call.k, ids.len())] {
            if want != got {
                return Err(KernelError::Length { op: "host post", what, expected: want, actual: got });
            }
        }
        let (dev, seq) = call.device()?;
        self.capturing_call(call)?;
        // several blocks write x; the last one done raises the count
        let blocks = (call.x.len as u32).div_ceil(256).clamp(1, 32);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (d, k) = (int("host_post", call.x.len)?, int("host_post", call.k)?);
        let [xd, wd, _] = dev;
        launch!(self, Source::HostExchange, "host_post", cfg, x, ids, &d, &k, seq, &xd, &wd)
    }

    /// While capturing a graph, after [`Gpu::host_post`]: waits for the worker's answer to
    /// that post and copies it to `out` (NaN where it did not come in time).
    pub fn host_wait(&self, call: &Arc<HostCall>, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
        if out.len() != call.out.len {
            return Err(KernelError::Length { op: "host wait", what: "output", expected: call.out.len, actual: out.len() });
        }
        let (dev, seq) = call.device()?;
        self.capturing_call(call)?;
        let n = int("host_wait", out.len())?;
        let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(256).max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let k = int("host_wait", call.k)?;
        let [_, wd, od] = dev;
        let timeout = TIMEOUT.as_nanos() as u64;
        launch!(self, Source::HostExchange, "host_wait", cfg, seq, &wd, &k, &od, &n, &timeout, out)
    }
}

/// The worker's handle for a GPU: started at the first graph with calls, ended with it.
pub(super) struct WorkerSlot(pub(super) Arc<Worker>);

impl WorkerSlot {
    pub(super) fn new(ctx: Arc<cudarc::driver::CudaContext>) -> Self {
        WorkerSlot(Worker::new(Some(ctx), Duration::from_millis(50)))
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        self.0.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl HostCall {
        /// A call in heap memory, as `Gpu::host_call` makes one in mapped memory.
        fn on_heap(x_len: usize, k: usize, out_len: usize, work: Box<HostFn>) -> Arc<HostCall> {
            Self::on_heap_costed(x_len, k, out_len, work, None)
        }

        fn on_heap_costed(x_len: usize, k: usize, out_len: usize, work: Box<HostFn>, cost: Option<Box<CostFn>>) -> Arc<HostCall> {
            // x, then the words, then out, each from a multiple of 8 bytes
            let slots = |n: usize| n.div_ceil(2);
            let (xs, ws, os) = (slots(x_len), slots(k + 3), slots(out_len));
            let mut mem = vec![0u64; xs + ws + os];
            let base = mem.as_mut_ptr() as usize;
            Arc::new(HostCall {
                x: Region { at: base, len: x_len },
                words: Region { at: base + 8 * xs, len: k + 3 },
                out: Region { at: base + 8 * (xs + ws), len: out_len },
                memory: Memory::Heap(mem),
                k,
                answered: AtomicU32::new(0),
                reported_timeout: AtomicU32::new(0),
                work,
                cost,
                error: Mutex::new(None),
            })
        }

        /// What host_post does on the GPU: the inputs, then the posted count.
        fn post(&self, x: &[f32], ids: &[i32], count: u32) {
            // SAFETY: the regions lie in the call's heap memory; the worker reads them only
            // after the count below, which it has not seen yet.
            unsafe {
                std::ptr::copy_nonoverlapping(x.as_ptr(), self.x.at as *mut f32, self.x.len);
                std::ptr::copy_nonoverlapping(ids.as_ptr(), self.words.at as *mut i32, self.k);
            }
            self.word(0).store(count, Ordering::Release);
        }

        /// What host_wait does: waits (up to 5 s) for the answer to `count`, then reads it.
        fn answer(&self, count: u32) -> Option<Vec<f32>> {
            let t = Instant::now();
            while self.word(1).load(Ordering::Acquire) != count {
                if t.elapsed() > Duration::from_secs(5) {
                    return None;
                }
                std::hint::spin_loop();
            }
            // SAFETY: answered: the worker is done with out until the next post.
            Some(unsafe { std::slice::from_raw_parts(self.out.at as *const f32, self.out.len) }.to_vec())
        }
    }

    /// The worker's side of the exchange, without a GPU: it answers each post once with
    /// its work's output; a failing work answers NaN and its error is reported once; a
    /// panic is caught and reported; after more than a second idle (parked, here, 20 s at a
    /// time) a kick wakes it for the next post; and a call dropped by its graph is no
    /// longer watched.
    #[test]
    fn the_host_worker_answers_posts_and_reports_failures() {
        let worker = Worker::new(None, Duration::from_secs(20));
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        // out = [flag per choice, then x * id per choice]; id 9: an error; id 7: a panic
        let work = move |x: &[f32], ids: &[i32], out: &mut [f32]| -> std::result::Result<(), String> {
            counted.fetch_add(1, Ordering::Relaxed);
            let (flags, rows) = out.split_at_mut(ids.len());
            for (j, &e) in ids.iter().enumerate() {
                match e {
                    9 => return Err(format!("id {e}")),
                    7 => panic!("id {e}"),
                    _ => {}
                }
                flags[j] = 1.0;
                for (o, v) in rows[j * x.len()..(j + 1) * x.len()].iter_mut().zip(x) {
                    *o = v * e as f32;
                }
            }
            Ok(())
        };
        let call = HostCall::on_heap(3, 2, 2 + 2 * 3, Box::new(work));
        worker.register(std::slice::from_ref(&call)).unwrap();
        worker.kick();
        call.post(&[1.0, 2.0, 3.0], &[2, 5], 1);
        assert_eq!(call.answer(1).unwrap(), [1.0, 1.0, 2.0, 4.0, 6.0, 5.0, 10.0, 15.0]);
        assert!(call.take_error().is_none());
        // a failing work: NaN, reported once
        call.post(&[1.0, 2.0, 3.0], &[9, 5], 2);
        assert!(call.answer(2).unwrap().iter().all(|v| v.is_nan()));
        assert_eq!(call.take_error().as_deref(), Some("id 9"));
        assert!(call.take_error().is_none());
        // a panic: caught, reported, and the worker goes on
        call.post(&[1.0, 2.0, 3.0], &[7, 5], 3);
        assert!(call.answer(3).is_some());
        assert!(call.take_error().unwrap().contains("panicked: id 7"));
        // idle past a second: parked for 20 s, and only the kick can wake it in time for
        // `answer`'s 5 s
        std::thread::sleep(Duration::from_millis(1300));
        worker.kick();
        call.post(&[1.0, 1.0, 1.0], &[3, 4], 4);
        assert_eq!(call.answer(4).expect("the kick woke the worker")[2..5], [3.0, 3.0, 3.0]);
        // each post ran the work once
        assert_eq!(runs.load(Ordering::Relaxed), 4);
        // the time answering is counted: a post whose work takes 30 ms adds at least that
        let busy = worker.busy();
        let slow = HostCall::on_heap(
            1,
            1,
            2,
            Box::new(|_: &[f32], _: &[i32], out: &mut [f32]| {
                std::thread::sleep(Duration::from_millis(30));
                out.fill(1.0);
                Ok(())
            }),
        );
        worker.register(std::slice::from_ref(&slow)).unwrap();
        worker.kick();
        slow.post(&[0.0], &[0], 1);
        assert_eq!(slow.answer(1).unwrap(), [1.0, 1.0]);
        // (counted once the worker's round over its calls ends, just after the answer)
        let t = Instant::now();
        while worker.busy() - busy < 0.03 && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let added = worker.busy() - busy;
        assert!((0.03..5.0).contains(&added), "busy {added} s for a 30 ms post");
        worker.unregister(std::slice::from_ref(&slow));
        // a call whose graph dropped is not answered any more
        worker.unregister(std::slice::from_ref(&call));
        std::thread::sleep(Duration::from_millis(100));
        call.post(&[1.0, 1.0, 1.0], &[3, 4], 5);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(call.word(1).load(Ordering::Acquire), 4);
        assert_eq!(runs.load(Ordering::Relaxed), 4);
        worker.shut();
    }

    /// Posts waiting together are answered cheapest first, whatever the order the calls
    /// were registered in: while a slow post holds the worker, a costly one (registered
    /// first) and a free one are posted; the free one is answered next.
    #[test]
    fn the_host_worker_answers_the_cheapest_post_first() {
        let worker = Worker::new(None, Duration::from_secs(20));
        let order = Arc::new(Mutex::new(Vec::new()));
        let call = |name: &'static str, sleep_ms: u64, cost: u32| {
            let seen = order.clone();
            let work = move |_: &[f32], _: &[i32], out: &mut [f32]| -> std::result::Result<(), String> {
                std::thread::sleep(Duration::from_millis(sleep_ms));
                seen.lock().unwrap().push(name);
                out.fill(1.0);
                Ok(())
            };
            HostCall::on_heap_costed(1, 1, 2, Box::new(work), Some(Box::new(move |_: &[i32]| cost)))
        };
        let (slow, costly, free) = (call("slow", 200, 1), call("costly", 0, 5), call("free", 0, 0));
        worker.register(&[slow.clone(), costly.clone(), free.clone()]).unwrap();
        worker.kick();
        slow.post(&[0.0], &[0], 1);
        // the worker has taken the slow post (its work runs 200 ms)
        std::thread::sleep(Duration::from_millis(50));
        costly.post(&[0.0], &[0], 1);
        free.post(&[0.0], &[0], 1);
        for c in [&slow, &costly, &free] {
            assert!(c.answer(1).is_some());
        }
        assert_eq!(*order.lock().unwrap(), ["slow", "free", "costly"]);
        worker.shut();
    }

    /// A graph registered while other graphs' posts keep the worker busy without a break is
    /// still answered: the worker takes up the new calls at once.
    #[test]
    fn a_new_call_is_answered_while_others_keep_posting() {
        let worker = Worker::new(None, Duration::from_secs(20));
        let busy = |_: &[f32], _: &[i32], out: &mut [f32]| -> std::result::Result<(), String> {
            std::thread::sleep(Duration::from_millis(1));
            out.fill(1.0);
            Ok(())
        };
        let graphs: Vec<_> = (0..2).map(|_| HostCall::on_heap(1, 1, 2, Box::new(busy))).collect();
        worker.register(&graphs).unwrap();
        worker.kick();
        // two graphs whose count of posts rises every 0.1 ms (their inputs stay as they
        // are): each answer (1 ms of work) finds new posts waiting
        let stop = Arc::new(AtomicBool::new(false));
        let posting: Vec<_> = graphs
            .into_iter()
            .map(|c| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        c.word(0).fetch_add(1, Ordering::Release);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        let late = HostCall::on_heap(1, 1, 2, Box::new(busy));
        worker.register(std::slice::from_ref(&late)).unwrap();
        late.post(&[0.0], &[0], 1);
        let answered = late.answer(1).is_some();
        stop.store(true, Ordering::Relaxed);
        posting.into_iter().for_each(|t| t.join().unwrap());
        assert!(answered, "the call registered late was not answered within 5 s");
        worker.shut();
    }
}
