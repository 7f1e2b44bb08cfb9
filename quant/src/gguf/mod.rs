//! The GGUF v3 container: [`reader`] (mmap, zero-copy, validating) and [`writer`]
//! (streaming, atomic), metadata [`value`]s, and the key names mxr uses ([`keys`]).

pub mod error;
pub mod keys;
pub mod limits;
pub mod reader;
pub mod value;
pub mod writer;

pub use error::FormatError;
pub use reader::{GgufFile, Header, SharedBytes, TensorInfo, TensorView};
pub use value::{Array, Value, ValueType};
pub use writer::{Builder, DataWriter, FileWriter, PlannedTensor};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The key that overrides the alignment.
pub const KEY_ALIGNMENT: &str = keys::GENERAL_ALIGNMENT;
