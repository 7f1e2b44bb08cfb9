//! Text <-> token ids, from the model file: the embedded HF tokenizer.json
//! (`tokenizer.huggingface.json`) through the tokenizers crate, so ids equal transformers';
//! for files without it (llama.cpp's converter), a byte-level BPE rebuilt from
//! `tokenizer.ggml.tokens` / `.merges`. Also the stop tokens and the tokens generation must
//! never produce (all-zero embedding rows, `tokenizer.ggml.suppress_tokens`).

use anyhow::{anyhow, bail, Context, Result};
use mxr_quant::gguf::{Array, Header};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use mxr_convert::tokenizer::keys::{
    CHAT_TEMPLATE as KEY_CHAT_TEMPLATE, EOS_ID as KEY_EOS, EOT_ID as KEY_EOT, HF_JSON as KEY_HF_JSON, MERGES as KEY_MERGES,
    SUPPRESS as KEY_SUPPRESS, TOKENS as KEY_TOKENS, TOKEN_TYPE as KEY_TOKEN_TYPE,
};

/// MiniMax's end-of-turn token: generation stops on it whatever the metadata says.
pub const END_OF_SENTENCE: &str = "<end_of_sentence>";

pub struct TextTokenizer {
    inner: Tokenizer,
    /// Generation stops at any of these.
    pub stop: Vec<u32>,
    /// Never sampled.
    pub suppress: Vec<u32>,
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    pub fn from_gguf(h: &Header) -> Result<TextTokenizer> {
        let inner = match h.get_str(KEY_HF_JSON)? {
            Some(json) => {
                // Syntax first: tokenizers 0.22 panics (`expect("Helper")`) on a syntax error
                // inside the "decoder" object instead of returning an error (found by fuzzing).
                serde_json::from_str::<serde_json::Value>(json).map_err(|e| anyhow!("embedded tokenizer.json is not valid JSON: {e}"))?;
                Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow!("embedded tokenizer.json: {e}"))?
            }
            None => from_ggml(h)?,
        };
        let mut stop = Vec::new();
        for key in [KEY_EOS, KEY_EOT] {
            if let Some(id) = h.get_u64(key)? {
                stop.push(id as u32);
            }
        }
        if let Some(id) = inner.token_to_id(END_OF_SENTENCE) {
            stop.push(id);
        }
        stop.sort_unstable();
        stop.dedup();
        let suppress = match h.get_array(KEY_SUPPRESS)? {
            Some(Array::I32(v)) => v.iter().map(|&i| i as u32).collect(),
            Some(a) => bail!("{KEY_SUPPRESS} is an array of {}, expected int32", a.elem_type().name()),
            None => Vec::new(),
        };
        Ok(TextTokenizer { inner, stop, suppress, chat_template: h.get_str(KEY_CHAT_TEMPLATE)?.map(str::to_string) })
    }

    /// Token ids of `text`; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens included, as they were generated).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("detokenizing: {e}"))
    }
}

/// A GPT-2 byte-level BPE from llama.cpp's tokenizer keys.
fn from_ggml(h: &Header) -> Result<Tokenizer> {
    let tokens = match h.get_array(KEY_TOKENS)? {
        Some(Array::String(t)) => t.clone(),
        _ => bail!("the model has neither {KEY_HF_JSON} nor {KEY_TOKENS}: no tokenizer"),
    };
    let merges = match h.get_array(KEY_MERGES)? {
        Some(Array::String(m)) => m
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| anyhow!("merge `{m}` is not `a b`")))
            .collect::<Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    // llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special).
    let types = match h.get_array(KEY_TOKEN_TYPE)? {
        Some(Array::I32(t)) => t.clone(),
        _ => Vec::new(),
    };
    let added: Vec<AddedToken> =
        types.iter().zip(&tokens).filter(|(ty, _)| **ty == 3 || **ty == 4).map(|(ty, t)| AddedToken::from(t.clone(), *ty == 3)).collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| anyhow!("building BPE: {e}"))?;
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    t.add_special_tokens(&added);
    Ok(t)
}

/// Prints text as tokens arrive, holding back an incomplete UTF-8 sequence (a byte-level
/// token may end inside a character).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The new text `id` completes, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids).context("decoding the reply")?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }
}
