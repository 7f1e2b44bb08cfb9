//! `mxr`: run MiniMax-Text-01 from one quantized, memory-mapped GGUF file.
//! One binary, subcommands as in llama.cpp's tools; this file only parses the command line
//! and reports errors (one line on stderr, exit status 1).

#![forbid(unsafe_code)]
// No panic reachable from input (issue 9): errors, not unwrap/expect/panic, outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use mxr::{bench_cmd, calibrate_cmd, chat_cmd, convert_cmd, inspect, plan_cmd, ppl_cmd, run_cmd};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mxr", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MXR_COMMIT"), ")"), about = "Run MiniMax-Text-01 (hybrid lightning-attention MoE) from a quantized GGUF file")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Show a GGUF file's metadata and tensor table (any GGUF: mxr's, llama.cpp's, gguf-py's).
    Inspect {
        /// The GGUF file.
        file: PathBuf,
        /// Print JSON (every metadata value in full) instead of the human table.
        #[arg(long)]
        json: bool,
        /// Read every tensor and fail if any value is NaN or infinite.
        #[arg(long, conflicts_with = "json")]
        check: bool,
    },
    /// Generate text from a prompt (one shot), streaming to stdout.
    Run(run_cmd::RunArgs),
    /// Chat with the model in an interactive REPL (history, /help for commands).
    Chat(chat_cmd::ChatArgs),
    /// Throughput, llama-bench style: prefill and decode tokens/s, bandwidth, MFU.
    Bench(bench_cmd::BenchArgs),
    /// Count how often each expert is routed on a text (JSON, for expert placement).
    Calibrate(calibrate_cmd::CalibrateArgs),
    /// Where a model goes on given GPUs and host memory (weights, KV, state), before loading.
    Plan(plan_cmd::PlanArgs),
    /// Perplexity of a text (and KL divergence against a base model).
    Ppl(ppl_cmd::PplArgs),
    /// Convert a MiniMax-Text-01 / M1 safetensors checkpoint to GGUF (int8/int4 matrices).
    Convert(convert_cmd::ConvertArgs),
    /// Write a random-weight checkpoint in MiniMax's on-disk format, any size.
    Synth(convert_cmd::SynthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { file, json, check } => inspect::run(&file, json, check),
        Command::Run(a) => run_cmd::run(a),
        Command::Chat(a) => chat_cmd::run(a),
        Command::Ppl(a) => ppl_cmd::run(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Calibrate(a) => calibrate_cmd::run(a),
        Command::Plan(a) => plan_cmd::run(a),
        Command::Convert(a) => convert_cmd::run_convert(a),
        Command::Synth(a) => convert_cmd::run_synth(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<mxr::interrupt::Interrupted>() {
            Some(i) => {
                eprintln!("mxr: {i}");
                ExitCode::from(mxr::interrupt::EXIT_INTERRUPTED)
            }
            None => {
                eprintln!("mxr: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
