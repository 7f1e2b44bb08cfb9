//! GGUF v2/v3 reader: parses the header from a byte slice (the mmap of the file) with
//! strict validation, and hands out zero-copy views of tensor data.
//!
//! Layout (little-endian): magic "GGUF", version u32, tensor_count u64, kv_count u64,
//! kv_count x (key string, value type u32, value), tensor_count x (name string, n_dims u32,
//! ne[n_dims] u64, ggml type u32, data offset u64), padding to `general.alignment`
//! (default 32), then the data section; each tensor's offset is relative to its start.
//! Strings are a u64 byte length and UTF-8 bytes; arrays are an element type u32, a u64
//! count and the elements (arrays may nest).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::error::FormatError;
use super::limits::*;
use super::value::{Array, Value, ValueType};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, KEY_ALIGNMENT};
use crate::qtype::{type_info, QType, TypeInfo};

type Result<T> = std::result::Result<T, FormatError>;

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<u64>,
    pub type_info: &'static TypeInfo,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The mxr compute type, if mxr computes with this tensor's type.
    pub fn qtype(&self) -> Option<QType> {
        QType::from_ggml(self.type_info.id)
    }

    /// Rows of a matrix view: the product of all dims but the first.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// A parsed GGUF header: metadata in file order and the tensor directory.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    /// Bytes from the data section start to the end of the file.
    pub data_len: u64,
}

impl Header {
    /// Parses and validates a whole GGUF file held in `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic = c.take(4, || "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(FormatError::BadMagic { found: [magic[0], magic[1], magic[2], magic[3]] });
        }
        let version = c.u32(|| "version".into())?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(FormatError::BigEndian { version });
        }
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let n_tensors = c.count(MAX_TENSOR_COUNT, 8 + 4 + 4 + 8, || "tensor count".into())?;
        let n_kv = c.count(MAX_KV_COUNT, 8 + 4, || "metadata key/value count".into())?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(|| format!("key of metadata entry {i}"))?;
            let value = c.value(&|| format!("value of key `{key}`"))?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(FormatError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a != 0 && a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
                Some(a) => return Err(FormatError::BadAlignment(a)),
                None => return Err(wrong_type(KEY_ALIGNMENT, "uint32", v)),
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let info = c.tensor_info(i)?;
            if info.offset % alignment != 0 {
                return Err(FormatError::Misaligned { tensor: info.name, offset: info.offset, alignment });
            }
            if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(FormatError::DuplicateTensor(info.name));
            }
            tensors.push(info);
        }

        let header_end = c.pos as u64;
        let file_len = bytes.len() as u64;
        let data_offset = header_end.div_ceil(alignment) * alignment;
        let data_len = file_len.saturating_sub(data_offset);
        check_layout(&tensors, data_len)?;
        Ok(Header { version, alignment, metadata, key_index, tensors, tensor_index, data_offset, data_len })
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// An unsigned integer key (any integer width); error if present with another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_as(key, "unsigned integer", Value::as_u64)
    }

    /// A float key (f32, f64 or an integer); error if present with another type.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get_as(key, "number", Value::as_f64)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(key, "string", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get_as(key, "bool", Value::as_bool)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong_type(key, "array", v)),
        }
    }

    fn get_as<T>(&self, key: &str, expected: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| wrong_type(key, expected, v)),
        }
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Absolute byte range of a tensor's data (validated at parse time to lie in the file).
    pub fn data_range(&self, info: &TensorInfo) -> std::ops::Range<usize> {
        let start = (self.data_offset + info.offset) as usize;
        start..start + info.n_bytes as usize
    }
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> FormatError {
    FormatError::WrongType { key: key.into(), expected: expected.into(), found: found.value_type().name().into() }
}

/// Every tensor lies inside the data section and no two overlap.
fn check_layout(tensors: &[TensorInfo], data_len: u64) -> Result<()> {
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for (i, t) in order.iter().enumerate() {
        let end = t.offset.checked_add(t.n_bytes).filter(|&e| e <= data_len);
        let Some(end) = end else {
            let end = t.offset.saturating_add(t.n_bytes);
            return Err(FormatError::OutOfBounds { tensor: t.name.clone(), start: t.offset, end, data_len });
        };
        if let Some(next) = order.get(i + 1) {
            if end > next.offset && t.n_bytes > 0 && next.n_bytes > 0 {
                return Err(FormatError::Overlap { first: t.name.clone(), second: next.name.clone() });
            }
        }
    }
    Ok(())
}

/// Little-endian reads over the file bytes; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(FormatError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n - self.remaining(),
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 count of items of at least `min_item_bytes` each, capped by `max` and by the
    /// bytes left in the file (so a corrupt count never drives an allocation).
    fn count(&mut self, max: u64, min_item_bytes: u64, what: impl Fn() -> String) -> Result<u64> {
        let offset = self.pos as u64;
        let n = self.u64(&what)?;
        if n > max {
            return Err(FormatError::TooLarge { what: what(), offset, value: n, max });
        }
        let min_item_bytes = min_item_bytes.max(1);
        if n > self.remaining() / min_item_bytes {
            // Cannot fit in what is left of the file: report it as the truncation it is.
            return Err(FormatError::Truncated {
                what: format!("{n} items declared by {} at offset {offset} (at least {min_item_bytes} bytes each)", what()),
                offset: self.pos as u64,
                need: n.saturating_mul(min_item_bytes) - self.remaining(),
                len: self.buf.len() as u64,
            });
        }
        Ok(n)
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String> {
        let offset = self.pos as u64;
        let len = self.count(MAX_STRING_LEN, 1, || format!("length of {}", what()))?;
        let bytes = self.take(len, &what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::BadUtf8 { what: what(), offset })
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<ValueType> {
        let offset = self.pos as u64;
        let id = self.u32(|| format!("type of {}", what()))?;
        ValueType::from_id(id).ok_or_else(|| FormatError::UnknownValueType { what: what(), offset, id })
    }

    fn value(&mut self, what: &dyn Fn() -> String) -> Result<Value> {
        let t = self.value_type(what)?;
        self.value_of(t, what, 0)
    }

    fn value_of(&mut self, t: ValueType, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => Value::Bool(self.bool(what)?),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => Value::Array(self.array_value(what, depth)?),
        })
    }

    fn bool(&mut self, what: &dyn Fn() -> String) -> Result<bool> {
        let offset = self.pos as u64;
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(FormatError::BadBool { what: what(), offset, value }),
        }
    }

    fn array_value(&mut self, what: &dyn Fn() -> String, depth: usize) -> Result<Array> {
        if depth >= MAX_ARRAY_DEPTH {
            let max = MAX_ARRAY_DEPTH as u64;
            return Err(FormatError::TooLarge {
                what: format!("array nesting of {}", what()),
                offset: self.pos as u64,
                value: depth as u64 + 1,
                max,
            });
        }
        let elem = self.value_type(&|| format!("array element type of {}", what()))?;
        let min_size = elem.scalar_size().unwrap_or(if elem == ValueType::String { 8 } else { 12 }) as u64;
        let n = self.count(MAX_ARRAY_LEN, min_size, || format!("array length of {}", what()))? as usize;
        let item = |i: usize| move || format!("element {i} of {}", what());
        macro_rules! scalars {
            ($variant:ident, $t:ty, $size:expr) => {{
                let bytes = self.take((n * $size) as u64, what)?;
                Array::$variant(bytes.chunks_exact($size).map(|b| <$t>::from_le_bytes(b.try_into().unwrap_or([0; $size]))).collect())
            }};
        }
        Ok(match elem {
            ValueType::U8 => Array::U8(self.take(n as u64, what)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n as u64, what)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => scalars!(U16, u16, 2),
            ValueType::I16 => scalars!(I16, i16, 2),
            ValueType::U32 => scalars!(U32, u32, 4),
            ValueType::I32 => scalars!(I32, i32, 4),
            ValueType::F32 => scalars!(F32, f32, 4),
            ValueType::U64 => scalars!(U64, u64, 8),
            ValueType::I64 => scalars!(I64, i64, 8),
            ValueType::F64 => scalars!(F64, f64, 8),
            ValueType::Bool => Array::Bool((0..n).map(|i| self.bool(&item(i))).collect::<Result<_>>()?),
            ValueType::String => Array::String((0..n).map(|i| self.string(item(i))).collect::<Result<_>>()?),
            ValueType::Array => {
                let items = (0..n).map(|i| self.array_value(&item(i), depth + 1));
                Array::Array(items.collect::<Result<_>>()?)
            }
        })
    }

    fn tensor_info(&mut self, i: u64) -> Result<TensorInfo> {
        let name = self.string(|| format!("name of tensor {i}"))?;
        let what = |field: &str| format!("{field} of tensor `{name}`");
        let offset = self.pos as u64;
        let n_dims = self.u32(|| what("dimension count"))?;
        if n_dims > MAX_DIMS {
            let (value, max) = (n_dims as u64, MAX_DIMS as u64);
            return Err(FormatError::TooLarge { what: what("dimension count"), offset, value, max });
        }
        let dims = (0..n_dims).map(|_| self.u64(|| what("dimensions"))).collect::<Result<Vec<u64>>>()?;
        let id = self.u32(|| what("type"))?;
        let data_offset = self.u64(|| what("data offset"))?;
        let type_info = type_info(id).ok_or_else(|| FormatError::UnknownTensorType { tensor: name.clone(), id })?;
        let bad = |reason: String| FormatError::BadShape { tensor: name.clone(), shape: dims.clone(), reason };
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|&n| n <= i64::MAX as u64))
            .ok_or_else(|| bad("element count overflows".into()))?;
        let first = dims.first().copied().unwrap_or(1);
        if first % type_info.block_size as u64 != 0 {
            return Err(bad(format!("first dimension is not a multiple of the {} block size {}", type_info.name, type_info.block_size)));
        }
        let n_bytes = (n_elements / type_info.block_size as u64)
            .checked_mul(type_info.type_size as u64)
            .ok_or_else(|| bad("byte size overflows".into()))?;
        Ok(TensorInfo { name, dims, type_info, offset: data_offset, n_elements, n_bytes })
    }
}

/// A GGUF file mapped into memory; tensor data are views into the mapping.
pub struct GgufFile {
    path: PathBuf,
    mmap: Option<Arc<Mmap>>,
    header: Header,
}

/// The mapped file's bytes, held apart from the [`GgufFile`] (work that outlives a borrow of
/// the file, such as a CUDA graph's host nodes, keeps one; the mapping lasts while any does).
#[derive(Clone)]
pub struct SharedBytes(Option<Arc<Mmap>>);

impl SharedBytes {
    pub fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |m| &m[..])
    }
}

/// A tensor's header entry and its bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
}

impl GgufFile {
    /// Maps and parses `path`. The file must not be modified while it is open.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| FormatError::io(&path, e))?;
        let len = file.metadata().map_err(|e| FormatError::io(&path, e))?.len();
        if len == 0 {
            // mmap of an empty file fails on Linux; parse the empty slice for the same error as a truncated file.
            let header = Header::parse(&[])?;
            return Ok(GgufFile { path, mmap: None, header });
        }
        // SAFETY: the mapping is read-only and private to this process. The usual mmap caveat
        // applies: another process truncating the file while it is mapped would fault; mxr
        // documents that model files must not be modified while in use.
        #[allow(unsafe_code)]
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(&path, e))?;
        let header = Header::parse(&mmap)?;
        Ok(GgufFile { path, mmap: Some(Arc::new(mmap)), header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.mmap.as_deref().map_or(&[], |m| &m[..])
    }

    /// Lets the kernel take back this process's pages under `data` (bytes of this file
    /// that another copy serves now: experts in page-locked memory or on the GPU). A later
    /// read maps them from the file again, as on first use. Returns the bytes advised (0
    /// where `data` lies outside the file or the advice is refused).
    pub fn release_pages(&self, data: &[u8]) -> usize {
        let Some(m) = self.mmap.as_deref() else { return 0 };
        let Some(offset) = (data.as_ptr() as usize).checked_sub(m.as_ptr() as usize) else { return 0 };
        if data.is_empty() || offset + data.len() > m.len() {
            return 0;
        }
        // SAFETY: the mapping is a shared read-only mapping of the file: MADV_DONTNEED
        // drops the page table entries only, and the next access reads the same bytes
        // from the page cache or the file (no private copy is lost).
        #[allow(unsafe_code)]
        let r = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len()) };
        if r.is_ok() {
            data.len()
        } else {
            0
        }
    }

    /// The whole file, as a handle that keeps the mapping.
    pub fn shared_bytes(&self) -> SharedBytes {
        SharedBytes(self.mmap.clone())
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.header.tensor(name).map(|info| self.view(info))
    }

    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.header.tensors().iter().map(|info| self.view(info))
    }

    fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        TensorView { info, data: &self.bytes()[self.header.data_range(info)] }
    }
}
