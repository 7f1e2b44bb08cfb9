//! The `mxr` binary's parts, as a library so tests can reach them: command implementations
//! (`inspect`, `convert_cmd`, `run_cmd`), the tokenizer glue, chat templates, the sampler
//! and .npy output.

#![forbid(unsafe_code)]
// No panic reachable from input (issue 9): errors, not unwrap/expect/panic, outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod backend;
pub mod bench_cmd;
pub mod bench_timeline;
pub mod calibrate_cmd;
pub mod calibrate_devices;
pub mod chat_cmd;
pub mod check;
pub mod convert_cmd;
pub mod host_memory;
pub mod inspect;
pub mod interrupt;
pub mod kernel_bench;
pub mod nano;
pub mod npy;
pub mod plan_cmd;
pub mod ppl_cmd;
pub mod run_cmd;
pub mod run_many;
pub mod sampler;
pub mod template;
pub mod tokenizer;
