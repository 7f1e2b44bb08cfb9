//! Any text as a checkpoint's config.json (MiniMax's remote-code format or the native
//! transformers one): parse and validate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = mxr_models::config::hf::from_hf_json(text, "fuzz") {
            let _ = c.validate("fuzz");
        }
    }
});
