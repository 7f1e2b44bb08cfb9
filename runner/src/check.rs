//! `mxr inspect --check`: every value of every tensor dequantized and tested for NaN and
//! infinity (a damaged download or a bad conversion), on all cores.

use mxr_quant::gguf::{GgufFile, TensorInfo};
use mxr_quant::reference::dequantize;

/// Non-finite values found in one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub tensor: String,
    pub nan: u64,
    pub inf: u64,
    /// Index of the first non-finite value.
    pub first: u64,
}

/// Checks one tensor; None when every value is finite (or the type is one mxr does not
/// decode: then `skipped` is set).
fn check_tensor(file: &GgufFile, info: &TensorInfo, skipped: &mut bool) -> Option<Finding> {
    let Some(q) = info.qtype() else {
        *skipped = true;
        return None;
    };
    let bytes = &file.bytes()[file.header().data_range(info)];
    let cols = info.dims.first().copied().unwrap_or(1).max(1) as usize;
    let row_bytes = q.row_bytes(cols)?;
    // a few rows at a time: bounded memory whatever the tensor's size
    let rows_per_chunk = (1usize << 20).div_ceil(cols).max(1);
    let mut buf = vec![0f32; rows_per_chunk * cols];
    let (mut nan, mut inf, mut first, mut index) = (0u64, 0u64, None, 0u64);
    for chunk in bytes.chunks(rows_per_chunk * row_bytes) {
        let n = chunk.len() / row_bytes * cols;
        dequantize(q, chunk, &mut buf[..n]);
        for &v in &buf[..n] {
            if !v.is_finite() {
                if v.is_nan() {
                    nan += 1;
                } else {
                    inf += 1;
                }
                first.get_or_insert(index);
            }
            index += 1;
        }
    }
    first.map(|first| Finding { tensor: info.name.clone(), nan, inf, first })
}

/// Findings in file order, and the names of tensors of types mxr cannot decode.
pub fn check(file: &GgufFile, threads: usize) -> (Vec<Finding>, Vec<String>) {
    let tensors = file.header().tensors();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, tensors.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(info) = tensors.get(i) else { break };
                let mut skipped = false;
                let f = check_tensor(file, info, &mut skipped);
                if let Ok(mut r) = results.lock() {
                    r.push((i, f, skipped));
                }
            });
        }
    });
    let mut r = results.into_inner().unwrap_or_default();
    r.sort_by_key(|(i, _, _)| *i);
    let skipped = r.iter().filter(|(_, _, s)| *s).map(|(i, _, _)| tensors[*i].name.clone()).collect();
    (r.into_iter().filter_map(|(_, f, _)| f).collect(), skipped)
}
