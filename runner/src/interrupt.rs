//! Ctrl-C (SIGINT) for the commands that can stop cleanly: the first one sets a flag that
//! the command checks between prompt chunks and between tokens (and an optional cleanup
//! runs); a second one, while the first is still pending, exits at once with status 130.
//! Commands that do not install it keep the default (the process ends).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// What ended a command that was stopped by Ctrl-C; main exits with status 130 for it.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The exit status of a command stopped by SIGINT (128 + 2, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Installs the handler (once per process).
    pub fn install() -> Result<Interrupt> {
        Self::install_with(|| {})
    }

    /// As [`Interrupt::install`]; `cleanup` runs on the handler's thread at the first
    /// Ctrl-C (e.g. removing a half-written file before the command notices the flag).
    pub fn install_with(cleanup: impl Fn() + Send + 'static) -> Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                eprintln!("\nmxr: interrupted twice; exiting");
                std::process::exit(EXIT_INTERRUPTED as i32);
            }
            cleanup();
        })
        .context("installing the Ctrl-C handler")?;
        Ok(Interrupt(flag))
    }

    /// Whether Ctrl-C came since the last [`Interrupt::clear`].
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Takes the request: true once per Ctrl-C.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }

    pub fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
