//! Kernel sources compiled by NVRTC at first use, for the device's architecture, and cached
//! on disk as PTX keyed by a hash of the source, the architecture, the options and the NVRTC
//! version. The cache lives in `$MXR_CACHE_DIR`, else `$XDG_CACHE_HOME/mxr`, else
//! `~/.cache/mxr` (under `kernels/`); an unwritable cache only costs a recompile.

use std::path::PathBuf;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::KernelError;

/// One .cu file of kernels/cuda, with the headers it needs prepended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Matvec,
    Dequant,
    Norm,
    Elementwise,
    Moe,
    Lightning,
    Attention,
    Flash,
    /// Hopper-only (wgmma): compiled for sm_90a, and only on an sm_90 device.
    FlashWgmma,
    Check,
    HostExchange,
}

const COMMON: &str = include_str!("../../cuda/common.cuh");
const FORMATS: &str = include_str!("../../cuda/formats.cuh");
const MMA: &str = include_str!("../../cuda/mma.cuh");
const ROWNORM: &str = include_str!("../../cuda/rownorm.cuh");

impl Source {
    pub const ALL: [Source; 11] = [
        Source::Matvec,
        Source::Dequant,
        Source::Norm,
        Source::Elementwise,
        Source::Moe,
        Source::Lightning,
        Source::Attention,
        Source::Flash,
        Source::FlashWgmma,
        Source::Check,
        Source::HostExchange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Source::Matvec => "matvec",
            Source::Dequant => "dequant",
            Source::Norm => "norm",
            Source::Elementwise => "elementwise",
            Source::Moe => "moe",
            Source::Lightning => "lightning",
            Source::Attention => "attention",
            Source::Flash => "flash",
            Source::FlashWgmma => "flash_wgmma",
            Source::Check => "check",
            Source::HostExchange => "host_exchange",
        }
    }

    /// The architecture to compile for on a device of `arch`: wgmma needs the
    /// architecture-specific target sm_90a, which only sm_90 devices run.
    pub fn target(self, arch: &'static str) -> Result<&'static str, KernelError> {
        match (self, arch) {
            (Source::FlashWgmma, "sm_90") => Ok("sm_90a"),
            (Source::FlashWgmma, other) => {
                Err(KernelError::Shape(format!("warpgroup (wgmma) attention needs an sm_90 GPU; this one is {other}")))
            }
            _ => Ok(arch),
        }
    }

    /// The full text NVRTC compiles: common.cuh, then the quantization formats, the
    /// tensor-core helpers and the register-held row norm for the sources that use them,
    /// then the source.
    pub fn text(self) -> String {
        let (headers, body): (&[&str], &str) = match self {
            Source::Matvec => (&[FORMATS], include_str!("../../cuda/matvec.cu")),
            Source::Dequant => (&[FORMATS], include_str!("../../cuda/dequant.cu")),
            Source::Norm => (&[ROWNORM], include_str!("../../cuda/norm.cu")),
            Source::Elementwise => (&[], include_str!("../../cuda/elementwise.cu")),
            Source::Moe => (&[FORMATS, ROWNORM], include_str!("../../cuda/moe.cu")),
            Source::Lightning => (&[MMA], include_str!("../../cuda/lightning.cu")),
            Source::Attention => (&[], include_str!("../../cuda/attention.cu")),
            Source::Flash => (&[MMA], include_str!("../../cuda/flash.cu")),
            Source::FlashWgmma => (&[MMA], include_str!("../../cuda/flash_wgmma.cu")),
            Source::Check => (&[], include_str!("../../cuda/check.cu")),
            Source::HostExchange => (&[], include_str!("../../cuda/host_exchange.cu")),
        };
        let mut s = String::with_capacity(COMMON.len() + headers.iter().map(|h| h.len()).sum::<usize>() + body.len());
        s.push_str(COMMON);
        headers.iter().for_each(|h| s.push_str(h));
        s.push_str(body);
        s
    }
}

/// NVRTC options besides the architecture.
const OPTIONS: [&str; 2] = ["--std=c++17", "-lineinfo"];

/// FNV-1a, 64-bit: stable across Rust versions (unlike `DefaultHasher`).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = env("MXR_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("mxr")))
        .or_else(|| env("HOME").map(|p| p.join(".cache/mxr")))?;
    Some(base.join("kernels"))
}

/// What compiling a source did: where its PTX came from.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub ptx: Ptx,
    pub from_cache: bool,
    pub path: Option<PathBuf>,
}

/// PTX for `source` on `arch` (e.g. "sm_90"), from the disk cache or NVRTC.
/// `defines`: extra `-D` options (NAME=VALUE) for this source.
pub fn compile(source: Source, arch: &'static str, nvrtc_version: (i32, i32), defines: &[String]) -> Result<Compiled, KernelError> {
    let text = source.text();
    let version = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
    let options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).chain(defines.iter().map(|d| format!("-D{d}"))).collect();
    let opts = options.join(" ");
    let key = fnv1a(&[text.as_bytes(), arch.as_bytes(), opts.as_bytes(), version.as_bytes()]);
    let path = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.ptx", source.name())));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if ptx.contains(".entry") {
                return Ok(Compiled { ptx: Ptx::from_src(ptx), from_cache: true, path });
            }
        }
    }
    let co = CompileOptions { arch: Some(arch), options, ..Default::default() };
    let ptx = compile_ptx_with_opts(&text, co).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        KernelError::Compile { source_name: source.name(), arch, detail }
    })?;
    if let Some(p) = &path {
        store(p, &ptx.to_src());
    }
    Ok(Compiled { ptx, from_cache: false, path })
}

/// Writes the cache entry through a temporary file and a rename; failures are ignored
/// (the cache is an optimisation).
fn store(path: &std::path::Path, ptx: &str) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, ptx).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_parts_and_is_stable() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_ne!(fnv1a(&[b"sm_90"]), fnv1a(&[b"sm_80"]));
        // FNV-1a of the bytes 'a', 0xff (our part separator), computed by hand.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in [b'a', 0xff] {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(fnv1a(&[b"a"]), h);
    }

    #[test]
    fn every_source_has_kernels() {
        for s in Source::ALL {
            assert!(s.text().contains("extern \"C\" __global__"), "{} has no kernels", s.name());
        }
    }
}
