//! Caps that keep a hostile or corrupt file from making the reader allocate or loop
//! without bound. Each is far above what any real model needs (the real MiniMax-Text-01
//! has ~1,000 tensors, a 200k-entry vocabulary, and a tokenizer.json of a few MB).
//! Every length is additionally checked against the bytes actually left in the file
//! before anything is allocated.

/// Longest string (key, value, tensor name, array element), bytes.
pub const MAX_STRING_LEN: u64 = 256 << 20;
/// Longest array, elements.
pub const MAX_ARRAY_LEN: u64 = 1 << 28;
/// Deepest nesting of arrays of arrays.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most metadata key/value pairs.
pub const MAX_KV_COUNT: u64 = 1 << 20;
/// Most tensors.
pub const MAX_TENSOR_COUNT: u64 = 1 << 20;
/// Most dimensions of one tensor (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Longest tensor name the writer accepts (llama.cpp's GGML_MAX_NAME - 1).
pub const MAX_TENSOR_NAME_WRITE: usize = 63;
/// Largest alignment accepted.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
