//! GGUF names for MiniMax-01: llama.cpp's `minimax-01` architecture keys and tensor names
//! (spec section 8), and mxr's own `mxr.*` keys. Never spell these inline elsewhere.

/// `general.architecture` of MiniMax-01 files (llama.cpp's name).
pub const ARCH: &str = "minimax-01";

/// Architecture-scoped metadata key suffixes (full key: `minimax-01.<suffix>`).
pub mod arch_keys {
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const BLOCK_COUNT: &str = "block_count";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const HEAD_COUNT: &str = "attention.head_count";
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const KEY_LENGTH: &str = "attention.key_length";
    pub const VALUE_LENGTH: &str = "attention.value_length";
    pub const RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    pub const EXPERT_COUNT: &str = "expert_count";
    pub const EXPERT_USED_COUNT: &str = "expert_used_count";
    pub const RESIDUAL_SCALE: &str = "residual_scale";
    pub const VOCAB_SIZE: &str = "vocab_size";
    /// Per-layer bool array: true = lightning (recurrent) layer.
    pub const RECURRENT_LAYERS: &str = "attention.recurrent_layers";
    /// Every n-th layer is softmax attention when `recurrent_layers` is absent (default 8).
    pub const FULL_ATTENTION_INTERVAL: &str = "full_attention_interval";
}

/// `minimax-01.<suffix>`.
pub fn arch_key(suffix: &str) -> String {
    format!("{ARCH}.{suffix}")
}

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT: &str = "output.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";

/// Per-layer tensors, `blk.{i}.<suffix>`.
pub mod blk {
    pub const ATTN_NORM: &str = "attn_norm.weight";
    pub const FFN_NORM: &str = "ffn_norm.weight";
    /// Lightning: fused per-head [q|k|v] projection.
    pub const ATTN_QKV: &str = "attn_qkv.weight";
    /// Lightning: sigmoid output gate.
    pub const ATTN_GATE: &str = "attn_gate.weight";
    /// Lightning: RMSNorm over all heads' outputs.
    pub const ATTN_NORM_2: &str = "attn_norm_2.weight";
    /// Both kinds: attention output projection.
    pub const ATTN_OUTPUT: &str = "attn_output.weight";
    pub const ATTN_Q: &str = "attn_q.weight";
    pub const ATTN_K: &str = "attn_k.weight";
    pub const ATTN_V: &str = "attn_v.weight";
    /// MoE router.
    pub const FFN_GATE_INP: &str = "ffn_gate_inp.weight";
    pub const FFN_GATE_EXPS: &str = "ffn_gate_exps.weight";
    pub const FFN_UP_EXPS: &str = "ffn_up_exps.weight";
    pub const FFN_DOWN_EXPS: &str = "ffn_down_exps.weight";
}

/// `blk.{layer}.{suffix}`.
pub fn blk(layer: usize, suffix: &str) -> String {
    format!("blk.{layer}.{suffix}")
}

/// Splits `blk.{i}.{suffix}` into (i, suffix).
pub fn parse_blk(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (i, suffix) = rest.split_once('.')?;
    Some((i.parse().ok()?, suffix))
}
