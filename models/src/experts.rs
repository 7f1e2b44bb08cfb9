//! A layer's experts computed on the CPU from the mapped file: the CPU forward's MoE, and
//! the cold experts of a GPU placement (a batch's, and the decode graph's host worker).

use std::ops::Range;

use mxr_kernels::cpu::{swiglu_ffn, Threads};

use crate::model::{HostMatrix, Layer, Model};
use crate::ModelError;

/// The stacked gate, up and down matrices of one layer's experts, as owned handles on the
/// mapped file (the host worker keeps them beyond a borrow of the model).
#[derive(Clone)]
pub struct HostExperts {
    gate: HostMatrix,
    up: HostMatrix,
    down: HostMatrix,
    /// the model's width and an expert's hidden units
    d: usize,
    h: usize,
}

impl HostExperts {
    pub fn of(model: &Model, layer: &Layer) -> HostExperts {
        let [gate, up, down] = [&layer.gate_exps, &layer.up_exps, &layer.down_exps].map(|t| model.host_matrix(t));
        HostExperts { gate, up, down, d: model.config.dim, h: model.config.hidden_dim }
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
        let gate = self.gate.rows(e * h + hidden.start, hidden.len()).ok_or_else(outside)?;
        let up = self.up.rows(e * h + hidden.start, hidden.len()).ok_or_else(outside)?;
        let down = self.down.rows(e * d, d).ok_or_else(outside)?;
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
