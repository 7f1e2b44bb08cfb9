//! A small byte-level BPE trainer that writes an HF tokenizer.json (GPT-2 style: ByteLevel
//! pre-tokenizer and decoder, BPE model with merges), for synthetic checkpoints.
//!
//! Training: pre-split the corpus into words (a leading space joins the word that
//! follows, as GPT-2's regex does for letters and digits), map bytes to GPT-2's printable
//! byte alphabet, then merge the most frequent adjacent pair until the vocabulary is full
//! (ties broken by the pair's text, so the result is deterministic).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value as Json};

/// GPT-2's reversible byte -> printable char map.
pub fn byte_to_char() -> [char; 256] {
    let printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = [' '; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        chars[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    chars
}

/// Splits text the way GPT-2's pre-tokenizer roughly does: runs of letters, of digits, of
/// other non-space characters, each taking one leading space; other whitespace alone.
fn words(text: &str) -> Vec<String> {
    let class = |c: char| {
        if c.is_alphabetic() {
            1
        } else if c.is_numeric() {
            2
        } else if c.is_whitespace() {
            0
        } else {
            3
        }
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_class = -1;
    for c in text.chars() {
        let k = class(c);
        let continues = k != 0 && (k == cur_class || cur == " ");
        if !continues && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if cur.is_empty() {
            cur_class = k;
        }
        cur.push(c);
        if k == 0 && c != ' ' {
            out.push(std::mem::take(&mut cur));
            cur_class = -1;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Learns merges until `vocab_size` tokens (256 bytes + merges) or no pair repeats.
pub fn train(corpus: &str, vocab_size: usize) -> (Vec<String>, Vec<(String, String)>) {
    let map = byte_to_char();
    let mut counts: HashMap<Vec<String>, usize> = HashMap::new();
    for w in words(corpus) {
        let syms = w.bytes().map(|b| map[b as usize].to_string()).collect();
        *counts.entry(syms).or_default() += 1;
    }
    let mut vocab: Vec<String> = map.iter().map(|c| c.to_string()).collect();
    let mut merges = Vec::new();
    while vocab.len() < vocab_size {
        let mut pairs: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (w, n) in &counts {
            for p in w.windows(2) {
                *pairs.entry((p[0].clone(), p[1].clone())).or_default() += n;
            }
        }
        let Some((best, n)) = pairs.into_iter().max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0))) else { break };
        if n < 2 {
            break;
        }
        let joined = format!("{}{}", best.0, best.1);
        counts = counts
            .into_iter()
            .map(|(w, n)| {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == best.0 && w[i + 1] == best.1 {
                        out.push(joined.clone());
                        i += 2;
                    } else {
                        out.push(w[i].clone());
                        i += 1;
                    }
                }
                (out, n)
            })
            .fold(HashMap::new(), |mut m, (w, n)| {
                *m.entry(w).or_default() += n;
                m
            });
        vocab.push(joined);
        merges.push(best);
    }
    (vocab, merges)
}

/// tokenizer.json for `vocab` (ids in order) and `merges`, with `special` tokens added after
/// the vocabulary.
pub fn tokenizer_json(vocab: &[String], merges: &[(String, String)], special: &[&str]) -> Json {
    let vocab_map: serde_json::Map<String, Json> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Json> = special
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": vocab.len() + i, "content": s, "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_map, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()},
    })
}
