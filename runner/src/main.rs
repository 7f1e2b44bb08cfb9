//! `mxr`: run MiniMax-Text-01 from one quantized, memory-mapped GGUF file.
//! One binary, subcommands as in llama.cpp's tools; this file only parses the command line
//! and reports errors (one line on stderr, exit status 1).

#![forbid(unsafe_code)]

mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mxr", version, about = "Run MiniMax-Text-01 (hybrid lightning-attention MoE) from a quantized GGUF file")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF file's metadata and tensor table (any GGUF: mxr's, llama.cpp's, gguf-py's).
    Inspect {
        /// The GGUF file.
        file: PathBuf,
        /// Print JSON (every metadata value in full) instead of the human table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { file, json } => inspect::run(&file, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxr: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
