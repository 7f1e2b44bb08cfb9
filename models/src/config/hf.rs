//! HF `config.json` -> [`Config`], for both formats MiniMax ships (spec section 1):
//! - remote code (`model_type` `minimax_text_01` / `minimax_m1`): `attn_type_list` (0 =
//!   lightning, 1 = softmax), `rotary_dim`, `layernorm_{full_attention,linear_attention,
//!   mlp}_{alpha,beta}`, `postnorm`, `shared_intermediate_size`;
//! - native transformers (`model_type` `minimax`): `layer_types`, `*_alpha_factor` /
//!   `*_beta_factor`, `rope_parameters` with `partial_rotary_factor`.
//!
//! Where a key is missing the defaults of the code that defines the format apply, except
//! where such a default silently builds a different model (no layer pattern, pre-norm,
//! shared experts): those are errors.

use serde_json::{Map, Value as Json};

use super::{Config, Residual};
use crate::layers::LayerKind;
use crate::ModelError;

type Obj = Map<String, Json>;

/// Parses `config.json` text; `source` (a path) names the file in errors.
pub fn from_hf_json(text: &str, source: &str) -> Result<Config, ModelError> {
    let bad = |reason: String| ModelError::BadConfig { origin: source.to_string(), reason };
    let root: Json = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let o = root.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let model_type = o.get("model_type").and_then(Json::as_str).unwrap_or("");
    let cfg = match model_type {
        "minimax_text_01" | "minimax_m1" | "minimax_text01" => remote(o, &bad)?,
        "minimax" => native(o, &bad)?,
        other => {
            return Err(bad(format!("model_type `{other}` is not a MiniMax-01 model (expected minimax_text_01, minimax_m1 or minimax)")))
        }
    };
    cfg.validate(source)?;
    Ok(cfg)
}

fn get_usize(o: &Obj, key: &str, bad: &dyn Fn(String) -> ModelError) -> Result<Option<usize>, ModelError> {
    match o.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| bad(format!("`{key}` is {v}, expected a non-negative integer"))),
    }
}

fn need_usize(o: &Obj, key: &str, bad: &dyn Fn(String) -> ModelError) -> Result<usize, ModelError> {
    get_usize(o, key, bad)?.ok_or_else(|| bad(format!("`{key}` is missing")))
}

fn get_f64(o: &Obj, key: &str, default: f64, bad: &dyn Fn(String) -> ModelError) -> Result<f64, ModelError> {
    match o.get(key) {
        None | Some(Json::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| bad(format!("`{key}` is {v}, expected a number"))),
    }
}

/// The keys both formats share (Mixtral-style names).
fn common(o: &Obj, layers: Vec<LayerKind>, bad: &dyn Fn(String) -> ModelError) -> Result<Config, ModelError> {
    let dim = need_usize(o, "hidden_size", bad)?;
    let n_heads = need_usize(o, "num_attention_heads", bad)?;
    let head_dim = get_usize(o, "head_dim", bad)?.unwrap_or(dim.checked_div(n_heads).unwrap_or(0));
    Ok(Config {
        dim,
        n_layers: need_usize(o, "num_hidden_layers", bad)?,
        n_heads,
        n_kv_heads: get_usize(o, "num_key_value_heads", bad)?.unwrap_or(n_heads),
        head_dim,
        rotary_dim: head_dim,
        rope_theta: 1e6,
        hidden_dim: need_usize(o, "intermediate_size", bad)?,
        n_experts: get_usize(o, "num_local_experts", bad)?.or(get_usize(o, "num_experts", bad)?).unwrap_or(8),
        n_experts_used: get_usize(o, "num_experts_per_tok", bad)?.unwrap_or(2),
        vocab_size: need_usize(o, "vocab_size", bad)?,
        context_length: get_usize(o, "max_position_embeddings", bad)?.unwrap_or(4096),
        rms_eps: get_f64(o, "rms_norm_eps", 1e-5, bad)?,
        lightning_norm_eps: 1e-6,
        layers,
        residual_softmax: Residual { alpha: 1.0, beta: 1.0 },
        residual_lightning: Residual { alpha: 1.0, beta: 1.0 },
        residual_mlp: Residual { alpha: 1.0, beta: 1.0 },
        tie_word_embeddings: o.get("tie_word_embeddings").and_then(Json::as_bool).unwrap_or(false),
    })
}

fn remote(o: &Obj, bad: &dyn Fn(String) -> ModelError) -> Result<Config, ModelError> {
    let list = o.get("attn_type_list").and_then(Json::as_array).ok_or_else(|| bad("`attn_type_list` is missing".into()))?;
    let layers = list
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_u64() {
            Some(0) => Ok(LayerKind::Lightning),
            Some(1) => Ok(LayerKind::Softmax),
            _ => Err(bad(format!("attn_type_list[{i}] is {v}, expected 0 (lightning) or 1 (softmax)"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut c = common(o, layers, bad)?;
    if o.get("postnorm").and_then(Json::as_bool) != Some(true) {
        return Err(bad("`postnorm` is not true: MiniMax-Text-01 and M1 are post-norm; pre-norm variants are not supported".into()));
    }
    if get_usize(o, "shared_intermediate_size", bad)?.unwrap_or(0) != 0 {
        return Err(bad("`shared_intermediate_size` is non-zero: shared experts (and `coefficient`) are not supported".into()));
    }
    c.rotary_dim = get_usize(o, "rotary_dim", bad)?.unwrap_or(c.head_dim);
    c.rope_theta = get_f64(o, "rope_theta", 1e6, bad)?;
    let site = |name: &str| -> Result<Residual, ModelError> {
        Ok(Residual {
            alpha: get_f64(o, &format!("layernorm_{name}_alpha"), 1.0, bad)?,
            beta: get_f64(o, &format!("layernorm_{name}_beta"), 1.0, bad)?,
        })
    };
    c.residual_softmax = site("full_attention")?;
    c.residual_lightning = site("linear_attention")?;
    c.residual_mlp = site("mlp")?;
    Ok(c)
}

fn native(o: &Obj, bad: &dyn Fn(String) -> ModelError) -> Result<Config, ModelError> {
    let list = o
        .get("layer_types")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("`layer_types` is missing (transformers would silently alternate full/linear attention)".into()))?;
    let layers = list
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some("linear_attention") => Ok(LayerKind::Lightning),
            Some("full_attention") => Ok(LayerKind::Softmax),
            _ => Err(bad(format!("layer_types[{i}] is {v}, expected \"linear_attention\" or \"full_attention\""))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut c = common(o, layers, bad)?;
    let empty = Map::new();
    let rope = o.get("rope_parameters").and_then(Json::as_object).unwrap_or(&empty);
    let theta_default = get_f64(o, "rope_theta", 1e6, bad)?;
    c.rope_theta = get_f64(rope, "rope_theta", theta_default, bad)?;
    let partial_default = get_f64(o, "partial_rotary_factor", 1.0, bad)?;
    let partial = get_f64(rope, "partial_rotary_factor", partial_default, bad)?;
    let rotary = partial * c.head_dim as f64;
    if !(0.0..=1.0).contains(&partial) || rotary.fract() != 0.0 {
        return Err(bad(format!("partial_rotary_factor {partial} does not give a whole rotary dim of head dim {}", c.head_dim)));
    }
    c.rotary_dim = rotary as usize;
    let site = |name: &str| -> Result<Residual, ModelError> {
        Ok(Residual {
            alpha: get_f64(o, &format!("{name}_alpha_factor"), 1.0, bad)?,
            beta: get_f64(o, &format!("{name}_beta_factor"), 1.0, bad)?,
        })
    };
    c.residual_softmax = site("full_attn")?;
    c.residual_lightning = site("linear_attn")?;
    c.residual_mlp = site("mlp")?;
    Ok(c)
}
