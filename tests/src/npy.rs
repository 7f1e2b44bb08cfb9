//! A minimal reader for numpy `.npy` files holding little-endian float32 C-order arrays
//! (the golden logits).

use std::path::Path;

/// (shape, values) of a float32 .npy file, or what is wrong with it.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), String> {
    let bad = |what: &str| format!("{}: {what}", path.display());
    let bytes = std::fs::read(path).map_err(|e| bad(&e.to_string()))?;
    if !bytes.starts_with(b"\x93NUMPY") || bytes.len() < 12 {
        return Err(bad("not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("header cut short or not text"))?;
    if !(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False")) {
        return Err(bad(&format!("not a C-order float32 array: {header}")));
    }
    let shape_text = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape in the header"))?;
    let shape = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<usize>().map_err(|e| bad(&format!("shape {shape_text}: {e}"))))
        .collect::<Result<Vec<usize>, String>>()?;
    let data = &bytes[start + header_len..];
    let values: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if values.len() != shape.iter().product::<usize>() || data.len() % 4 != 0 {
        return Err(bad(&format!("{} bytes of data for shape {shape:?}", data.len())));
    }
    Ok((shape, values))
}
