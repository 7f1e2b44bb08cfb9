//! The CPU kernels' worker threads, and the ways work is split over them: a product by
//! tiles of weight rows, attention by head.
//!
//! Workers are a rayon pool per thread count asked for, started on first use and kept. A
//! product wakes parked workers instead of starting threads: decode runs a product per
//! matrix (and the offloaded model one expert at a time), and on the GPU machine's 16-core
//! virtual machine starting and joining 15 threads for each was a large part of a
//! millisecond-long product (docs/PERF.md, fourteenth session).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;
use rayon::ThreadPool;

use super::matmul::Threads;
use crate::KernelError;

type Result<T> = std::result::Result<T, KernelError>;

/// Weight rows per work item: enough to amortise the hand-out, small enough to balance.
pub(super) const TILE_ROWS: usize = 16;

/// Weight bytes x tokens below which another thread costs more than it saves: small
/// products run on fewer threads.
pub(super) const BYTES_PER_THREAD: usize = 1 << 18;

/// The pool of `n` workers (started the first time `n` is asked for).
fn pool(n: usize) -> Result<Arc<ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS.get_or_init(Default::default).lock().map_err(|_| KernelError::Threads("CPU worker pools poisoned".into()))?;
    if let Some(p) = pools.get(&n) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("mxr-cpu-{i}"))
        .build()
        .map_err(|e| KernelError::Threads(format!("starting {n} CPU worker threads: {e}")))?;
    let p = Arc::new(p);
    pools.insert(n, p.clone());
    Ok(p)
}

/// Weight matrices at least this large are read from memory with their rows prefetched
/// ([`super::ggml::prefetch`]): a large matrix is not in cache when decode reads it (every
/// weight is read once a token). Smaller ones may be, and prefetching rows already cached
/// costs ~7-15% (development machine).
pub(super) const PREFETCH_ABOVE: usize = 8 << 20;

/// Rows a tile prefetches ahead of the one being computed.
const AHEAD: usize = 2;

/// y [n_tokens, rows] with y[t, r] = value(r, t), computed in tiles of [`TILE_ROWS`] rows
/// (each tile takes every token before the next rows, so its weight rows are read from
/// memory once) on `threads`' workers, at most `max_threads` of them at a time (a small
/// product). Every value is computed by one call, so the result does not depend on the
/// number of threads. `prefetch(r)`, if given, is asked for each row once, [`AHEAD`] rows
/// before its values (the tile's first rows at its start).
pub(super) fn by_row_tiles(
    rows: usize,
    n_tokens: usize,
    threads: Threads,
    max_threads: usize,
    prefetch: Option<&(dyn Fn(usize) + Sync)>,
    value: impl Fn(usize, usize) -> Result<f32> + Sync,
    y: &mut [f32],
) -> Result<()> {
    debug_assert_eq!(y.len(), rows * n_tokens);
    if rows == 0 || n_tokens == 0 {
        return Ok(());
    }
    let n_tiles = rows.div_ceil(TILE_ROWS);
    let n_threads = threads.0.clamp(1, n_tiles).min(max_threads.max(1));
    // tile-major staging: tile i holds [n_tokens, its rows]; for one token that is y itself
    let tile_len = TILE_ROWS * n_tokens;
    let mut staged = if n_tokens == 1 { None } else { Some(vec![0f32; rows * n_tokens]) };
    let fill = |(i, out): (usize, &mut [f32])| -> Result<()> {
        let (r0, width) = (i * TILE_ROWS, out.len() / n_tokens);
        for k in 0..width {
            if let Some(p) = prefetch {
                let ahead = if k == 0 { 0..AHEAD + 1 } else { k + AHEAD..k + AHEAD + 1 };
                ahead.filter(|&j| j < width).for_each(|j| p(r0 + j));
            }
            for t in 0..n_tokens {
                out[t * width + k] = value(r0 + k, t)?;
            }
        }
        Ok(())
    };
    {
        let buf: &mut [f32] = match staged.as_deref_mut() {
            Some(s) => s,
            None => &mut *y,
        };
        if n_threads == 1 {
            buf.chunks_mut(tile_len).enumerate().try_for_each(fill)?;
        } else {
            // fewer threads than the pool has: hand out no piece smaller than a thread's share
            let min = if n_threads < threads.0 { n_tiles.div_ceil(n_threads) } else { 1 };
            pool(threads.0)?.install(|| buf.par_chunks_mut(tile_len).with_min_len(min).enumerate().try_for_each(fill))?;
        }
    }
    if let Some(s) = staged {
        for (i, tile) in s.chunks(tile_len).enumerate() {
            let (r0, width) = (i * TILE_ROWS, tile.len() / n_tokens);
            for (t, part) in tile.chunks_exact(width).enumerate() {
                y[t * rows + r0..t * rows + r0 + width].copy_from_slice(part);
            }
        }
    }
    Ok(())
}

/// Calls `f(i, &mut items[i])` for every item on `threads`' workers, at most
/// `max_threads` of them at a time (work too small for more), each item once. For work
/// split by attention head (the CPU forward's lightning and softmax attention).
pub fn for_each_mut<T: Send>(items: &mut [T], threads: Threads, max_threads: usize, f: impl Fn(usize, &mut T) + Sync) -> Result<()> {
    let n_threads = threads.0.clamp(1, items.len().max(1)).min(max_threads.max(1));
    if n_threads == 1 {
        items.iter_mut().enumerate().for_each(|(i, t)| f(i, t));
        return Ok(());
    }
    let min = if n_threads < threads.0 { items.len().div_ceil(n_threads) } else { 1 };
    pool(threads.0)?.install(|| items.par_iter_mut().with_min_len(min).enumerate().for_each(|(i, t)| f(i, t)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: usize, n_tokens: usize, threads: usize, max: usize) -> Vec<f32> {
        let mut y = vec![f32::NAN; rows * n_tokens];
        by_row_tiles(rows, n_tokens, Threads(threads), max, None, |r, t| Ok((r * 1000 + t) as f32), &mut y).unwrap();
        y
    }

    #[test]
    fn every_value_lands_at_its_row_and_token_for_any_split() {
        for (rows, n_tokens) in [(1, 1), (15, 1), (16, 1), (17, 3), (100, 7), (33, 2)] {
            let want: Vec<f32> = (0..n_tokens).flat_map(|t| (0..rows).map(move |r| (r * 1000 + t) as f32)).collect();
            for (threads, max) in [(1, 1), (4, 4), (4, 2), (3, 64)] {
                assert_eq!(table(rows, n_tokens, threads, max), want, "{rows} rows, {n_tokens} tokens, {threads} threads (max {max})");
            }
        }
    }

    #[test]
    fn every_row_is_prefetched_once_before_its_values() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for (rows, n_tokens, threads) in [(1, 1, 1), (2, 1, 1), (16, 1, 1), (17, 2, 3), (100, 3, 4)] {
            let asked: Vec<AtomicUsize> = (0..rows).map(|_| AtomicUsize::new(0)).collect();
            let p = |r: usize| _ = asked[r].fetch_add(1, Ordering::Relaxed);
            let mut y = vec![0f32; rows * n_tokens];
            by_row_tiles(
                rows,
                n_tokens,
                Threads(threads),
                64,
                Some(&p),
                |r, _| {
                    assert_eq!(asked[r].load(Ordering::Relaxed), 1, "row {r} computed before its prefetch");
                    Ok(0.0)
                },
                &mut y,
            )
            .unwrap();
            assert!(asked.iter().all(|a| a.load(Ordering::Relaxed) == 1), "{rows} rows, {n_tokens} tokens");
        }
    }

    #[test]
    fn for_each_mut_visits_every_item_once_with_its_index() {
        for (n, threads, max) in [(0, 4, 4), (1, 4, 4), (7, 1, 1), (64, 4, 4), (64, 4, 2), (5, 16, 16)] {
            let mut items: Vec<(usize, u32)> = vec![(usize::MAX, 0); n];
            for_each_mut(&mut items, Threads(threads), max, |i, it| {
                it.0 = i;
                it.1 += 1;
            })
            .unwrap();
            assert!(items.iter().enumerate().all(|(i, &(j, visits))| i == j && visits == 1), "{n} items, {threads} threads (max {max})");
        }
    }

    #[test]
    fn an_error_in_any_tile_is_returned() {
        for threads in [1, 4] {
            let mut y = vec![0f32; 64];
            let r = by_row_tiles(
                64,
                1,
                Threads(threads),
                64,
                None,
                |r, _| if r == 50 { Err(KernelError::Threads("row 50".into())) } else { Ok(0.0) },
                &mut y,
            );
            assert!(matches!(r, Err(KernelError::Threads(m)) if m == "row 50"), "{threads} threads");
        }
    }
}
