//! tokenizer.json + tokenizer_config.json -> GGUF tokenizer metadata.
//!
//! Two views go into the file: llama.cpp's (`tokenizer.ggml.*`: gpt2 BPE tokens, types and
//! merges, special ids, the chat template) so llama.cpp can load it, and HF's own
//! tokenizer.json verbatim (`tokenizer.huggingface.json`), so mxr tokenizes exactly as
//! transformers does. Token ids past the tokenizer's vocabulary up to the embedding rows
//! become `[PAD<id>]` placeholders of type UNUSED, as llama.cpp's converter writes them.

use std::collections::HashMap;
use std::path::Path;

use mxr_quant::gguf::{Array, Builder, Value};
use serde_json::Value as Json;

use crate::ConvertError;

pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const SUPPRESS: &str = "tokenizer.ggml.suppress_tokens";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    pub const HF_JSON: &str = "tokenizer.huggingface.json";
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// What was read from the tokenizer files.
pub struct Tokenizer {
    /// The tokenizer.json text, verbatim.
    pub hf_json: String,
    /// Token strings by id (gaps filled with `[PAD<id>]`), `vocab_size` of them.
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// Size of the BPE vocabulary proper (without added tokens): rows at or past it whose
    /// embedding is all zero get suppressed.
    pub base_vocab: usize,
    pub pre: &'static str,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

fn bad(path: &Path, reason: String) -> ConvertError {
    ConvertError::BadFile { path: path.to_path_buf(), reason }
}

/// Reads the tokenizer of checkpoint `dir` for an embedding of `vocab_size` rows.
pub fn read(dir: &Path, vocab_size: usize) -> Result<Tokenizer, ConvertError> {
    let path = dir.join("tokenizer.json");
    let hf_json = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
    let j: Json = serde_json::from_str(&hf_json).map_err(|e| bad(&path, format!("not valid JSON: {e}")))?;
    let model = j.get("model").ok_or_else(|| bad(&path, "no `model` section".into()))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(bad(
            &path,
            format!("model type {} is not BPE (mxr converts byte-level BPE tokenizers)", model.get("type").unwrap_or(&Json::Null)),
        ));
    }
    let vocab = model.get("vocab").and_then(Json::as_object).ok_or_else(|| bad(&path, "no `model.vocab` object".into()))?;
    let mut by_id: HashMap<u64, (String, i32)> = HashMap::with_capacity(vocab.len());
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad(&path, format!("vocab entry {tok:?} has id {id}")))?;
        by_id.insert(id, (tok.clone(), NORMAL));
    }
    let base_vocab = vocab.len();
    for a in j.get("added_tokens").and_then(Json::as_array).map(Vec::as_slice).unwrap_or(&[]) {
        let (Some(id), Some(content)) = (a.get("id").and_then(Json::as_u64), a.get("content").and_then(Json::as_str)) else {
            return Err(bad(&path, format!("added token {a} lacks an id or content")));
        };
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        by_id.insert(id, (content.to_string(), if special { CONTROL } else { USER_DEFINED }));
    }
    if let Some(max) = by_id.keys().max().filter(|&&m| m as usize >= vocab_size) {
        return Err(bad(&path, format!("token id {max} does not fit the {vocab_size} embedding rows of config.json")));
    }
    let (mut tokens, mut token_types) = (Vec::with_capacity(vocab_size), Vec::with_capacity(vocab_size));
    for id in 0..vocab_size as u64 {
        let (t, ty) = by_id.remove(&id).unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        tokens.push(t);
        token_types.push(ty);
    }
    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 && pair.iter().all(Json::is_string) => {
                Ok(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or("")))
            }
            other => Err(bad(&path, format!("merge {other} is neither \"a b\" nor [\"a\", \"b\"]"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = read_config(dir)?;
    let id_of = |key: &str| special_token(&config, key).and_then(|s| tokens.iter().position(|t| *t == s)).map(|i| i as u32);
    Ok(Tokenizer {
        pre: pre_tokenizer(&j),
        bos: id_of("bos_token"),
        eos: id_of("eos_token"),
        unk: id_of("unk_token"),
        add_bos: config.get("add_bos_token").and_then(Json::as_bool).unwrap_or(false),
        chat_template: chat_template(dir, &config)?,
        hf_json,
        tokens,
        token_types,
        merges,
        base_vocab,
    })
}

fn read_config(dir: &Path) -> Result<Json, ConvertError> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(Json::Object(Default::default()));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| bad(&path, format!("not valid JSON: {e}")))
}

/// `bos_token` etc.: a string, or an AddedToken object with `content`.
fn special_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        o => o.get("content").and_then(Json::as_str).map(str::to_string),
    }
}

/// chat_template.jinja beside the config wins (newer transformers), else the config's
/// `chat_template` (a string, or a list of named templates: the one named "default").
fn chat_template(dir: &Path, config: &Json) -> Result<Option<String>, ConvertError> {
    let file = dir.join("chat_template.jinja");
    if file.exists() {
        return std::fs::read_to_string(&file).map(Some).map_err(|e| ConvertError::io(&file, e));
    }
    Ok(match config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template").and_then(Json::as_str))
            .map(str::to_string),
        _ => None,
    })
}

/// llama.cpp's pre-tokenizer name: GPT-2's regex for a plain byte-level pre-tokenizer,
/// else "default" (mxr itself always uses the embedded tokenizer.json).
fn pre_tokenizer(j: &Json) -> &'static str {
    let pre = j.get("pre_tokenizer");
    let is_plain_byte_level = pre.and_then(|p| p.get("type")).and_then(Json::as_str) == Some("ByteLevel")
        && pre.and_then(|p| p.get("use_regex")).and_then(Json::as_bool).unwrap_or(true);
    if is_plain_byte_level {
        "gpt-2"
    } else {
        "default"
    }
}

impl Tokenizer {
    /// Writes the tokenizer keys; `suppress` are ids of all-zero embedding rows.
    pub fn write_gguf(&self, b: &mut Builder, suppress: &[u32]) -> Result<(), ConvertError> {
        b.set(keys::MODEL, Value::String("gpt2".into()))?;
        b.set(keys::PRE, Value::String(self.pre.into()))?;
        b.set(keys::TOKENS, Value::Array(Array::String(self.tokens.clone())))?;
        b.set(keys::TOKEN_TYPE, Value::Array(Array::I32(self.token_types.clone())))?;
        b.set(keys::MERGES, Value::Array(Array::String(self.merges.clone())))?;
        for (key, id) in [(keys::BOS_ID, self.bos), (keys::EOS_ID, self.eos), (keys::UNK_ID, self.unk)] {
            if let Some(id) = id {
                b.set(key, Value::U32(id))?;
            }
        }
        b.set(keys::ADD_BOS, Value::Bool(self.add_bos))?;
        if !suppress.is_empty() {
            b.set(keys::SUPPRESS, Value::Array(Array::I32(suppress.iter().map(|&i| i as i32).collect())))?;
        }
        if let Some(t) = &self.chat_template {
            b.set(keys::CHAT_TEMPLATE, Value::String(t.clone()))?;
        }
        b.set(keys::HF_JSON, Value::String(self.hf_json.clone()))?;
        Ok(())
    }
}
