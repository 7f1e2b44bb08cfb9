//! The one module that calls into ggml. Every call is wrapped in a safe function that
//! validates buffer lengths against the type's block layout before passing pointers.
//!
//! ggml semantics used here: `ggml_quantize_chunk` without an importance matrix runs the
//! deterministic `*_ref` quantizers; `ggml_get_type_traits(t)->to_float` dequantizes;
//! the CPU traits give, per weight type, the activation type (`vec_dot_type`), the
//! (SIMD) activation quantizer `from_float`, and `vec_dot` (one row · one activation row).

use std::os::raw::{c_int, c_void};
use std::sync::Once;

use llama_cpp_sys_2 as sys;
use mxr_quant::QType;

use crate::KernelError;

type Result<T> = std::result::Result<T, KernelError>;

static INIT: Once = Once::new();

/// Initializes ggml's CPU tables (f16 lookup tables etc.). Idempotent; every entry point
/// below calls it.
pub fn init() {
    // SAFETY: ggml_cpu_init takes no arguments, guards itself with a critical section and
    // only fills static tables; Once makes us call it a single time anyway.
    INIT.call_once(|| unsafe { sys::ggml_cpu_init() });
}

/// ggml's (block size, bytes per block, name) for any type id below GGML_TYPE_COUNT.
pub fn type_facts(id: u32) -> Option<(i64, usize, String)> {
    if id >= sys::GGML_TYPE_COUNT {
        return None;
    }
    // SAFETY: ids below GGML_TYPE_COUNT index ggml's static type_traits table; the name is a
    // static NUL-terminated string (or null for removed types, handled).
    unsafe {
        let name = sys::ggml_type_name(id);
        let name = if name.is_null() { String::new() } else { std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned() };
        Some((sys::ggml_blck_size(id), sys::ggml_type_size(id), name))
    }
}

fn check_blocks(op: &'static str, qtype: QType, n: usize) -> Result<usize> {
    qtype.row_bytes(n).ok_or(KernelError::PartialBlock { op, qtype, n, block: qtype.block_size() })
}

fn check_len(op: &'static str, what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(KernelError::Length { op, what, expected, actual });
    }
    Ok(())
}

/// `ggml_quantize_chunk` (no importance matrix) of `src`, rows of `n_per_row` values.
pub fn quantize_chunk(qtype: QType, src: &[f32], n_per_row: usize) -> Result<Vec<u8>> {
    init();
    if qtype == QType::Q8K {
        return Err(KernelError::Unsupported { what: "ggml CPU quantize_chunk", qtype });
    }
    let row = check_blocks("quantize_chunk", qtype, n_per_row)?;
    if n_per_row == 0 || !src.len().is_multiple_of(n_per_row) {
        return Err(KernelError::Length { op: "quantize_chunk", what: "source", expected: n_per_row.max(1), actual: src.len() });
    }
    let nrows = src.len() / n_per_row;
    let mut out = vec![0u8; row * nrows];
    // SAFETY: `src` holds nrows * n_per_row floats, `out` nrows * row_size bytes, as
    // ggml_quantize_chunk requires; n_per_row is a whole number of blocks; no imatrix is
    // needed for the types QType covers (Q8K excluded above).
    let written = unsafe {
        sys::ggml_quantize_chunk(
            qtype.ggml_id(),
            src.as_ptr(),
            out.as_mut_ptr() as *mut c_void,
            0,
            nrows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    check_len("quantize_chunk", "output bytes", out.len(), written)?;
    Ok(out)
}

/// ggml's `to_float` for `qtype`: dequantizes `bytes` into `out`.
pub fn to_float(qtype: QType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    init();
    check_len("to_float", "input bytes", check_blocks("to_float", qtype, out.len())?, bytes.len())?;
    if qtype == QType::F32 {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        return Ok(());
    }
    // SAFETY: static traits table entry for a valid id.
    let f = unsafe { (*sys::ggml_get_type_traits(qtype.ggml_id())).to_float }
        .ok_or(KernelError::Unsupported { what: "ggml CPU to_float", qtype })?;
    // SAFETY: bytes holds exactly out.len() elements of qtype.
    unsafe { f(bytes.as_ptr() as *const c_void, out.as_mut_ptr(), out.len() as i64) };
    Ok(())
}

type VecDotFn = unsafe extern "C" fn(c_int, *mut f32, usize, *const c_void, usize, *const c_void, usize, c_int);
type FromFloatFn = unsafe extern "C" fn(*const f32, *mut c_void, i64);

/// ggml's CPU dot product for one weight type: quantize activations once with
/// [`DotKernel::quantize_activation`], then [`DotKernel::dot`] them with each weight row.
#[derive(Clone, Copy)]
pub struct DotKernel {
    pub wtype: QType,
    /// The activation type (`vec_dot_type`).
    pub atype: QType,
    vec_dot: VecDotFn,
    from_float: FromFloatFn,
}

impl DotKernel {
    pub fn new(wtype: QType) -> Result<DotKernel> {
        init();
        // SAFETY: static CPU traits table entry for a valid id.
        let t = unsafe { *sys::ggml_get_type_traits_cpu(wtype.ggml_id()) };
        let vec_dot = t.vec_dot.ok_or(KernelError::Unsupported { what: "ggml CPU vec_dot", qtype: wtype })?;
        let atype = QType::from_ggml(t.vec_dot_type).filter(|&a| a == wtype.vec_dot_type()).ok_or_else(|| KernelError::TableMismatch {
            qtype: wtype,
            detail: format!("ggml vec_dot_type is type id {}", t.vec_dot_type),
        })?;
        // SAFETY: as above, for the activation type.
        let from_float = unsafe { (*sys::ggml_get_type_traits_cpu(atype.ggml_id())).from_float }
            .ok_or(KernelError::Unsupported { what: "ggml CPU from_float", qtype: atype })?;
        Ok(DotKernel { wtype, atype, vec_dot, from_float })
    }

    /// Bytes of one quantized activation row of `n` values.
    pub fn activation_bytes(&self, n: usize) -> Result<usize> {
        check_blocks("activation", self.atype, n)
    }

    /// Quantizes one activation row `x` into `out` (`activation_bytes(x.len())` bytes).
    pub fn quantize_activation(&self, x: &[f32], out: &mut [u8]) -> Result<()> {
        check_len("quantize_activation", "output bytes", self.activation_bytes(x.len())?, out.len())?;
        // SAFETY: x is a whole number of activation blocks and out exactly their size. ggml's
        // SIMD quantizers use unaligned loads and stores.
        unsafe { (self.from_float)(x.as_ptr(), out.as_mut_ptr() as *mut c_void, x.len() as i64) };
        Ok(())
    }

    /// One weight row (`n` values of `wtype`) · one quantized activation row.
    pub fn dot(&self, n: usize, w: &[u8], a: &[u8]) -> Result<f32> {
        check_len("vec_dot", "weight row bytes", check_blocks("vec_dot", self.wtype, n)?, w.len())?;
        check_len("vec_dot", "activation bytes", self.activation_bytes(n)?, a.len())?;
        if n > c_int::MAX as usize {
            return Err(KernelError::Length { op: "vec_dot", what: "row", expected: c_int::MAX as usize, actual: n });
        }
        let mut s = 0f32;
        // SAFETY: w and a hold exactly one row of n values in their types (checked above); nrc
        // = 1 computes a single dot product, so the strides are unused; s is one f32.
        unsafe { (self.vec_dot)(n as c_int, &mut s, 0, w.as_ptr() as *const c_void, 0, a.as_ptr() as *const c_void, 0, 1) };
        Ok(s)
    }
}

/// Asks the CPU to start loading `bytes` into its caches (one prefetch per 64-byte line),
/// so that a product reading them next finds them on the way. ggml's dot products issue
/// their loads between much arithmetic, and from memory one core then reads only about a
/// quarter of what it reads in a plain loop (4.1 against 13.5 GB/s on the development
/// machine; 7.8 with rows prefetched two ahead). No effect on results. A no-op off x86-64.
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch is a hint that never faults and writes nothing; the address is
        // inside a live slice. SSE (prefetcht0) is part of every x86-64 CPU.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// A zeroed byte buffer aligned to 64 bytes, for activation rows handed to ggml (its
/// structs, e.g. Q8_K's leading f32, assume natural alignment of their fields).
pub struct AlignedBytes {
    words: Vec<Align64>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        AlignedBytes { words: vec![Align64([0; 64]); len.div_ceil(64)], len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `words` owns at least `len` initialized bytes (Align64 is plain bytes with no
        // padding), and the borrow of self keeps them alive and unaliased by &mut.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in as_bytes, with the unique borrow of self.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}
