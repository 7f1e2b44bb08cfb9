//! How much of the model file this process has mapped in (issue 7): with cold experts in
//! page-locked memory the file's pages of experts should not be resident beside them.

use std::path::Path;

/// Bytes of `path`'s mappings resident in this process (the `Rss` of its entries in
/// /proc/self/smaps); None where that cannot be read (not Linux) or nothing maps it.
pub fn file_resident_bytes(path: &Path) -> Option<u64> {
    let want = std::fs::canonicalize(path).ok()?;
    resident_in(&std::fs::read_to_string("/proc/self/smaps").ok()?, &want)
}

/// The sum of the `Rss:` lines of the entries of `smaps` whose path is `want`.
fn resident_in(smaps: &str, want: &Path) -> Option<u64> {
    let (mut inside, mut total, mut found) = (false, 0u64, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.split('-').all(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit())) {
            // an entry's header: range perms offset dev inode [path]
            let path = fields.nth(4).map(|p| line[line.find(p).unwrap_or(0)..].trim_end());
            inside = path.is_some_and(|p| Path::new(p) == want);
            found |= inside;
        } else if inside && first == "Rss:" {
            total += fields.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        }
    }
    found.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the entries of the file count, their Rss in kB summed; a file not mapped gives
    /// None.
    #[test]
    fn resident_bytes_sum_the_file_s_entries() {
        let smaps = "\
7f0000000000-7f0000100000 r--s 00000000 08:01 42                         /models/m.gguf
Size:               1024 kB
Rss:                 512 kB
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 
Rss:                1000 kB
7f0000200000-7f0000300000 r--s 00100000 08:01 42                         /models/m.gguf
Rss:                   8 kB
7f0000300000-7f0000400000 r--s 00000000 08:01 43                         /models/other file.gguf
Rss:                  64 kB
";
        assert_eq!(resident_in(smaps, Path::new("/models/m.gguf")), Some(520 * 1024));
        assert_eq!(resident_in(smaps, Path::new("/models/other file.gguf")), Some(64 * 1024));
        assert_eq!(resident_in(smaps, Path::new("/models/none.gguf")), None);
    }

    /// A mapped model file's touched pages count; `GgufFile::release_pages` takes a
    /// tensor's pages back (its resident bytes drop by about its size), and reading the
    /// tensor again gives the same bytes and maps them in again.
    #[test]
    fn released_pages_leave_the_file_s_resident_bytes_and_come_back_on_use() {
        use mxr_quant::gguf::{Builder, GgufFile};
        let path = std::env::temp_dir().join(format!("mxr-host-memory-{}.gguf", std::process::id()));
        let n = 1usize << 20; // 4 MiB of F32
        let mut b = Builder::new();
        b.add_tensor("t", 0, &[n as u64]).unwrap();
        let mut w = b.create(&path).unwrap();
        let values: Vec<u8> = (0..n as u32).flat_map(|v| v.to_le_bytes()).collect();
        w.write_tensor("t", &values).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&path).unwrap();
        let data = f.tensor("t").unwrap().data;
        let sum = |d: &[u8]| d.iter().step_by(997).map(|&v| v as u64).sum::<u64>();
        let want = sum(data);
        let touched = file_resident_bytes(&path).unwrap();
        let released = f.release_pages(data);
        let after = file_resident_bytes(&path).unwrap();
        let again = sum(data);
        let back = file_resident_bytes(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(touched >= 4 * n as u64 - 8192, "touched {touched}");
        assert_eq!(released, 4 * n);
        assert!(after + 4 * n as u64 - 8192 <= touched, "{touched} -> {after}");
        assert_eq!(again, want);
        assert!(back >= 4 * n as u64 - 8192, "read again: {back}");
        // bytes outside the file are refused
        assert_eq!(f.release_pages(&values), 0);
    }
}
