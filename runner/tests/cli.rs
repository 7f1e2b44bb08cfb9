//! The `mxr` commands as a user runs them. inspect: the table, --json for scripts (checked against gguf-py's
//! own reading of the same file), and clean errors (exit status 1, no panic) on bad files.

use std::path::Path;
use std::process::{Command, Output};

use mxr_e2e::fixture::FIXTURE;
use mxr_e2e::{python_json, repo_root, temp_path, tempdir};
use serde_json::Value as Json;

fn mxr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mxr")).args(args).output().expect("running mxr")
}

fn inspect_json(path: &Path) -> Json {
    let out = mxr(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

#[test]
fn table_shows_model_metadata_and_tensors() {
    let out = mxr(&["inspect", repo_root().join(FIXTURE).to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "GGUF v3",
        "minimax-01: 2 layers LS",
        "general.architecture",
        "\"minimax-01\"",
        "minimax-01.attention.recurrent_layers",
        "[bool; 2] [true, false]",
        "blk.0.attn_qkv.weight",
        "q8_0",
        "[64, 192]",
        "23 tensors",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn json_describes_every_tensor_and_key() {
    let j = inspect_json(&repo_root().join(FIXTURE));
    let tensors = j["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 23);
    let params: u64 = tensors.iter().map(|t| t["n_elements"].as_u64().unwrap()).sum();
    assert_eq!(j["summary"]["parameters"], params);
    assert_eq!(j["model"]["layers"], "LS");
    let qkv = tensors.iter().find(|t| t["name"] == "blk.0.attn_qkv.weight").unwrap();
    assert_eq!(
        (qkv["type"].as_str(), qkv["shape"].clone(), qkv["n_bytes"].as_u64()),
        (Some("q8_0"), serde_json::json!([64, 192]), Some(192 * 2 * 34))
    );
    let data_offset = j["data_offset"].as_u64().unwrap();
    assert!(tensors.iter().all(|t| t["file_offset"].as_u64().unwrap() == data_offset + t["offset"].as_u64().unwrap()));
    let meta = j["metadata"].as_array().unwrap();
    let flags = meta.iter().find(|m| m["key"] == "minimax-01.attention.recurrent_layers").unwrap();
    assert_eq!(
        (&flags["type"], &flags["element_type"], &flags["value"]),
        (&"array".into(), &"bool".into(), &serde_json::json!([true, false]))
    );
}

#[test]
fn json_of_a_gguf_py_file_agrees_with_gguf_py() {
    let path = temp_path("cli", "py.gguf");
    python_json("gguf_interop.py", &["write", path.to_str().unwrap()]);
    let theirs = python_json("gguf_interop.py", &["read", path.to_str().unwrap()]);
    let ours = inspect_json(&path);
    let fields = theirs["fields"].as_object().unwrap();
    let meta = ours["metadata"].as_array().unwrap();
    assert_eq!(meta.len(), fields.len());
    for m in meta {
        let f = &fields[m["key"].as_str().unwrap()];
        assert_eq!(f["types"][0].as_str().unwrap(), m["type"].as_str().unwrap().to_uppercase(), "{}", m["key"]);
        let flat = |v: &Json| -> Vec<Json> {
            fn go(v: &Json, out: &mut Vec<Json>) {
                match v.as_array() {
                    Some(a) => a.iter().for_each(|x| go(x, out)),
                    None => out.push(v.clone()),
                }
            }
            let mut out = Vec::new();
            go(v, &mut out);
            out
        };
        assert_eq!(flat(&m["value"]), flat(&f["value"]), "{}", m["key"]);
    }
    for (o, t) in ours["tensors"].as_array().unwrap().iter().zip(theirs["tensors"].as_array().unwrap()) {
        assert_eq!(
            (&o["name"], &o["type_id"], &o["shape"], &o["n_bytes"], &o["file_offset"]),
            (&t["name"], &t["type"], &t["shape"], &t["n_bytes"], &t["data_offset"])
        );
    }
}

#[test]
fn bad_files_give_one_line_errors_and_exit_status_1() {
    let dir = tempdir("cli-bad");
    let good = std::fs::read(repo_root().join(FIXTURE)).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("text".into(), b"hello, this is not a model\n".to_vec()),
        ("bad-version".into(), [b"GGUF".as_slice(), &7u32.to_le_bytes(), &[0; 16]].concat()),
    ];
    for cut in [3, 10, 30, 200, 2000, good.len() / 2, good.len() - 1] {
        cases.push((format!("cut-{cut}"), good[..cut].to_vec()));
    }
    let mut flipped = good.clone();
    flipped[24 + 4] = 0xff; // high bytes of the first key's u64 length
    cases.push(("flipped-key-length".into(), flipped));
    for (name, bytes) in &cases {
        let p = dir.join(format!("{name}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        for json in [false, true] {
            let args: Vec<&str> = if json { vec!["inspect", "--json", p.to_str().unwrap()] } else { vec!["inspect", p.to_str().unwrap()] };
            let out = mxr(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{name}: {err}");
            assert!(err.starts_with("mxr: error: reading ") && !err.contains("panicked"), "{name}: {err}");
            assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
        }
    }
    let out = mxr(&["inspect", dir.join("missing.gguf").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
    let out = mxr(&["inspect", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a directory");
}

#[test]
fn convert_and_synth_cli_fail_cleanly_on_bad_input() {
    let dir = tempdir("cli-convert");
    // A directory that is not a checkpoint.
    let out = mxr(&["convert", dir.to_str().unwrap(), "-o", dir.join("x.gguf").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("config.json") && !err.contains("panicked"), "{err}");
    assert!(!dir.join("x.gguf").exists());
    // An unknown --type is a usage error (clap exits 2).
    let out = mxr(&["convert", dir.to_str().unwrap(), "--type", "q5_k"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown type `q5_k`"));
    // synth refuses an existing directory and a bad pattern.
    let out = mxr(&["synth", "--preset", "tiny", "-o", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = mxr(&["synth", "--preset", "tiny", "--pattern", "LXS", "-o", dir.join("s").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`X` is not L (lightning) or S (softmax)"));
}

#[test]
fn bench_kernel_group_takes_known_groups_only() {
    // a usage error (clap exits 2) that lists the groups, before any GPU is looked for
    let out = mxr(&["bench", "--kernels", "--kernel-group", "gemm"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("matvec") && err.contains("attention") && err.contains("host") && !err.contains("panicked"), "{err}");
    // and it means nothing without --kernels
    let out = mxr(&["bench", "--kernel-group", "matvec"]);
    assert_eq!(out.status.code(), Some(2));
}

/// --timeline times the GPU's decode graph: on the CPU it is a clear error before any test
/// runs, not a panic or an empty table.
#[test]
fn bench_timeline_needs_a_gpu() {
    let out = mxr(&["bench", "-p", "0", "-n", "4", "-r", "1", "--device", "cpu", "--timeline"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--timeline needs the model on one GPU") && !err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// --parallel on the CPU decodes the sequences in one pass a step ("tg4 x2"); 0 sequences,
/// and --profile with several, are clear errors before any test runs.
#[test]
fn bench_parallel_decodes_sequences_at_once() {
    let out = mxr(&["bench", "-p", "0", "-n", "4", "-r", "1", "--parallel", "2", "--device", "cpu"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("| tg4 x2 |"), "{text}");
    for (args, want) in [
        (&["--parallel", "0", "--device", "cpu"][..], "--parallel must be at least 1"),
        (&["--parallel", "2", "--profile"][..], "leave out --parallel"),
    ] {
        let out = mxr(&[&["bench", "-p", "0", "-n", "4", "-r", "1"][..], args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn synth_then_convert_then_inspect() {
    let dir = tempdir("cli-pipeline");
    let ckpt = dir.join("ckpt");
    let out =
        mxr(&["synth", "--preset", "tiny", "--pattern", "SLL", "--experts", "3", "--router", "zipf:1.2", "-o", ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gguf = dir.join("t.gguf");
    let out = mxr(&["convert", ckpt.to_str().unwrap(), "-o", gguf.to_str().unwrap(), "--type", "q8_0", "--expert-type", "q4_k"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Q8_0 (experts Q4_K)") && err.contains("peak RSS"), "{err}");
    let j = inspect_json(&gguf);
    assert_eq!(j["model"]["layers"], "SLL");
    let t = j["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "blk.2.ffn_up_exps.weight").unwrap().clone();
    assert_eq!((t["type"].as_str(), t["shape"].clone()), (Some("q4_K"), serde_json::json!([256, 512, 3])));
}

#[test]
fn run_dumps_logits_equal_to_transformers_and_is_reproducible() {
    let dir = tempdir("cli-run");
    let gguf = dir.join("g.gguf");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    let out = mxr(&["convert", golden.to_str().unwrap(), "-o", gguf.to_str().unwrap(), "--type", "f32"]);
    assert!(out.status.success());
    let tokens: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(golden.join("tokens.json")).unwrap()).unwrap();
    let list = tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let npy = dir.join("l.npy");
    let out = mxr(&[
        "run",
        "-m",
        gguf.to_str().unwrap(),
        "--prompt-tokens",
        &list,
        "-n",
        "0",
        "--dump-logits",
        npy.to_str().unwrap(),
        "--batch-size",
        "256",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (shape, got) = mxr_e2e::npy::read_f32(&npy).unwrap();
    let (wshape, want) = mxr_e2e::npy::read_f32(&golden.join("logits.npy")).unwrap();
    assert_eq!(shape, wshape);
    let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max <= 1e-3, "max abs diff {max}");
    // Same seed, same text; stderr carries the timings, stdout only the text.
    let gen = |seed: &str| mxr(&["run", "-m", gguf.to_str().unwrap(), "-p", "ROMEO:", "-n", "24", "--seed", seed, "--temp", "0.9"]);
    let (a, b) = (gen("5"), gen("5"));
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    let err = String::from_utf8_lossy(&a.stderr);
    assert!(err.contains("prompt: ") && err.contains("tokens/s") && err.contains("seed 5"), "{err}");
    // The same prompt from a file and from standard input gives the same text.
    let pf = dir.join("p.txt");
    std::fs::write(&pf, "ROMEO:").unwrap();
    let from_file = mxr(&["run", "-m", gguf.to_str().unwrap(), "-f", pf.to_str().unwrap(), "-n", "24", "--seed", "5", "--temp", "0.9"]);
    assert_eq!(from_file.stdout, a.stdout);
    let from_stdin = Command::new(env!("CARGO_BIN_EXE_mxr"))
        .args(["run", "-m", gguf.to_str().unwrap(), "-n", "24", "--seed", "5", "--temp", "0.9"])
        .stdin(std::fs::File::open(&pf).unwrap())
        .output()
        .unwrap();
    assert_eq!(from_stdin.stdout, a.stdout);
    // Errors: context too small, empty prompt, --device cuda where there is no GPU.
    let small = mxr(&["run", "-m", gguf.to_str().unwrap(), "-p", "ROMEO:", "-n", "100", "--ctx-size", "50"]);
    assert_eq!(small.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&small.stderr).contains("exceeds the context of 50 tokens"));
    let empty = mxr(&["run", "-m", gguf.to_str().unwrap(), "-p", "", "-n", "3"]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("the prompt is empty"));
    // a GPU named twice in --gpus is an error before any GPU is looked for
    let twice = mxr(&["run", "-m", gguf.to_str().unwrap(), "-p", "x", "-n", "1", "--gpus", "0,1,0"]);
    assert_eq!(twice.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("--gpus 0,1,0: a GPU is named twice"),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    if let Err(why) = mxr_kernels::cuda::probe() {
        let cuda = mxr(&["run", "-m", gguf.to_str().unwrap(), "-p", "x", "--device", "cuda"]);
        assert_eq!(cuda.status.code(), Some(1));
        let err = String::from_utf8_lossy(&cuda.stderr);
        assert!(err.contains("--device cuda: no usable GPU") && err.contains(&why), "{err}");
        // auto falls back to the CPU and says why
        let auto = mxr(&["run", "-m", gguf.to_str().unwrap(), "-p", "x", "-n", "1", "--device", "auto"]);
        assert!(auto.status.success());
        assert!(String::from_utf8_lossy(&auto.stderr).contains("device: no GPU used"));
    }
}

#[test]
fn chat_repl_keeps_the_session_and_saves_it() {
    use std::io::Write as _;
    use std::process::Stdio;
    let dir = tempdir("cli-chat");
    let gguf = dir.join("g.gguf");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", gguf.to_str().unwrap(), "--type", "q8_0"]).status.success());
    let save = dir.join("c.mxrs");
    let script =
        format!("Hello there\nSecond \\\nline\n/stats\n/save {0}\n/reset\n/stats\n/load {0}\n/stats\n/nope\n/exit\n", save.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxr"))
        .args(["chat", "-m", gguf.to_str().unwrap(), "-n", "8", "--seed", "1", "--system", "Be brief.", "--expert-rebalance"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let contexts: Vec<usize> =
        err.lines().filter_map(|l| l.strip_prefix("context: ")).map(|l| l.split(' ').next().unwrap().parse().unwrap()).collect();
    assert_eq!(contexts.len(), 3, "{err}");
    assert!(contexts[0] > 0 && contexts[1] == 0 && contexts[2] == contexts[0], "{contexts:?}");
    assert!(err.contains("4 messages") && err.contains("unknown command /nope"), "{err}");
    // without experts in host memory there is nothing to move
    assert!(err.contains("--expert-rebalance: every expert is on one device"), "{err}");
    // The second turn fed only its own tokens: the last reply's prompt is shorter than the context.
    let last = err.lines().find(|l| l.starts_with("last reply: prompt ")).unwrap();
    let prompt: usize = last["last reply: prompt ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(prompt < contexts[0] / 2, "{last} (context {})", contexts[0]);
}

#[test]
fn run_and_chat_default_to_the_bundled_nano_model() {
    use std::io::Write as _;
    use std::process::Stdio;
    let a = mxr(&["run", "-p", "ROMEO:", "-n", "24", "--temp", "0"]);
    let err = String::from_utf8_lossy(&a.stderr);
    assert!(a.status.success(), "{err}");
    assert!(err.contains("8 layers LLLLLLLS"), "{err}");
    let text = String::from_utf8(a.stdout.clone()).unwrap();
    assert!(text.split_whitespace().count() >= 5, "the nano model writes words: {text:?}");
    assert_eq!(mxr(&["run", "-p", "ROMEO:", "-n", "24", "--temp", "0"]).stdout, a.stdout, "greedy is deterministic");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxr"))
        .args(["chat", "-n", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Good morrow\n/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn ppl_reports_perplexity_and_kl_against_a_base() {
    let dir = tempdir("cli-ppl");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    let (f32, q8) = (dir.join("f32.gguf"), dir.join("q8.gguf"));
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", f32.to_str().unwrap(), "--type", "f32"]).status.success());
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", q8.to_str().unwrap(), "--type", "q8_0"]).status.success());
    let text = repo_root().join("convert/src/synth/corpus.txt");
    let ppl = |m: &std::path::Path| {
        let out = mxr(&[
            "ppl",
            "-m",
            m.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
            "--ctx",
            "128",
            "--kl-base",
            f32.to_str().unwrap(),
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Json>(&out.stdout).unwrap()
    };
    let same = ppl(&f32);
    assert!(same["kl_mean"].as_f64().unwrap().abs() < 1e-9, "{same}");
    assert_eq!(same["top1_agreement"].as_f64(), Some(1.0));
    assert_eq!(same["predictions"].as_u64().unwrap(), same["windows"].as_u64().unwrap() * 127);
    let q = ppl(&q8);
    let kl = q["kl_mean"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 0.05, "{q}");
    assert!((q["ppl"].as_f64().unwrap() / same["ppl"].as_f64().unwrap() - 1.0).abs() < 0.1, "{q} vs {same}");
    let out = mxr(&["ppl", "-m", f32.to_str().unwrap(), "-f", text.to_str().unwrap(), "--ctx", "100000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fewer than one window"));
}

#[test]
fn calibrate_counts_every_routing_choice() {
    let dir = tempdir("cli-calibrate");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    let gguf = dir.join("q8.gguf");
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", gguf.to_str().unwrap(), "--type", "q8_0"]).status.success());
    let text = repo_root().join("convert/src/synth/corpus.txt");
    let stats = dir.join("stats.json");
    let out = mxr(&[
        "calibrate",
        "-m",
        gguf.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-o",
        stats.to_str().unwrap(),
        "--ctx",
        "64",
        "--max-tokens",
        "300",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Json = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let model = mxr_models::Model::open(&gguf).unwrap();
    let c = &model.config;
    let s = mxr_models::placement::ExpertStats::from_json(&j, c).unwrap();
    assert_eq!(s.tokens, 300);
    for (l, row) in s.counts.iter().enumerate() {
        assert_eq!(row.iter().sum::<u64>(), 300 * c.n_experts_used as u64, "layer {l}: every token makes k choices");
    }
    // A file for another shape is refused with the reason.
    let mut wrong = j.clone();
    wrong["counts"].as_array_mut().unwrap().pop();
    let e = mxr_models::placement::ExpertStats::from_json(&wrong, c).unwrap_err().to_string();
    assert!(e.contains("layers, the model has"), "{e}");
}

/// `mxr plan --parallel N`: each sequence side by side keeps its own KV cache and lightning
/// states, so eight take eight times the memory and leave fewer experts on the GPU; 0 is an
/// error.
#[test]
fn plan_keeps_room_for_every_sequence_side_by_side() {
    let plan = |p: &str| -> Json {
        let out = mxr(&["plan", "--preset", "minimax-text-01", "--type", "q4_k", "--host-mem", "512", "--parallel", p, "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (one, eight) = (plan("1"), plan("8"));
    assert_eq!(eight["parallel"].as_u64(), Some(8));
    // spec section 10: 40,960 bytes a token in bf16, 280 MiB of f32 state, per sequence
    assert_eq!(one["kv_bytes"].as_u64(), Some(40_960 * 4096));
    assert_eq!(eight["kv_bytes"].as_u64(), Some(8 * 40_960 * 4096));
    assert_eq!(eight["lightning_state_bytes"].as_u64(), Some(8 * (280 << 20)));
    let on_gpu = |j: &Json| j["experts_on_gpu"].as_u64().unwrap();
    // 7 x (160 MiB + 280 MiB) = 3.0 GiB more of state: an expert is three q4_k matrices in
    // 32 MiB of pages each (96 MiB), so 32 experts fewer
    assert!(on_gpu(&eight) + 30 < on_gpu(&one) && on_gpu(&eight) > 0, "{} against {}", on_gpu(&eight), on_gpu(&one));
    let out = mxr(&["plan", "--preset", "minimax-text-01", "--parallel", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--parallel must be at least 1") && out.stdout.is_empty(), "{err}");
}

#[test]
fn plan_of_the_real_model_agrees_with_the_spec_arithmetic() {
    // minimax01-spec.md section 10: 456,089,655,296 parameters, 45,944,920,064 active,
    // KV 40,960 bytes/token in bf16 (1M tokens = 40 GiB), lightning state 280 MiB in f32.
    let out = mxr(&[
        "plan",
        "--preset",
        "minimax-text-01",
        "--type",
        "bf16",
        "--kv-type",
        "bf16",
        "--ctx",
        "1048576",
        "--json",
        "--host-mem",
        "1024",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["params"].as_u64(), Some(456_089_655_296));
    assert_eq!(j["active_params"].as_u64(), Some(45_944_920_064));
    assert_eq!(j["kv_bytes_per_token"].as_f64(), Some(40_960.0));
    assert_eq!(j["kv_bytes"].as_u64(), Some(40 << 30));
    assert_eq!(j["lightning_state_bytes"].as_u64(), Some(280 << 20));
    // q8_0 as the runner keeps it: int8 values and an f32 scale per 32 (36 bytes per 32)
    let out = mxr(&["plan", "--preset", "minimax-text-01", "--kv-type", "q8_0", "--ctx", "1048576", "--json", "--host-mem", "1024"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let q8: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q8["kv_bytes_per_token"].as_f64(), Some(40_960.0 / 2.0 * 36.0 / 32.0));
    // bf16 matrices: 2 bytes a parameter, except the f32 router and norms
    let w = j["weights"].as_array().unwrap();
    let bytes = |k: &str| w.iter().find(|e| e["kind"] == k).unwrap()["bytes"].as_u64().unwrap();
    let params = |k: &str| w.iter().find(|e| e["kind"] == k).unwrap()["params"].as_u64().unwrap();
    assert_eq!(bytes("experts"), 2 * params("experts"));
    assert_eq!(params("experts"), 80 * 32 * 169_869_312);
    assert_eq!(bytes("router"), 4 * 80 * 196_608);
    // At q4_k the real model does not fit one H200 alone but its experts spill to a host
    // with 512 GiB, and it fits four H200s outright.
    let q4 = |gpus: &str, host: &str| -> Json {
        let out = mxr(&["plan", "--preset", "minimax-text-01", "--type", "q4_k", "--gpus", gpus, "--host-mem", host, "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let one = q4("1xH200", "512");
    assert!(one["experts_on_gpu"].as_u64().unwrap() < 2560 && one["fits"] == true, "{one}");
    // cold experts read in place: the GPU keeps each expert matrix in whole 2 MiB pages
    // (a q4_k 9216 x 6144 matrix is 30.4 MiB, so 32), and holds that many fewer experts
    let cold = |how: &str| -> Json {
        let out = mxr(&["plan", "--preset", "minimax-text-01", "--type", "q4_k", "--host-mem", "512", "--json", "--cold-experts", how]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (cpu, in_place) = (cold("cpu"), cold("in-place"));
    assert_eq!((cpu["cold_experts"].as_str(), in_place["cold_experts"].as_str()), (Some("cpu"), Some("in-place")));
    let held = |j: &Json| j["experts_on_gpu"].as_u64().unwrap() as f64;
    let ratio = held(&in_place) / held(&cpu);
    let matrix = (9216 * 6144 / 256 * 144) as f64;
    let paged = (matrix / (2 << 20) as f64).ceil() * (2 << 20) as f64;
    assert!((ratio - matrix / paged).abs() < 0.01, "{ratio} against {}: {cpu} {in_place}", matrix / paged);
    // auto settles the way on the saved rates and the placement's expected cold experts,
    // as mxr run does: the real model keeps ~50 MB of cold experts a token per layer off
    // one H200, which the GPU and the CPU share (mixed, in place's pages); the CPU's way
    // where the two slow each other down more than the link adds, and where the GPU
    // cannot read in place
    let auto_on = |in_place_gbps: f64, mixed_gbps: Option<(f64, f64)>, host: &str, experts: &str| -> Json {
        let dir = tempdir(&format!("cli-plan-auto-{in_place_gbps}-{}-{experts}", mixed_gbps.is_some()));
        let rates = mxr_models::offload_cost::DeviceRates {
            cpu_expert_gbps: 40.0,
            in_place_gbps,
            mixed_gbps,
            ..mxr_models::offload_cost::DeviceRates::DEFAULT
        };
        std::fs::write(dir.join("devices.json"), rates.to_json().to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mxr"))
            .args(["plan", "--preset", "minimax-text-01", "--type", "q4_k", "--expert-type", experts, "--host-mem", host, "--json"])
            .env("MXR_CACHE_DIR", &dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let auto = |in_place_gbps: f64, mixed_gbps: Option<(f64, f64)>| auto_on(in_place_gbps, mixed_gbps, "512", "q4_k");
    let (fast, slow, none) = (auto(48.0, None), auto(12.0, Some((30.0, 5.0))), auto(0.0, None));
    // q4_k experts: the CPU reads mixed's page-locked copy, so mixed holds the cold
    // experts once (116.5 GiB), and at 160 GiB it fits
    let need = fast["host_bytes_needed"].as_f64().unwrap_or(0.0);
    let host_experts = fast["host_expert_bytes"].as_f64().unwrap_or(f64::NAN);
    assert_eq!(need, host_experts, "{fast}");
    let small = auto_on(48.0, None, "160", "q4_k");
    assert_eq!((small["cold_experts"].as_str(), small["fits"].as_bool()), (Some("mixed"), Some(true)), "{small}");
    // q8_0 experts are repacked for the GPU: the CPU reads the file's pages of its share
    // (40 / 88 of each) beside the copy, 311.6 + 141.6 GiB. At 512 GiB mixed fits; at 400
    // GiB auto takes the faster of the others (in place, 48 GB/s against the CPU's 40)
    let q8 = auto_on(48.0, None, "512", "q8_0");
    let (need, host_experts) = (q8["host_bytes_needed"].as_f64().unwrap_or(0.0), q8["host_expert_bytes"].as_f64().unwrap_or(f64::NAN));
    assert!((need / host_experts - (1.0 + 40.0 / 88.0)).abs() < 1e-6, "{q8}");
    assert_eq!(q8["cold_experts"], "mixed", "{q8}");
    let small = auto_on(48.0, None, "400", "q8_0");
    // mixed asked for is kept, and its host memory counted: at 400 GiB it does not fit
    let asked = {
        let dir = tempdir("cli-plan-mixed-asked");
        let rates = mxr_models::offload_cost::DeviceRates {
            cpu_expert_gbps: 40.0,
            in_place_gbps: 48.0,
            ..mxr_models::offload_cost::DeviceRates::DEFAULT
        };
        std::fs::write(dir.join("devices.json"), rates.to_json().to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mxr"))
            .args([
                "plan",
                "--preset",
                "minimax-text-01",
                "--type",
                "q4_k",
                "--expert-type",
                "q8_0",
                "--host-mem",
                "400",
                "--json",
                "--cold-experts",
                "mixed",
            ])
            .env("MXR_CACHE_DIR", &dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Json>(&out.stdout).unwrap()
    };
    assert_eq!((asked["cold_experts"].as_str(), asked["fits"].as_bool()), (Some("mixed"), Some(false)), "{asked}");
    assert!(asked.get("auto").is_none(), "nothing weighed for a way asked for: {asked}");
    assert_eq!((small["cold_experts"].as_str(), small["fits"].as_bool()), (Some("in-place"), Some(true)), "{small}");
    assert_eq!(small["host_bytes_needed"], small["host_expert_bytes"], "{small}");
    assert_eq!(fast["cold_experts"], "mixed", "{fast}");
    assert_eq!(fast["experts_on_gpu"], in_place["experts_on_gpu"], "planned in pages");
    assert_eq!((slow["cold_experts"].as_str(), none["cold_experts"].as_str()), (Some("cpu"), Some("cpu")), "{slow}");
    assert_eq!(slow["experts_on_gpu"], cpu["experts_on_gpu"], "planned again without pages");
    // the figures it weighed: the same cold bytes over the same 80 layers, each way's time
    let ms = |j: &Json, k: &str| j["auto"][k].as_f64().unwrap_or(f64::NAN);
    assert!(ms(&fast, "decode_ms_mixed") <= ms(&fast, "decode_ms_cpu").min(ms(&fast, "decode_ms_in_place")), "{fast}");
    assert!(ms(&slow, "decode_ms_cpu") < ms(&slow, "decode_ms_in_place").min(ms(&slow, "decode_ms_mixed")), "{slow}");
    assert_eq!((fast["auto"]["host_layers"].as_u64(), slow["auto"]["host_layers"].as_u64()), (Some(80), Some(80)));
    // evenly spread choices: 2 a layer over 32 experts, of the host experts' bytes (which
    // the in-place plan counts in whole pages; the reads are the matrices' own bytes)
    let cold = ms(&fast, "cold_bytes_per_token");
    let host = fast["host_expert_bytes"].as_f64().unwrap() * matrix / paged;
    assert!((cold - 2.0 / 32.0 * host).abs() / cold < 1e-3, "{cold} against {host} bytes of host experts");
    assert!(none.get("auto").is_none(), "nothing weighed where the GPU cannot read in place: {none}");
    let four = q4("4xH200", "16");
    assert_eq!(four["experts_on_gpu"].as_u64(), Some(2560), "{four}");
    assert_eq!(four["host_expert_bytes"].as_u64(), Some(0));
    // several GPUs: contiguous layers, 20 each here; the embeddings (BF16, 200064 x 6144)
    // count on the first GPU and the final norm + lm_head on the last
    let split = four["split"].as_array().unwrap();
    let ranges: Vec<(u64, u64)> = split.iter().map(|g| (g["first_layer"].as_u64().unwrap(), g["last_layer"].as_u64().unwrap())).collect();
    assert_eq!(ranges, vec![(0, 19), (20, 39), (40, 59), (60, 79)]);
    let resident = |g: usize| split[g]["resident_bytes"].as_u64().unwrap();
    let embd = 200_064 * 6144 * 2;
    assert!(resident(0) > resident(1) + embd * 9 / 10 && resident(3) > resident(2) + embd * 9 / 10, "{split:?}");
    assert_eq!(split.iter().map(|g| g["experts_on_gpu"].as_u64().unwrap()).sum::<u64>(), 2560);
    // two H100s: each keeps its own layers' popular experts, the rest go to the host
    let two = q4("2xH100", "256");
    let halves = two["split"].as_array().unwrap();
    assert!(halves.iter().all(|g| g["host_expert_bytes"].as_u64().unwrap() > 0), "{two}");
    assert_eq!(two["fits"], true);
    // a file's own sizes
    let dir = tempdir("cli-plan");
    let gguf = dir.join("q8.gguf");
    assert!(mxr(&["convert", repo_root().join("tests/fixtures/golden/equal-alpha").to_str().unwrap(), "-o", gguf.to_str().unwrap()])
        .status
        .success());
    let out = mxr(&["plan", "-m", gguf.to_str().unwrap(), "--json", "--gpus", "none", "--host-mem", "1"]);
    let j: Json = serde_json::from_slice(&out.stdout).unwrap();
    let file_bytes: u64 = inspect_json(&gguf)["tensors"].as_array().unwrap().iter().map(|t| t["n_bytes"].as_u64().unwrap()).sum();
    assert_eq!(j["weight_bytes"].as_u64(), Some(file_bytes));
    assert_eq!(j["fits"], true);
    // bad input
    let bad = mxr(&["plan", "--preset", "minimax-text-01", "--gpus", "3xA100"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown card A100"));
    let none = mxr(&["plan"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("--preset minimax-text-01"));
}

#[test]
fn inspect_check_finds_nan_and_infinity() {
    let dir = tempdir("cli-check");
    let gguf = dir.join("f32.gguf");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", gguf.to_str().unwrap(), "--type", "f32"]).status.success());
    let ok = mxr(&["inspect", "--check", gguf.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("all finite"));
    // Damage two values of one tensor: a NaN (element 5) and an infinity (element 9).
    let (start, name) = {
        let f = mxr_quant::gguf::GgufFile::open(&gguf).unwrap();
        let info = f.header().tensors().iter().find(|t| t.name == "blk.1.attn_output.weight").unwrap().clone();
        (f.header().data_range(&info).start, info.name)
    };
    let mut bytes = std::fs::read(&gguf).unwrap();
    bytes[start + 5 * 4..start + 6 * 4].copy_from_slice(&f32::NAN.to_le_bytes());
    bytes[start + 9 * 4..start + 10 * 4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let out = mxr(&["inspect", "--check", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{name}: 1 NaN, 1 infinite (first at element 5)")) && !err.contains("panicked"), "{err}");
    assert!(err.contains("1 tensors hold non-finite values"), "{err}");
}

#[test]
fn bad_stdin_and_unwritable_outputs_are_clear_errors() {
    use std::io::Write as _;
    let dir = tempdir("cli-outputs");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    let gguf = dir.join("q8.gguf");
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", gguf.to_str().unwrap()]).status.success());
    let g = gguf.to_str().unwrap();
    // invalid UTF-8 and nothing at all on standard input
    for (input, needle) in [(&b"\xff\xfe ROMEO"[..], "not valid UTF-8"), (&b""[..], "the prompt is empty")] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mxr"))
            .args(["run", "-m", g, "-n", "2", "--device", "cpu"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{err}");
    }
    // outputs into a directory that does not exist: the path is named, nothing is left
    let missing = dir.join("no/such/dir");
    let cases: Vec<Vec<String>> = vec![
        vec!["convert".into(), golden.to_str().unwrap().into(), "-o".into(), missing.join("x.gguf").to_str().unwrap().into()],
        vec![
            "run".into(),
            "-m".into(),
            g.into(),
            "-p".into(),
            "x".into(),
            "-n".into(),
            "0".into(),
            "--device".into(),
            "cpu".into(),
            "--dump-logits".into(),
            missing.join("l.npy").to_str().unwrap().into(),
        ],
        vec![
            "calibrate".into(),
            "-m".into(),
            g.into(),
            "-f".into(),
            repo_root().join("convert/src/synth/corpus.txt").to_str().unwrap().into(),
            "--max-tokens".into(),
            "20".into(),
            "--device".into(),
            "cpu".into(),
            "-o".into(),
            missing.join("s.json").to_str().unwrap().into(),
        ],
    ];
    for args in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = mxr(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("no/such/dir") && err.contains("No such file or directory") && !err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.matches("No such file or directory").count(), 1, "the OS error once: {err}");
    }
    assert!(!dir.join("no").exists());
}

#[test]
fn bench_depth_prefills_then_decodes_at_that_depth() {
    let dir = tempdir("cli-depth");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    let gguf = dir.join("g.gguf");
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", gguf.to_str().unwrap()]).status.success());
    let out = mxr(&[
        "bench",
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "0",
        "-n",
        "4",
        "-d",
        "64,200",
        "-r",
        "2",
        "-b",
        "32",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let recs: Vec<Json> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let tests: Vec<&str> = recs.iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["tg4", "pp64", "tg4 @ d64", "pp200", "tg4 @ d200"]);
    for r in &recs {
        assert_eq!(r["reps"], 2);
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0, "{r}");
    }
    // decode at depth d reads d more positions of KV per token than decode from empty:
    // 1 softmax layer x 2 (K, V) x kv_dim 64 (2 heads of 32) x 4 bytes (f32 on the CPU)
    // = 512 B per position
    let bytes = |t: &str| recs.iter().find(|r| r["test"] == t).unwrap()["bytes_per_token"].as_f64().unwrap();
    assert_eq!(bytes("tg4 @ d64") - bytes("tg4"), 64.0 * 512.0);
    assert_eq!(bytes("tg4 @ d200") - bytes("tg4"), 200.0 * 512.0);
    assert_eq!(recs[2]["depth"], 64);
    // prefill to a depth counts the attention to the keys before each query
    let flops = |t: &str| recs.iter().find(|r| r["test"] == t).unwrap()["flops_per_token"].as_f64().unwrap();
    assert!(flops("pp200") > flops("pp64"));
}

#[test]
fn cold_experts_takes_auto_cpu_or_in_place() {
    let out = mxr(&["run", "--device", "cpu", "-p", "x", "-n", "1", "--cold-experts", "gpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("'gpu'") && ["auto", "cpu", "in-place", "mixed"].iter().all(|v| err.contains(v)), "{err}");
}

#[test]
fn calibrate_devices_measures_and_saves_the_offload_rates() {
    let dir = tempdir("cli-calibrate-devices");
    let out = Command::new(env!("CARGO_BIN_EXE_mxr")).args(["bench", "--calibrate-devices"]).env("MXR_CACHE_DIR", &dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for row in [
        "host memory read",
        "CPU expert, 1 token",
        "CPU expert, 64 tokens",
        "cost model (pageable copies):",
        "cost model (page-locked copies):",
    ] {
        assert!(text.contains(row), "{row}: {text}");
    }
    let j: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("devices.json")).unwrap()).unwrap();
    for k in ["host_read_gbps", "cpu_expert_gbps", "cpu_gflops", "h2d_gbps", "h2d_pinned_gbps"] {
        let v = j[k].as_f64().unwrap_or(0.0);
        assert!(v > 0.0 && v.is_finite(), "{k} = {v}");
    }
    // the printed decision is the cost model's on the saved rates, for one q4_k expert
    // (three 9216 x 6144 projections: 3 x 9216 x 3456 bytes, 3 x 2 x 9216 x 6144 FLOPs/token)
    let rates = mxr_models::offload_cost::DeviceRates::from_json(&j).unwrap();
    for (how, r) in [("pageable", rates), ("page-locked", rates.pinned())] {
        let expected = match r.copy_threshold(3 * 9216 * 3456, 3.0 * 2.0 * 9216.0 * 6144.0) {
            Some(1) => "is always copied to the GPU".to_string(),
            Some(n) => format!("runs on the CPU below {n} tokens per batch, and is copied to the GPU from {n}"),
            None => "always runs on the CPU".to_string(),
        };
        let line = text.lines().find(|l| l.starts_with(&format!("cost model ({how} copies)"))).unwrap_or("");
        assert!(line.contains(&expected), "{expected}: {text}");
    }
    // decode's choice (--cold-experts auto) on the saved rates: without a GPU the in-place
    // rate stays the default; with one it is measured (0 where the driver cannot map host
    // pages for the GPU)
    let in_place = j["in_place_gbps"].as_f64().unwrap_or(-1.0);
    assert!(in_place >= 0.0 && in_place.is_finite(), "in_place_gbps = {in_place}");
    let decode = text.lines().find(|l| l.starts_with("cost model (decode, --cold-experts auto)")).unwrap_or("");
    let above = rates.decode_mixed_above();
    let expected = if above <= 0.0 {
        "the CPU computes cold experts".to_string()
    } else if above.is_infinite() {
        "sharing them with the CPU never saves".to_string()
    } else {
        format!("read in place by the GPU up to {:.1} MB a token per layer", above / 1e6)
    };
    assert!(decode.contains(&expected), "{expected}: {text}");
    // run/chat/bench read it back; a damaged file is an error, not defaults
    std::fs::write(dir.join("devices.json"), "{").unwrap();
    let rates = mxr_models::offload_cost::DeviceRates::load(&dir.join("devices.json"));
    assert!(rates.is_err());
}
