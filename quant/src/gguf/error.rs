//! The one error type of the GGUF reader and writer. Every variant says what is wrong and
//! where (byte offset, key or tensor name) so a user can tell a truncated download from a
//! writer bug.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    // The I/O error is part of the message, not a `source` (anyhow's chain would print it twice).
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("file ends at byte {len} while reading {what} at offset {offset} ({need} more bytes needed)")]
    Truncated { what: String, offset: u64, need: u64, len: u64 },
    #[error("not a gguf file: magic is {found:02x?} (expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("big-endian gguf files are not supported (version field reads {version:#010x})")]
    BigEndian { version: u32 },
    #[error("unsupported gguf version {0} (mxr reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("{what} at offset {offset} is {value}, more than the limit of {max}")]
    TooLarge { what: String, offset: u64, value: u64, max: u64 },
    #[error("{what} at offset {offset} has unknown value type id {id}")]
    UnknownValueType { what: String, offset: u64, id: u32 },
    #[error("{what} at offset {offset} is not valid utf-8")]
    BadUtf8 { what: String, offset: u64 },
    #[error("bool {what} at offset {offset} has byte value {value} (expected 0 or 1)")]
    BadBool { what: String, offset: u64, value: u8 },
    #[error("metadata key `{0}` appears twice")]
    DuplicateKey(String),
    #[error("tensor `{0}` appears twice")]
    DuplicateTensor(String),
    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType { key: String, expected: String, found: String },
    #[error("general.alignment is {0}; it must be a non-zero power of two")]
    BadAlignment(u64),
    #[error("tensor `{tensor}` has unknown ggml type id {id}")]
    UnknownTensorType { tensor: String, id: u32 },
    #[error("tensor `{tensor}` has shape {shape:?}: {reason}")]
    BadShape { tensor: String, shape: Vec<u64>, reason: String },
    #[error("tensor `{tensor}` data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned { tensor: String, offset: u64, alignment: u64 },
    #[error("tensor `{tensor}` data [{start}, {end}) lies outside the data section of {data_len} bytes")]
    OutOfBounds { tensor: String, start: u64, end: u64, data_len: u64 },
    #[error("tensors `{first}` and `{second}` overlap in the data section")]
    Overlap { first: String, second: String },
    #[error("gguf writer: {0}")]
    Writer(String),
}

impl FormatError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io { path: path.into(), err: source }
    }
}
