//! Every corrupt file of docs/ROBUSTNESS.md through the CLI (issue 9): each command that
//! reads it ends with exit status 1 (or succeeds where the damage is outside what it
//! reads), prints one "mxr: error:" line, and never panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mxr_e2e::{repo_root, tempdir};

fn mxr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mxr")).args(args).output().expect("running mxr")
}

fn mxr_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxr"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running mxr");
    // the command may exit before reading its input (a file it refuses): a broken pipe is fine
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// Byte offset of tensor `name`'s info entry just after its name (its dimension count).
fn tensor_info(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key.as_slice()).unwrap_or_else(|| panic!("tensor {name} not found"));
    at + key.len()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The corrupt GGUF files: (what, bytes, whether `mxr inspect` must refuse it too).
fn corrupt_ggufs(good: &[u8], data_offset: usize) -> Vec<(String, Vec<u8>, bool)> {
    let mut v: Vec<(String, Vec<u8>, bool)> =
        vec![("empty file".into(), vec![], true), ("text file".into(), b"hello, this is not a model\n".to_vec(), true)];
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.to_vec();
        f(&mut b);
        b
    };
    v.push(("bad magic".into(), with(&|b| b[0] = b'X'), true));
    v.push(("version 7".into(), with(&|b| b[4..8].copy_from_slice(&7u32.to_le_bytes())), true));
    v.push(("absurd tensor count".into(), with(&|b| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())), true));
    v.push(("absurd key count".into(), with(&|b| b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes())), true));
    v.push(("first key's length".into(), with(&|b| b[24 + 4] = 0xff), true));
    for cut in [3, 23, 100, data_offset - 1, data_offset + 1000, good.len() - 1] {
        v.push((format!("cut at byte {cut}"), good[..cut].to_vec(), true));
    }
    // tensor infos: type id, offset alignment, offset past the end
    let embd = tensor_info(good, "token_embd.weight");
    let nd = u32_at(good, embd) as usize;
    let (ty, off) = (embd + 4 + 8 * nd, embd + 8 + 8 * nd);
    v.push(("unknown tensor type id 99".into(), with(&|b| b[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes())), true));
    let o = u64_at(good, off);
    v.push(("misaligned tensor offset".into(), with(&|b| b[off..off + 8].copy_from_slice(&(o + 8).to_le_bytes())), true));
    v.push(("tensor offset past the end".into(), with(&|b| b[off..off + 8].copy_from_slice(&(1u64 << 40).to_le_bytes())), true));
    // a shape that disagrees with the config: a valid file, but not this model
    let norm = tensor_info(good, "blk.0.attn_norm.weight");
    let d0 = u64_at(good, norm + 4);
    v.push((
        "attn_norm shape half the model width".into(),
        with(&|b| b[norm + 4..norm + 12].copy_from_slice(&(d0 / 2).to_le_bytes())),
        false,
    ));
    v
}

#[test]
fn every_corrupt_file_is_a_clean_error() {
    let dir = tempdir("corrupt-cli");
    let golden = repo_root().join("tests/fixtures/golden/equal-alpha");
    let gguf = dir.join("good.gguf");
    assert!(mxr(&["convert", golden.to_str().unwrap(), "-o", gguf.to_str().unwrap()]).status.success());
    let good = std::fs::read(&gguf).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&mxr(&["inspect", "--json", gguf.to_str().unwrap()]).stdout).unwrap();
    let data_offset = info["data_offset"].as_u64().unwrap() as usize;
    let mut files = corrupt_ggufs(&good, data_offset);
    // NaN in a weight: structurally valid; inspect --check and the runner refuse it
    let t = info["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "output_norm.weight").unwrap();
    let at = t["file_offset"].as_u64().unwrap() as usize;
    let mut nan = good.clone();
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    files.push(("a NaN weight".into(), nan, false));
    let corpus = repo_root().join("convert/src/synth/corpus.txt");
    let c = corpus.to_str().unwrap();
    for (what, bytes, inspect_refuses) in &files {
        let p = dir.join("bad.gguf");
        std::fs::write(&p, bytes).unwrap();
        let f = p.to_str().unwrap();
        let out_json = dir.join("s.json");
        let cmds: Vec<(Vec<&str>, bool)> = vec![
            (vec!["inspect", f], *inspect_refuses),
            (vec!["inspect", "--check", f], true),
            (vec!["run", "-m", f, "-p", "hello", "-n", "2", "--device", "cpu"], true),
            (vec!["bench", "-m", f, "-p", "8", "-n", "2", "-r", "1", "--device", "cpu"], true),
            (vec!["ppl", "-m", f, "-f", c, "--ctx", "32", "--device", "cpu"], true),
            (vec!["calibrate", "-m", f, "-f", c, "--max-tokens", "16", "--device", "cpu", "-o", out_json.to_str().unwrap()], true),
        ];
        for (args, must_fail) in &cmds {
            let o = mxr(args);
            let err = String::from_utf8_lossy(&o.stderr);
            let code = o.status.code();
            assert!(code == Some(1) || (!must_fail && code == Some(0)), "{what}: {args:?} exited {code:?}: {err}");
            assert!(!err.contains("panicked"), "{what}: {args:?}: {err}");
            if code == Some(1) {
                assert_eq!(err.matches("mxr: error:").count(), 1, "{what}: {args:?}: {err}");
            }
        }
        assert!(!out_json.exists(), "{what}: calibrate left a file");
        let o = mxr_stdin(&["chat", "-m", f, "-n", "2", "--device", "cpu"], b"hello\n");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{what}: chat: {err}");
        // a model that loads reports the bad turn and goes on; one that does not, exits 1
        assert!(o.status.code() == Some(1) || err.contains("error: "), "{what}: chat: {err}");
    }
}

/// Copies the golden checkpoint, damages it with `f`, converts; returns stderr.
fn convert_damaged(dir: &Path, tag: &str, f: impl FnOnce(&Path)) -> String {
    let ck = dir.join(tag);
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(repo_root().join("tests/fixtures/golden/equal-alpha")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    f(&ck);
    let out_dir = dir.join(format!("{tag}-out"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let o = mxr(&["convert", ck.to_str().unwrap(), "-o", out_dir.join("x.gguf").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{tag}: {err}");
    assert!(!err.contains("panicked") && err.matches("mxr: error:").count() == 1, "{tag}: {err}");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0, "{tag}: convert left a file");
    err
}

#[test]
fn every_corrupt_checkpoint_is_a_clean_error() {
    let dir = tempdir("corrupt-ckpt");
    let shard = |ck: &Path| -> PathBuf { ck.join("model.safetensors") };
    let edit_config = |ck: &Path, from: &str, to: &str| {
        let p = ck.join("config.json");
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains(from), "config.json has no {from}");
        std::fs::write(&p, t.replacen(from, to, 1)).unwrap();
    };
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated shard",
            Box::new(move |ck: &Path| {
                let b = std::fs::read(shard(ck)).unwrap();
                std::fs::write(shard(ck), &b[..b.len() / 2]).unwrap();
            }),
            "model.safetensors",
        ),
        (
            "header length past the end",
            Box::new(move |ck: &Path| {
                let mut b = std::fs::read(shard(ck)).unwrap();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(shard(ck), b).unwrap();
            }),
            "model.safetensors",
        ),
        (
            "header that is not JSON",
            Box::new(move |ck: &Path| {
                let mut b = std::fs::read(shard(ck)).unwrap();
                b[8] = b'#';
                std::fs::write(shard(ck), b).unwrap();
            }),
            "model.safetensors",
        ),
        (
            "unknown dtype",
            Box::new(move |ck: &Path| {
                let mut b = std::fs::read(shard(ck)).unwrap();
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let h = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
                let dtype = if h.contains("\"F32\"") { "\"F32\"" } else { "\"BF16\"" };
                let h2 = h.replacen(dtype, &format!("\"Q9{}\"", &"XXXX"[..dtype.len() - 4]), 1);
                assert_eq!(h2.len(), h.len());
                b[8..8 + n].copy_from_slice(h2.as_bytes());
                std::fs::write(shard(ck), b).unwrap();
            }),
            "dtype",
        ),
        ("missing shard", Box::new(move |ck: &Path| std::fs::remove_file(shard(ck)).unwrap()), "safetensors"),
        ("config.json not JSON", Box::new(move |ck: &Path| std::fs::write(ck.join("config.json"), "{ nope").unwrap()), "config.json"),
        (
            "hidden size that disagrees with the weights",
            Box::new(move |ck: &Path| edit_config(ck, "\"hidden_size\": 64", "\"hidden_size\": 96")),
            "",
        ),
        ("tokenizer.json missing", Box::new(move |ck: &Path| std::fs::remove_file(ck.join("tokenizer.json")).unwrap()), "tokenizer"),
    ];
    for (tag, damage, needle) in cases {
        let err = convert_damaged(&dir, &tag.replace(' ', "-"), damage);
        assert!(err.contains(needle), "{tag}: the error should mention {needle:?}: {err}");
    }
}
