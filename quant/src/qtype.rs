//! Tensor element types.
//!
//! Two views of the same ids:
//! - [`TypeInfo`]: every type ggml defines (id, name, block size, bytes per block), so
//!   the GGUF reader can size and validate tensors of any file, including types mxr does
//!   not compute with (`mxr inspect` must show a llama.cpp Q5_K file too).
//! - [`QType`]: the types mxr stores and computes with; each has block structs in
//!   [`crate::blocks`] and reference math in [`crate::reference`].
//!
//! Invariant: ids, block sizes and byte sizes equal ggml's `type_traits` table
//! (checked against ggml itself by the kernels crate's tests).

use std::fmt;

/// Size facts of one ggml type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    /// ggml's `enum ggml_type` value, as stored in GGUF tensor infos.
    pub id: u32,
    /// ggml's lowercase name (`q4_K`, `bf16`, ...).
    pub name: &'static str,
    /// Elements per block (1 for plain floats and ints).
    pub block_size: usize,
    /// Bytes per block.
    pub type_size: usize,
}

/// Every ggml type id that can appear in a GGUF file (ids 4, 5, 31-33, 36-38 were removed
/// from ggml and are rejected).
pub const GGML_TYPES: &[TypeInfo] = &[
    TypeInfo { id: 0, name: "f32", block_size: 1, type_size: 4 },
    TypeInfo { id: 1, name: "f16", block_size: 1, type_size: 2 },
    TypeInfo { id: 2, name: "q4_0", block_size: 32, type_size: 18 },
    TypeInfo { id: 3, name: "q4_1", block_size: 32, type_size: 20 },
    TypeInfo { id: 6, name: "q5_0", block_size: 32, type_size: 22 },
    TypeInfo { id: 7, name: "q5_1", block_size: 32, type_size: 24 },
    TypeInfo { id: 8, name: "q8_0", block_size: 32, type_size: 34 },
    TypeInfo { id: 9, name: "q8_1", block_size: 32, type_size: 36 },
    TypeInfo { id: 10, name: "q2_K", block_size: 256, type_size: 84 },
    TypeInfo { id: 11, name: "q3_K", block_size: 256, type_size: 110 },
    TypeInfo { id: 12, name: "q4_K", block_size: 256, type_size: 144 },
    TypeInfo { id: 13, name: "q5_K", block_size: 256, type_size: 176 },
    TypeInfo { id: 14, name: "q6_K", block_size: 256, type_size: 210 },
    TypeInfo { id: 15, name: "q8_K", block_size: 256, type_size: 292 },
    TypeInfo { id: 16, name: "iq2_xxs", block_size: 256, type_size: 66 },
    TypeInfo { id: 17, name: "iq2_xs", block_size: 256, type_size: 74 },
    TypeInfo { id: 18, name: "iq3_xxs", block_size: 256, type_size: 98 },
    TypeInfo { id: 19, name: "iq1_s", block_size: 256, type_size: 50 },
    TypeInfo { id: 20, name: "iq4_nl", block_size: 32, type_size: 18 },
    TypeInfo { id: 21, name: "iq3_s", block_size: 256, type_size: 110 },
    TypeInfo { id: 22, name: "iq2_s", block_size: 256, type_size: 82 },
    TypeInfo { id: 23, name: "iq4_xs", block_size: 256, type_size: 136 },
    TypeInfo { id: 24, name: "i8", block_size: 1, type_size: 1 },
    TypeInfo { id: 25, name: "i16", block_size: 1, type_size: 2 },
    TypeInfo { id: 26, name: "i32", block_size: 1, type_size: 4 },
    TypeInfo { id: 27, name: "i64", block_size: 1, type_size: 8 },
    TypeInfo { id: 28, name: "f64", block_size: 1, type_size: 8 },
    TypeInfo { id: 29, name: "iq1_m", block_size: 256, type_size: 56 },
    TypeInfo { id: 30, name: "bf16", block_size: 1, type_size: 2 },
    TypeInfo { id: 34, name: "tq1_0", block_size: 256, type_size: 54 },
    TypeInfo { id: 35, name: "tq2_0", block_size: 256, type_size: 66 },
    TypeInfo { id: 39, name: "mxfp4", block_size: 32, type_size: 17 },
    TypeInfo { id: 40, name: "nvfp4", block_size: 64, type_size: 36 },
    TypeInfo { id: 41, name: "q1_0", block_size: 128, type_size: 18 },
    TypeInfo { id: 42, name: "q2_0", block_size: 64, type_size: 18 },
];

/// Looks up a ggml type id; `None` for ids ggml does not define.
pub fn type_info(id: u32) -> Option<&'static TypeInfo> {
    GGML_TYPES.iter().find(|t| t.id == id)
}

/// The tensor types mxr stores weights in and computes with.
///
/// `Q8K` is ggml's activation format for the k-quant dot products; it never appears as a
/// weight in files mxr writes but is a legal ggml type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4K,
    Q6K,
    Q8K,
}

impl QType {
    /// Weight types (what `--type` may name), in the order documentation lists them.
    pub const WEIGHT_TYPES: [QType; 7] = [QType::F32, QType::F16, QType::BF16, QType::Q8_0, QType::Q4_0, QType::Q4K, QType::Q6K];

    /// ggml's type id.
    pub const fn ggml_id(self) -> u32 {
        match self {
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q8_0 => 8,
            QType::Q4K => 12,
            QType::Q6K => 14,
            QType::Q8K => 15,
            QType::BF16 => 30,
        }
    }

    /// The mxr type for a ggml id, if mxr computes with it.
    pub fn from_ggml(id: u32) -> Option<QType> {
        [QType::F32, QType::F16, QType::BF16, QType::Q8_0, QType::Q4_0, QType::Q4K, QType::Q6K, QType::Q8K]
            .into_iter()
            .find(|q| q.ggml_id() == id)
    }

    /// Parses the names `--type` accepts (`q4_k`, `Q4_K`, `bf16`, ...).
    pub fn parse(name: &str) -> Option<QType> {
        let lower = name.to_ascii_lowercase();
        Self::WEIGHT_TYPES.into_iter().find(|q| q.info().name.eq_ignore_ascii_case(&lower))
    }

    /// Size facts from the ggml table.
    pub fn info(self) -> &'static TypeInfo {
        match type_info(self.ggml_id()) {
            Some(info) => info,
            None => unreachable!("every QType id is in GGML_TYPES"),
        }
    }

    pub fn block_size(self) -> usize {
        self.info().block_size
    }

    pub fn type_size(self) -> usize {
        self.info().type_size
    }

    /// Bytes of one row of `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size())
    }

    /// The activation type ggml's CPU `vec_dot` for this weight type consumes.
    pub const fn vec_dot_type(self) -> QType {
        match self {
            QType::F32 => QType::F32,
            QType::F16 => QType::F16,
            QType::BF16 => QType::BF16,
            QType::Q8_0 | QType::Q4_0 => QType::Q8_0,
            QType::Q4K | QType::Q6K | QType::Q8K => QType::Q8K,
        }
    }

    /// Bits per weight, including block scales.
    pub fn bits_per_weight(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }
}

impl fmt::Display for QType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.info().name.to_ascii_uppercase())
    }
}
