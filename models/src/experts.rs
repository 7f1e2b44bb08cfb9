//! A layer's experts computed on the CPU from the mapped file: the CPU forward's MoE, and
//! the cold experts of a GPU placement (a batch's, and the decode graph's host worker).
//! Where the GPU reads cold experts in place from page-locked host pages (mixed), the CPU
//! reads those pages too, so that the file's pages of cold experts need not be in memory
//! beside them.

use std::ops::Range;

use mxr_kernels::cpu::{swiglu_ffn, Threads};
use mxr_kernels::cuda::placed::{HostPages, HostPagesRead};
use mxr_quant::QMatrix;

use crate::model::{HostMatrix, Layer, Model};
use crate::ModelError;

/// The stacked gate, up and down matrices of one layer's experts, as owned handles on the
/// mapped file (the host worker keeps them beyond a borrow of the model).
#[derive(Clone)]
pub struct HostExperts {
    gate: HostMatrix,
    up: HostMatrix,
    down: HostMatrix,
    /// the same experts' page-locked copies (gate, up, down), read instead of the file for
    /// an expert there
    pages: Option<[HostPages; 3]>,
    /// the model's width and an expert's hidden units
    d: usize,
    h: usize,
}

impl HostExperts {
    pub fn of(model: &Model, layer: &Layer) -> HostExperts {
        let [gate, up, down] = [&layer.gate_exps, &layer.up_exps, &layer.down_exps].map(|t| model.host_matrix(t));
        HostExperts { gate, up, down, pages: None, d: model.config.dim, h: model.config.hidden_dim }
    }

    /// Reads an expert from `pages` (gate, up and down stacks in the file's layout) where
    /// it lies in host pages the CPU can read, from the file otherwise.
    pub fn with_pages(self, pages: [HostPages; 3]) -> HostExperts {
        HostExperts { pages: Some(pages), ..self }
    }

    /// Whether the experts are read from page-locked copies where they have one.
    pub fn reads_pages(&self) -> bool {
        self.pages.is_some()
    }

    /// y [n, d] = the part `hidden` of expert e's output for each row of x [n, d]:
    /// down[:, hidden] · (silu(gate[hidden] · x) * (up[hidden] · x)). All of it for 0..h;
    /// another device's part adds to the rest.
    pub fn ffn(&self, e: usize, hidden: Range<usize>, x: &[f32], n: usize, y: &mut [f32], threads: Threads) -> Result<(), ModelError> {
        let (d, h) = (self.d, self.h);
        if hidden.start > hidden.end || hidden.end > h {
            return Err(ModelError::Input(format!("hidden units {}..{} of an expert's {h}", hidden.start, hidden.end)));
        }
        let outside = || ModelError::Input(format!("expert {e} lies outside its tensor"));
        let reads = self.pages.as_ref().map(|p| p.each_ref().map(HostPages::read));
        let read = |i: usize| reads.as_ref().and_then(|r: &[HostPagesRead<'_>; 3]| r[i].expert(e));
        let gate = paged_or_file(read(0), &self.gate, e * h, hidden.start, hidden.len()).ok_or_else(outside)?;
        let up = paged_or_file(read(1), &self.up, e * h, hidden.start, hidden.len()).ok_or_else(outside)?;
        let down = paged_or_file(read(2), &self.down, e * d, 0, d).ok_or_else(outside)?;
        Ok(swiglu_ffn(&gate, &up, &down, hidden, x, n, y, threads)?)
    }

    /// The bytes of one expert's three matrices (experts of a stacked tensor are alike).
    pub fn expert_bytes(&self) -> usize {
        [(&self.gate, self.h), (&self.up, self.h), (&self.down, self.d)]
            .iter()
            .map(|(m, n)| m.rows(0, *n).map_or(0, |q| q.data.len()))
            .sum()
    }
}

/// Rows [first, first + n) of the expert whose rows start at row `start` of `m`: from
/// `paged`, its bytes in host pages, where it has them; from the file otherwise. None
/// outside the expert or the tensor.
fn paged_or_file<'a>(paged: Option<&'a [u8]>, m: &'a HostMatrix, start: usize, first: usize, n: usize) -> Option<QMatrix<'a>> {
    let Some(bytes) = paged else { return m.rows(start + first, n) };
    let rb = m.qtype.row_bytes(m.cols)?;
    let data = bytes.get(first * rb..first.checked_add(n)? * rb)?;
    Some(QMatrix { qtype: m.qtype, rows: n, cols: m.cols, data })
}
