//! Streaming GGUF v3 writer.
//!
//! The header needs every tensor's shape and type up front (offsets are in it), but not
//! the data: declare tensors on a [`Builder`], then stream each tensor's bytes in declared
//! order, in as many chunks as the producer likes. Nothing but the header is held in
//! memory. [`Builder::create`] writes to a temporary file beside the target and renames it
//! only in [`FileWriter::finish`], after an fsync; a writer dropped before that (error,
//! panic, Ctrl-C unwinding) deletes the temporary file, so no partial output is left.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::error::FormatError;
use super::limits::{MAX_ALIGNMENT, MAX_DIMS, MAX_TENSOR_NAME_WRITE};
use super::value::{Array, Value};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, KEY_ALIGNMENT};
use crate::qtype::{type_info, TypeInfo};

type Result<T> = std::result::Result<T, FormatError>;

/// A tensor declared for writing.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    /// ggml order (innermost first).
    pub dims: Vec<u64>,
    pub type_info: &'static TypeInfo,
    /// Offset from the data section start.
    pub offset: u64,
    pub n_bytes: u64,
}

/// Metadata and tensor declarations of a file to be written.
#[derive(Clone, Debug)]
pub struct Builder {
    alignment: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<PlannedTensor>,
    data_size: u64,
}

impl Default for Builder {
    fn default() -> Self {
        Builder { alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new(), data_size: 0 }
    }
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a key (replacing an earlier value of the same key in place). Setting
    /// `general.alignment` changes the alignment: do it before adding tensors.
    pub fn set(&mut self, key: impl Into<String>, value: Value) -> Result<&mut Self> {
        let key = key.into();
        if key == KEY_ALIGNMENT {
            let a = match value {
                Value::U32(a) => a as u64,
                _ => return Err(FormatError::Writer("general.alignment must be a uint32".into())),
            };
            if !self.tensors.is_empty() {
                return Err(FormatError::Writer("set general.alignment before adding tensors".into()));
            }
            if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                return Err(FormatError::BadAlignment(a));
            }
            self.alignment = a;
        }
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        Ok(self)
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    /// Declares the next tensor: ggml type id and dims in ggml order.
    pub fn add_tensor(&mut self, name: impl Into<String>, type_id: u32, dims: &[u64]) -> Result<&PlannedTensor> {
        let name = name.into();
        let err = |m: String| FormatError::Writer(format!("tensor `{name}`: {m}"));
        if name.is_empty() || name.len() > MAX_TENSOR_NAME_WRITE {
            return Err(err(format!("name must be 1 to {MAX_TENSOR_NAME_WRITE} bytes (llama.cpp's limit)")));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(FormatError::DuplicateTensor(name));
        }
        let ti = type_info(type_id).ok_or_else(|| FormatError::UnknownTensorType { tensor: name.clone(), id: type_id })?;
        if dims.is_empty() || dims.len() > MAX_DIMS as usize {
            return Err(err(format!("{} dimensions (1 to {MAX_DIMS} allowed)", dims.len())));
        }
        if !dims[0].is_multiple_of(ti.block_size as u64) {
            return Err(err(format!("first dimension {} is not a multiple of the {} block size {}", dims[0], ti.name, ti.block_size)));
        }
        let n_bytes = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| (n / ti.block_size as u64).checked_mul(ti.type_size as u64))
            .ok_or_else(|| err(format!("shape {dims:?} overflows")))?;
        let offset = self.data_size;
        self.data_size = offset
            .checked_add(n_bytes)
            .map(|end| end.div_ceil(self.alignment) * self.alignment)
            .ok_or_else(|| err("data section size overflows".into()))?;
        self.tensors.push(PlannedTensor { name, dims: dims.to_vec(), type_info: ti, offset, n_bytes });
        Ok(&self.tensors[self.tensors.len() - 1])
    }

    /// The encoded header, padded to the alignment when tensors follow.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(GGUF_MAGIC);
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut h, key);
            h.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            put_value(&mut h, value);
        }
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.type_info.id.to_le_bytes());
            h.extend_from_slice(&t.offset.to_le_bytes());
        }
        if !self.tensors.is_empty() {
            h.resize((h.len() as u64).div_ceil(self.alignment) as usize * self.alignment as usize, 0);
        }
        h
    }

    /// Total file size once all data is written.
    pub fn file_size(&self) -> u64 {
        self.header_bytes().len() as u64 + self.data_size
    }

    /// Writes the header to `w` and returns a writer for the tensor data.
    pub fn write_to<W: Write>(self, mut w: W) -> Result<DataWriter<W>> {
        w.write_all(&self.header_bytes()).map_err(|e| FormatError::Writer(format!("writing header: {e}")))?;
        Ok(DataWriter { w, tensors: self.tensors, alignment: self.alignment, current: 0, written: 0 })
    }

    /// Starts writing `path` through a temporary file beside it.
    pub fn create(self, path: impl AsRef<Path>) -> Result<FileWriter> {
        let dest = path.as_ref().to_path_buf();
        let file_name = dest.file_name().ok_or_else(|| FormatError::Writer(format!("{} is not a file path", dest.display())))?;
        remove_stale_temps(&dest);
        let tmp = dest.with_file_name(format!("{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
        // named by the output the user asked for (the temporary name is ours)
        let file = File::create(&tmp).map_err(|e| FormatError::io(&dest, e))?;
        let mut guard = FileWriter { inner: None, tmp, dest, committed: false };
        guard.inner = Some(self.write_to(BufWriter::with_capacity(8 << 20, file))?);
        Ok(guard)
    }
}

/// Removes `NAME.tmp-PID` files beside `dest` left by writers that were killed (SIGKILL,
/// power loss) and whose process no longer runs, so a rerun leaves no debris.
fn remove_stale_temps(dest: &Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() && Path::new("/proc/self").exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_str(h, s),
        Value::Array(a) => put_array(h, a),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(h: &mut Vec<u8>, a: &Array) {
    h.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    h.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! le {
        ($v:expr) => {
            $v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes()))
        };
    }
    match a {
        Array::U8(v) => h.extend_from_slice(v),
        Array::I8(v) => v.iter().for_each(|&x| h.push(x as u8)),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F64(v) => le!(v),
        Array::Bool(v) => v.iter().for_each(|&x| h.push(x as u8)),
        Array::String(v) => v.iter().for_each(|s| put_str(h, s)),
        Array::Array(v) => v.iter().for_each(|inner| put_array(h, inner)),
    }
}

/// Streams tensor data, in declared order, into any `Write`.
pub struct DataWriter<W: Write> {
    w: W,
    tensors: Vec<PlannedTensor>,
    alignment: u64,
    current: usize,
    written: u64,
}

impl<W: Write> DataWriter<W> {
    /// The tensor the next bytes belong to; `None` when all are written.
    pub fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.tensors.get(self.current)
    }

    /// Appends `bytes` to the current tensor; moves on (writing padding) when it is complete.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let t = self.tensors.get(self.current).ok_or_else(|| FormatError::Writer("data written after the last tensor".into()))?;
        let left = t.n_bytes - self.written;
        if bytes.len() as u64 > left {
            return Err(FormatError::Writer(format!(
                "tensor `{}`: {} bytes written, only {left} left of {}",
                t.name,
                bytes.len(),
                t.n_bytes
            )));
        }
        let name = t.name.clone();
        self.w.write_all(bytes).map_err(|e| FormatError::Writer(format!("writing tensor `{name}`: {e}")))?;
        self.written += bytes.len() as u64;
        self.advance_if_complete()
    }

    /// Writes one whole tensor, which must be the next declared one.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        match self.next_tensor() {
            Some(t) if t.name == name && self.written == 0 && t.n_bytes == bytes.len() as u64 => self.write(bytes),
            Some(t) => Err(FormatError::Writer(format!(
                "expected all {} bytes of tensor `{}` next, got {} bytes for `{name}`",
                t.n_bytes,
                t.name,
                bytes.len()
            ))),
            None => Err(FormatError::Writer(format!("tensor `{name}` written after the last tensor"))),
        }
    }

    fn advance_if_complete(&mut self) -> Result<()> {
        while let Some(t) = self.tensors.get(self.current) {
            if self.written < t.n_bytes {
                break;
            }
            let end = t.offset + t.n_bytes;
            let pad = end.div_ceil(self.alignment) * self.alignment - end;
            let name = t.name.clone();
            self.w.write_all(&vec![0u8; pad as usize]).map_err(|e| FormatError::Writer(format!("padding after `{name}`: {e}")))?;
            self.current += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Checks every tensor was written, flushes and returns the sink.
    pub fn finish(mut self) -> Result<W> {
        self.advance_if_complete()?;
        if let Some(t) = self.next_tensor() {
            return Err(FormatError::Writer(format!("tensor `{}` incomplete: {} of {} bytes written", t.name, self.written, t.n_bytes)));
        }
        self.w.flush().map_err(|e| FormatError::Writer(format!("flush: {e}")))?;
        Ok(self.w)
    }
}

/// A [`DataWriter`] into a temporary file that becomes `dest` only on [`FileWriter::finish`].
pub struct FileWriter {
    inner: Option<DataWriter<BufWriter<File>>>,
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl FileWriter {
    fn data(&mut self) -> Result<&mut DataWriter<BufWriter<File>>> {
        self.inner.as_mut().ok_or_else(|| FormatError::Writer("writer already finished".into()))
    }

    pub fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.inner.as_ref().and_then(|d| d.next_tensor())
    }

    /// An error while writing, named by the output the user asked for (a full disk
    /// shows as "writing OUT: ...: No space left on device").
    fn at(&self, e: FormatError) -> FormatError {
        match e {
            FormatError::Writer(m) => FormatError::Writer(format!("writing {}: {m}", self.dest.display())),
            other => other,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let r = self.data()?.write(bytes);
        r.map_err(|e| self.at(e))
    }

    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let r = self.data()?.write_tensor(name, bytes);
        r.map_err(|e| self.at(e))
    }

    /// Completes the file: checks all tensors were written, fsyncs, renames over `dest`.
    pub fn finish(mut self) -> Result<PathBuf> {
        let data = self.inner.take().ok_or_else(|| FormatError::Writer("writer already finished".into()))?;
        let file = match data.finish() {
            Ok(w) => w.into_inner().map_err(|e| FormatError::io(&self.dest, e.into_error()))?,
            Err(e) => return Err(self.at(e)),
        };
        file.sync_all().map_err(|e| FormatError::io(&self.dest, e))?;
        drop(file);
        fs::rename(&self.tmp, &self.dest).map_err(|e| FormatError::io(&self.dest, e))?;
        self.committed = true;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; failure here is not an error of the data.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(self.dest.clone())
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
