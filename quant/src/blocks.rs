//! ggml's quantized block layouts as `#[repr(C)]` structs.
//!
//! Byte layout is exactly ggml's (ggml-common.h), so a block's bytes in a GGUF file can be
//! decoded with [`Block::read`] and produced with [`Block::write`]. Half-precision scales
//! are kept as raw IEEE binary16 bits (`u16`); convert with [`crate::convert`].
//! Sizes are asserted at compile time.

/// Elements per k-quant super-block (ggml's QK_K).
pub const QK_K: usize = 256;
/// Elements per Q8_0 / Q4_0 block.
pub const QK8_0: usize = 32;
pub const QK4_0: usize = 32;
/// Bytes of the packed 6-bit scales/mins of a Q4_K block (K_SCALE_SIZE).
pub const K_SCALE_SIZE: usize = 12;

/// A block type: its element count and byte (de)serialisation.
pub trait Block: Sized {
    /// Elements per block.
    const N: usize;
    /// Bytes per block (== `size_of::<Self>()`).
    const BYTES: usize;
    /// Decodes one block from exactly `Self::BYTES` bytes.
    fn read(b: &[u8]) -> Self;
    /// Encodes one block into exactly `Self::BYTES` bytes.
    fn write(&self, out: &mut [u8]);
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// Q8_0: 32 int8 weights and one f16 scale; w = d * q.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; QK8_0],
}

/// Q4_0: 32 4-bit weights (low nibbles = elements 0..16, high = 16..32), one f16 scale;
/// w = d * (q - 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    pub d: u16,
    pub qs: [u8; QK4_0 / 2],
}

/// Q4_K: 256 4-bit weights in 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min
/// packed into `scales`; w = d * sc_j * q - dmin * m_j.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: 256 6-bit weights (low 4 bits in `ql`, high 2 in `qh`), 16 int8 scales of 16
/// weights each; w = d * sc_j * (q - 32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: u16,
}

/// Q8_K: ggml's activation format for k-quant dot products. f32 scale, 256 int8 values,
/// and the sums of each group of 16 (used for the Q4_K min term).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

impl Block for BlockQ8_0 {
    const N: usize = QK8_0;
    const BYTES: usize = 34;
    fn read(b: &[u8]) -> Self {
        let mut qs = [0i8; QK8_0];
        for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
            *q = byte as i8;
        }
        BlockQ8_0 { d: u16_at(b, 0), qs }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        for (o, &q) in out[2..34].iter_mut().zip(&self.qs) {
            *o = q as u8;
        }
    }
}

impl Block for BlockQ4_0 {
    const N: usize = QK4_0;
    const BYTES: usize = 18;
    fn read(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[2..18]);
        BlockQ4_0 { d: u16_at(b, 0), qs }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..18].copy_from_slice(&self.qs);
    }
}

impl Block for BlockQ4K {
    const N: usize = QK_K;
    const BYTES: usize = 144;
    fn read(b: &[u8]) -> Self {
        let mut scales = [0u8; K_SCALE_SIZE];
        scales.copy_from_slice(&b[4..16]);
        let mut qs = [0u8; QK_K / 2];
        qs.copy_from_slice(&b[16..144]);
        BlockQ4K { d: u16_at(b, 0), dmin: u16_at(b, 2), scales, qs }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        out[4..16].copy_from_slice(&self.scales);
        out[16..144].copy_from_slice(&self.qs);
    }
}

impl Block for BlockQ6K {
    const N: usize = QK_K;
    const BYTES: usize = 210;
    fn read(b: &[u8]) -> Self {
        let mut ql = [0u8; QK_K / 2];
        ql.copy_from_slice(&b[0..128]);
        let mut qh = [0u8; QK_K / 4];
        qh.copy_from_slice(&b[128..192]);
        let mut scales = [0i8; QK_K / 16];
        for (s, &byte) in scales.iter_mut().zip(&b[192..208]) {
            *s = byte as i8;
        }
        BlockQ6K { ql, qh, scales, d: u16_at(b, 208) }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..128].copy_from_slice(&self.ql);
        out[128..192].copy_from_slice(&self.qh);
        for (o, &s) in out[192..208].iter_mut().zip(&self.scales) {
            *o = s as u8;
        }
        out[208..210].copy_from_slice(&self.d.to_le_bytes());
    }
}

impl Block for BlockQ8K {
    const N: usize = QK_K;
    const BYTES: usize = 292;
    fn read(b: &[u8]) -> Self {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut qs = [0i8; QK_K];
        for (q, &byte) in qs.iter_mut().zip(&b[4..260]) {
            *q = byte as i8;
        }
        let mut bsums = [0i16; QK_K / 16];
        for (j, s) in bsums.iter_mut().enumerate() {
            *s = u16_at(b, 260 + 2 * j) as i16;
        }
        BlockQ8K { d, qs, bsums }
    }
    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.d.to_le_bytes());
        for (o, &q) in out[4..260].iter_mut().zip(&self.qs) {
            *o = q as u8;
        }
        for (j, s) in self.bsums.iter().enumerate() {
            out[260 + 2 * j..262 + 2 * j].copy_from_slice(&s.to_le_bytes());
        }
    }
}

/// Q4_K's packed 6-bit (scale, min) of sub-block `j` (0..8); ggml's get_scale_min_k4.
pub fn q4k_scale_min(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}
