//! The converter's error type: every variant names the file and, where there is one, the
//! tensor.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    // The I/O error is part of the message, not a `source` (anyhow's chain would print it twice).
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("tensor `{tensor}` in {}: {reason}", path.display())]
    BadTensor { path: PathBuf, tensor: String, reason: String },
    #[error("checkpoint {}: {reason}", dir.display())]
    Checkpoint { dir: PathBuf, reason: String },
    #[error(transparent)]
    Model(#[from] mxr_models::ModelError),
    #[error(transparent)]
    Format(#[from] mxr_quant::gguf::FormatError),
    #[error("conversion stopped: {0}")]
    Stopped(String),
}

impl ConvertError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ConvertError::Io { path: path.into(), err: source }
    }
}
