//! `mxr run --prompts FILE` on the CPU: each line completed exactly as `mxr run -p` completes
//! it alone (sequence i with seed + i), in the file's order, whether the sequences decode in
//! one pass a step or one at a time; and clean errors for bad input.

use std::process::{Command, Output};

use mxr_e2e::temp_path;
use serde_json::Value as Json;

fn mxr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mxr")).args(args).output().expect("running mxr")
}

const PROMPTS: &str = "ROMEO:\\nWhat light\n\nJULIET:\\nO Romeo\nFirst Citizen:\\nBefore we proceed\n";
const TEXTS: [&str; 3] = ["ROMEO:\nWhat light", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed"];

/// Sampled (seed + i per line) and greedy in the chat template: every JSON line holds the
/// completion `mxr run -p` prints for that prompt alone (less its final new line), the
/// prompt as read (escapes undone), its token counts and why it ended.
#[test]
fn each_prompt_is_completed_as_run_completes_it_alone() {
    let file = temp_path("prompts", "p.txt");
    std::fs::write(&file, PROMPTS).unwrap();
    // by default the three in one pass a step; two in one pass (the third taking the place
    // of the first to end); one at a time
    for (extra, how) in [
        (&["--temp", "0.8", "--seed", "5"][..], "3 sequences in one pass a step"),
        (&["--temp", "0", "--chat", "--seed", "1"][..], "3 sequences in one pass a step"),
        (&["--temp", "0.8", "--parallel", "2", "--seed", "5"][..], "2 sequences in one pass a step"),
        (&["--temp", "0.8", "--parallel", "1", "--seed", "5"][..], "one sequence at a time"),
    ] {
        let base = [&["run", "-n", "10", "--device", "cpu"][..], extra].concat();
        let out = mxr(&[&base[..], &["--prompts", file.to_str().unwrap()]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains(&format!("3 prompts, {how}")) && err.contains("generation: "), "{err}");
        let lines: Vec<Json> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        let seed: u64 = extra[extra.len() - 1].parse().unwrap();
        for (i, (line, text)) in lines.iter().zip(TEXTS).enumerate() {
            assert_eq!((line["index"].as_u64(), line["prompt"].as_str()), (Some(i as u64), Some(text)));
            let s = (seed + i as u64).to_string();
            // the same options for one prompt: no --parallel, the sequence's seed
            let mut alone: Vec<&str> = base.clone();
            if let Some(at) = alone.iter().position(|a| *a == "--parallel") {
                alone.drain(at..at + 2);
            }
            let n = alone.len();
            alone[n - 1] = &s;
            let one = mxr(&[&alone[..], &["-p", text]].concat());
            assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
            let want = String::from_utf8(one.stdout).unwrap();
            let completion = line["completion"].as_str().unwrap();
            assert_eq!(format!("{completion}\n"), want, "line {i} with {extra:?}");
            assert!(!completion.is_empty());
            let finish = line["finish_reason"].as_str().unwrap();
            let tokens = line["completion_tokens"].as_u64().unwrap();
            assert!((finish == "length" && tokens == 10) || (finish == "stop" && tokens < 10), "{line}");
            assert!(line["prompt_tokens"].as_u64().unwrap() >= 3, "{line}");
        }
    }
}

/// Bad input: a clear error, exit status 1, nothing on standard output.
#[test]
fn bad_prompt_files_and_options_are_clear_errors() {
    let blank = temp_path("prompts", "blank.txt");
    std::fs::write(&blank, "\n  \n").unwrap();
    let long = temp_path("prompts", "long.txt");
    std::fs::write(&long, format!("ROMEO:\n{}\n", "What light through yonder window breaks ".repeat(8))).unwrap();
    let (blank, long) = (blank.to_str().unwrap(), long.to_str().unwrap());
    for (args, want) in [
        (vec!["--prompts", blank], "no prompts (one a line"),
        (vec!["--prompts", "/nonexistent/p.txt"], "reading prompts file /nonexistent/p.txt"),
        (vec!["--prompts", long, "--parallel", "0"], "--parallel must be at least 1"),
        (vec!["--prompts", long, "--ctx-size", "24"], "line 2: prompt ("),
        (vec!["--parallel", "2", "-p", "x"], "--prompts"),
        (vec!["--prompts", long, "-p", "x"], "cannot be used with"),
    ] {
        let out = mxr(&[&["run", "-n", "4", "--device", "cpu"][..], &args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
}
