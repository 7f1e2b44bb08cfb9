//! Any bytes as a safetensors file (8-byte header length, JSON header, data), and as a
//! model.safetensors.index.json naming it: open, validate, read each tensor's first row.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("mxr-fuzz-st-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let shard = dir.join("model-00001.safetensors");
    if std::fs::write(&shard, data).is_err() {
        return;
    }
    if let Ok(tensors) = mxr_convert::safetensors::open_shard(&shard) {
        let mut buf = Vec::new();
        for t in tensors.values() {
            if t.n_rows() > 0 {
                let _ = t.read_rows(0, 1, &mut buf);
            }
        }
    }
    // the same bytes as an index file (when they are text)
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = std::fs::write(dir.join("model.safetensors.index.json"), text);
        let _ = mxr_convert::safetensors::open_checkpoint(&dir);
        let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
    }
});
