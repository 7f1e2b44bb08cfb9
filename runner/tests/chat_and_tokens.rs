//! Tokenization and chat templates from a converted GGUF equal transformers' (expectations in
//! tests/fixtures/chat/expected.json, made by tests/reference/make_chat_fixtures.py).

use mxr::template::{render, Message};
use mxr::tokenizer::TextTokenizer;
use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_e2e::{repo_root, temp_path, tempdir};
use mxr_quant::gguf::{GgufFile, Header};
use mxr_quant::QType;
use serde_json::Value as Json;

fn tokenizer(case: &str) -> TextTokenizer {
    let out = temp_path("chat", &format!("{case}.gguf"));
    convert(&repo_root().join("tests/fixtures/golden").join(case), &out, &ConvertOptions::new(TypePlan::uniform(QType::Q8_0)), &|_| {})
        .unwrap();
    TextTokenizer::from_gguf(GgufFile::open(&out).unwrap().header()).unwrap()
}

fn expected() -> Json {
    serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/fixtures/chat/expected.json")).unwrap()).unwrap()
}

#[test]
fn chat_templates_render_exactly_as_transformers() {
    let exp = expected();
    for (case, data) in exp["cases"].as_object().unwrap() {
        let tok = tokenizer(case);
        let template = tok.chat_template.as_deref().expect("template embedded");
        for chat in data["chats"].as_array().unwrap() {
            let msgs: Vec<Message> = chat["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["text"].as_str().unwrap()))
                .collect();
            let got = render(template, &msgs, chat["add_generation_prompt"].as_bool().unwrap()).unwrap();
            assert_eq!(got, chat["rendered"].as_str().unwrap(), "{case}");
        }
    }
}

#[test]
fn tokenization_matches_transformers_and_round_trips() {
    let exp = expected();
    for (case, data) in exp["cases"].as_object().unwrap() {
        let tok = tokenizer(case);
        for t in data["texts"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            let want: Vec<u32> = t["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
            let got = tok.encode(text).unwrap();
            assert_eq!(got, want, "{case}: {text:?}");
            assert_eq!(tok.decode(&got).unwrap(), text, "{case}: round trip");
        }
        let eos = tok.stop.clone();
        assert!(!eos.is_empty(), "{case}: a stop token (<end_of_sentence>)");
    }
}

#[test]
fn generation_tags_are_no_ops_and_errors_are_reported() {
    let t = "{% for m in messages %}{%- generation -%}[{{ m['content'][0]['text'] }}]{%- endgeneration -%}{% endfor %}";
    assert_eq!(render(t, &[Message::new("user", "a"), Message::new("assistant", "b")], false).unwrap(), "[a][b]");
    let e = render("{{ raise_exception('roles must alternate') }}", &[], false).unwrap_err().to_string();
    assert!(e.contains("roles must alternate"), "{e}");
    assert!(render("{% for %}", &[], false).unwrap_err().to_string().contains("does not parse"));
}

#[test]
fn files_without_the_hf_tokenizer_fall_back_to_the_ggml_vocabulary() {
    use mxr_quant::gguf::Builder;
    let exp = expected();
    let case = "equal-alpha";
    let dir = tempdir("chat-ggml");
    let full = dir.join("full.gguf");
    convert(&repo_root().join("tests/fixtures/golden").join(case), &full, &ConvertOptions::new(TypePlan::uniform(QType::Q8_0)), &|_| {})
        .unwrap();
    // Copy the metadata without tokenizer.huggingface.json, as llama.cpp's converter writes it.
    let f = GgufFile::open(&full).unwrap();
    let mut b = Builder::new();
    for (k, v) in f.header().metadata() {
        if k != "tokenizer.huggingface.json" {
            b.set(k.clone(), v.clone()).unwrap();
        }
    }
    let stripped = Header::parse(&b.write_to(Vec::new()).unwrap().finish().unwrap()).unwrap();
    let tok = TextTokenizer::from_gguf(&stripped).unwrap();
    for t in exp["cases"][case]["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let want: Vec<u32> = t["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), text);
    }
}

/// A GGUF header holding only `tokenizer.huggingface.json` = `json`.
fn header_with_tokenizer(json: &str) -> mxr_quant::gguf::Header {
    let mut g = Vec::new();
    g.extend_from_slice(b"GGUF");
    g.extend_from_slice(&3u32.to_le_bytes());
    g.extend_from_slice(&0u64.to_le_bytes());
    g.extend_from_slice(&1u64.to_le_bytes());
    let key = "tokenizer.huggingface.json";
    g.extend_from_slice(&(key.len() as u64).to_le_bytes());
    g.extend_from_slice(key.as_bytes());
    g.extend_from_slice(&8u32.to_le_bytes());
    g.extend_from_slice(&(json.len() as u64).to_le_bytes());
    g.extend_from_slice(json.as_bytes());
    mxr_quant::gguf::Header::parse(&g).unwrap()
}

/// Found by fuzzing (fuzz/ gguf_header): a syntax error inside the "decoder" object made
/// the tokenizers crate panic. It is an error now.
#[test]
fn corrupt_embedded_tokenizer_json_is_an_error_not_a_panic() {
    for json in [
        r#"{"decoder": {"type": "ByteLevel" "x": 1}}"#,
        r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "decoder": {"#,
        "{}",
    ] {
        let h = header_with_tokenizer(json);
        let r = std::panic::catch_unwind(|| mxr::tokenizer::TextTokenizer::from_gguf(&h).map(|_| ()));
        let r = r.unwrap_or_else(|_| panic!("from_gguf panicked on {json:?}"));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{json:?}: {e}");
    }
}
