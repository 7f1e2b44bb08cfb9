//! `mxr run --prompts FILE --parallel N` on one GPU (issue 7): sequences decoded side by
//! side, a new prompt prefilled in the place of one that ends, give each prompt the text
//! `mxr run -p` gives it alone on the same GPU. Run by scripts/gpu-check.sh, with
//! MXR_BIN naming the mxr binary staged beside this test.

use std::process::{Command, Output};

use mxr_e2e::temp_path;
use serde_json::Value as Json;

fn mxr(args: &[&str]) -> Output {
    let bin = std::env::var("MXR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mxr").to_string());
    Command::new(bin).args(args).output().expect("running mxr")
}

const TEXTS: [&str; 5] = ["ROMEO:\nWhat light", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING:\nNow", "HAMLET:\nTo be"];

/// Five greedy prompts, three side by side (so two are prefilled while others decode), with
/// every expert on the GPU, with the first four layers' experts on the CPU (the host worker
/// answering every sequence's graph), and with those shared by the GPU and the CPU (mixed):
/// each completion is the one `mxr run -p` prints alone, and the run says it went side by
/// side.
#[test]
#[ignore = "needs a GPU"]
fn prompts_decoded_side_by_side_give_each_its_text_alone() {
    let file = temp_path("gpu-prompts", "p.txt");
    std::fs::write(&file, TEXTS.iter().map(|t| t.replace('\n', "\\n") + "\n").collect::<String>()).unwrap();
    for placement in [&[][..], &["--n-cpu-moe", "4"][..], &["--n-cpu-moe", "4", "--cold-experts", "mixed"][..]] {
        let base = [&["run", "-n", "24", "--temp", "0", "--device", "cuda", "--kv-type", "f32"][..], placement].concat();
        let out = mxr(&[&base[..], &["--prompts", file.to_str().unwrap(), "--parallel", "3"]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{placement:?}: {err}");
        assert!(err.contains("5 prompts, 3 sequences side by side"), "{err}");
        let lines: Vec<Json> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), TEXTS.len(), "{err}");
        for (i, (line, text)) in lines.iter().zip(TEXTS).enumerate() {
            assert_eq!(line["index"].as_u64(), Some(i as u64));
            let one = mxr(&[&base[..], &["-p", text]].concat());
            assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
            let want = String::from_utf8(one.stdout).unwrap();
            assert_eq!(format!("{}\n", line["completion"].as_str().unwrap()), want, "{placement:?}, prompt {i}");
        }
        println!("CHECK run --prompts side by side | {placement:?} | | | ok");
    }
}
