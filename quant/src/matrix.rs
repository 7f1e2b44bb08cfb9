//! [`QMatrix`]: a borrowed, shape-checked view of a row-major matrix in one [`QType`]
//! (a GGUF tensor's bytes, or a buffer being built). ggml order: `cols` is the contiguous
//! dimension (ne0), `rows` the product of the others.

use crate::gguf::TensorView;
use crate::qtype::QType;

#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

/// Why bytes cannot be viewed as a matrix.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("{cols} columns are not a whole number of {qtype} blocks of {block}")]
    PartialBlock { qtype: QType, cols: usize, block: usize },
    #[error("a {rows}x{cols} {qtype} matrix needs {expected} bytes, got {actual}")]
    WrongSize { qtype: QType, rows: usize, cols: usize, expected: usize, actual: usize },
    #[error("tensor `{0}` has a type mxr does not compute with")]
    UnsupportedType(String),
}

impl<'a> QMatrix<'a> {
    pub fn new(qtype: QType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, MatrixError> {
        let row = qtype.row_bytes(cols).ok_or(MatrixError::PartialBlock { qtype, cols, block: qtype.block_size() })?;
        let expected = row.saturating_mul(rows);
        if expected != data.len() {
            return Err(MatrixError::WrongSize { qtype, rows, cols, expected, actual: data.len() });
        }
        Ok(QMatrix { qtype, rows, cols, data })
    }

    /// Views a GGUF tensor as [rows = product of dims 1.., cols = dims 0].
    pub fn from_tensor(t: TensorView<'a>) -> Result<Self, MatrixError> {
        let qtype = t.info.qtype().ok_or_else(|| MatrixError::UnsupportedType(t.info.name.clone()))?;
        let cols = t.info.dims.first().copied().unwrap_or(1) as usize;
        Self::new(qtype, t.info.n_rows() as usize, cols, t.data)
    }

    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// Bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}
