//! Any bytes as a GGUF file header: parse, then everything mxr derives from the metadata
//! (model config, layer pattern, tokenizer). Errors are fine; panics and hangs are not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = mxr_quant::gguf::Header::parse(data) {
        let _ = mxr_models::Config::from_gguf(&h);
        let _ = mxr_models::layer_pattern(&h);
        if let Ok(t) = mxr::tokenizer::TextTokenizer::from_gguf(&h) {
            let _ = t.encode("ROMEO: a <end_of_sentence> b");
        }
        for t in h.tensors() {
            let _ = h.data_range(t);
        }
    }
});
