//! Metadata key names, never written inline elsewhere.
//! `general.*` and `tokenizer.*` are GGUF's; `minimax-01.*` are llama.cpp's keys for its
//! `minimax-01` architecture; `mxr.*` are ours (documented in docs/format.md).

pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
pub const GENERAL_NAME: &str = "general.name";
pub const GENERAL_ALIGNMENT: &str = "general.alignment";
pub const GENERAL_FILE_TYPE: &str = "general.file_type";
pub const GENERAL_QUANTIZATION_VERSION: &str = "general.quantization_version";

/// Keys of the form `{arch}.{suffix}`.
pub fn arch_key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}
