//! The bundled nano model: a 17 M-parameter MiniMax-01 trained on Shakespeare
//! (tests/reference/train_nano.py), committed in MiniMax's on-disk format under nano/checkpoint.
//! Commands given no `-m` use it, converting it to Q8_0 GGUF beside the checkpoint on first use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_quant::QType;

/// The repository's nano/ folder (where this binary was built from).
pub fn nano_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).join("nano")
}

/// The path of the bundled model's GGUF, converting the checkpoint if needed.
pub fn default_model() -> Result<PathBuf> {
    let dir = nano_dir();
    let gguf = dir.join("mxr-nano-q8_0.gguf");
    if gguf.exists() {
        return Ok(gguf);
    }
    let ckpt = dir.join("checkpoint");
    if !ckpt.join("config.json").exists() {
        bail!(
            "no -m given and the bundled nano model is not at {} (this binary was moved away from its source tree): pass -m MODEL.gguf",
            ckpt.display()
        );
    }
    eprintln!("converting the bundled nano model to {} (first use)", gguf.display());
    convert(&ckpt, &gguf, &ConvertOptions::new(TypePlan::uniform(QType::Q8_0)), &|_| {})
        .with_context(|| format!("converting {}", ckpt.display()))?;
    Ok(gguf)
}
