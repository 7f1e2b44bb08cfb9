//! Tokenizer and chat template as they come from GGUF metadata: the input, split at its
//! first 0 byte, is an embedded tokenizer.json and a chat template. Both go into a GGUF
//! header; mxr loads the tokenizer from it, encodes and decodes, and renders the template.
#![no_main]
use libfuzzer_sys::fuzz_target;

fn kv_string(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(&(key.len() as u64).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&8u32.to_le_bytes()); // string
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (json, template) = text.split_once('\0').unwrap_or((text, "{{ messages[0]['content'] }}"));
    let mut g = Vec::new();
    g.extend_from_slice(b"GGUF");
    g.extend_from_slice(&3u32.to_le_bytes());
    g.extend_from_slice(&0u64.to_le_bytes()); // tensors
    g.extend_from_slice(&2u64.to_le_bytes()); // metadata entries
    kv_string(&mut g, "tokenizer.huggingface.json", json);
    kv_string(&mut g, "tokenizer.chat_template", template);
    let Ok(h) = mxr_quant::gguf::Header::parse(&g) else { return };
    if let Ok(t) = mxr::tokenizer::TextTokenizer::from_gguf(&h) {
        if let Ok(ids) = t.encode("ROMEO:\nBut soft! <end_of_sentence>") {
            let _ = t.decode(&ids);
        }
    }
    let msgs = [mxr::template::Message::new("system", "Be brief."), mxr::template::Message::new("user", "Hi")];
    let _ = mxr::template::render(template, &msgs, true);
});
