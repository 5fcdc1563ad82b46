//! The one table of Llama tensor names: each weight's Hugging Face (safetensors) name, its GGUF
//! name and its shape. Both loaders and the random-model writer read them from here.

use crate::inference::model::LlamaShape;

/// A weight outside the decoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalWeight {
    Embed,
    Norm,
    LmHead,
}

/// One weight of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// (weight, Hugging Face name, GGUF name), in the order of [`GlobalWeight`].
const GLOBAL: [(GlobalWeight, &str, &str); 3] = [
    (
        GlobalWeight::Embed,
        "model.embed_tokens.weight",
        "token_embd.weight",
    ),
    (
        GlobalWeight::Norm,
        "model.norm.weight",
        "output_norm.weight",
    ),
    (GlobalWeight::LmHead, "lm_head.weight", "output.weight"),
];

/// (weight, Hugging Face name after `model.layers.{l}.`, GGUF name after `blk.{l}.`), in the
/// order of [`LayerWeight`], which is also the order checkpoints list them.
const LAYER: [(LayerWeight, &str, &str); 9] = [
    (
        LayerWeight::AttnNorm,
        "input_layernorm.weight",
        "attn_norm.weight",
    ),
    (LayerWeight::Q, "self_attn.q_proj.weight", "attn_q.weight"),
    (LayerWeight::K, "self_attn.k_proj.weight", "attn_k.weight"),
    (LayerWeight::V, "self_attn.v_proj.weight", "attn_v.weight"),
    (
        LayerWeight::O,
        "self_attn.o_proj.weight",
        "attn_output.weight",
    ),
    (
        LayerWeight::FfnNorm,
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
    ),
    (LayerWeight::Gate, "mlp.gate_proj.weight", "ffn_gate.weight"),
    (LayerWeight::Up, "mlp.up_proj.weight", "ffn_up.weight"),
    (LayerWeight::Down, "mlp.down_proj.weight", "ffn_down.weight"),
];

const HF_LAYER_PREFIX: &str = "model.layers.";
const GGUF_LAYER_PREFIX: &str = "blk.";

impl GlobalWeight {
    pub fn hf(self) -> &'static str {
        GLOBAL[self as usize].1
    }

    pub fn gguf(self) -> &'static str {
        GLOBAL[self as usize].2
    }

    pub fn dims(self, s: &LlamaShape) -> Vec<usize> {
        match self {
            Self::Embed | Self::LmHead => vec![s.vocab_size, s.hidden_size],
            Self::Norm => vec![s.hidden_size],
        }
    }
}

impl LayerWeight {
    /// Every layer weight, in checkpoint order.
    pub fn all() -> impl Iterator<Item = LayerWeight> {
        LAYER.iter().map(|row| row.0)
    }

    /// The full Hugging Face name in layer `layer`.
    pub fn hf_name(self, layer: usize) -> String {
        format!("{HF_LAYER_PREFIX}{layer}.{}", LAYER[self as usize].1)
    }

    /// The full GGUF name in layer `layer`.
    pub fn gguf_name(self, layer: usize) -> String {
        format!("{GGUF_LAYER_PREFIX}{layer}.{}", LAYER[self as usize].2)
    }

    /// Rows and columns (candle's order, which is the Hugging Face one for both formats).
    pub fn dims(self, s: &LlamaShape) -> Vec<usize> {
        let (h, i) = (s.hidden_size, s.intermediate_size);
        let (q, kv) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        match self {
            Self::AttnNorm | Self::FfnNorm => vec![h],
            Self::Q => vec![q, h],
            Self::K | Self::V => vec![kv, h],
            Self::O => vec![h, q],
            Self::Gate | Self::Up => vec![i, h],
            Self::Down => vec![h, i],
        }
    }
}

/// Any weight of a Llama checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    Global(GlobalWeight),
    Layer(usize, LayerWeight),
}

impl Weight {
    /// The weight a Hugging Face tensor name denotes.
    pub fn from_hf(name: &str) -> Option<Self> {
        if let Some(row) = GLOBAL.iter().find(|row| row.1 == name) {
            return Some(Self::Global(row.0));
        }
        let (layer, rest) = name.strip_prefix(HF_LAYER_PREFIX)?.split_once('.')?;
        let row = LAYER.iter().find(|row| row.1 == rest)?;
        Some(Self::Layer(layer.parse().ok()?, row.0))
    }

    pub fn hf_name(self) -> String {
        match self {
            Self::Global(g) => g.hf().to_string(),
            Self::Layer(l, w) => w.hf_name(l),
        }
    }

    pub fn gguf_name(self) -> String {
        match self {
            Self::Global(g) => g.gguf().to_string(),
            Self::Layer(l, w) => w.gguf_name(l),
        }
    }

    pub fn dims(self, s: &LlamaShape) -> Vec<usize> {
        match self {
            Self::Global(g) => g.dims(s),
            Self::Layer(_, w) => w.dims(s),
        }
    }

    /// RMS-norm scales, which stay unquantised.
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            Self::Global(GlobalWeight::Norm)
                | Self::Layer(_, LayerWeight::AttnNorm | LayerWeight::FfnNorm)
        )
    }
}

/// The GGUF name of a Hugging Face tensor name.
pub fn hf_to_gguf(hf: &str) -> Option<String> {
    Weight::from_hf(hf).map(Weight::gguf_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_enums() {
        for (i, row) in GLOBAL.iter().enumerate() {
            assert_eq!(row.0 as usize, i, "{row:?}");
        }
        for (i, row) in LAYER.iter().enumerate() {
            assert_eq!(row.0 as usize, i, "{row:?}");
        }
    }

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            hf_to_gguf("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            hf_to_gguf("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            hf_to_gguf("model.layers.11.self_attn.o_proj.weight").as_deref(),
            Some("blk.11.attn_output.weight")
        );
        assert_eq!(
            hf_to_gguf("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(hf_to_gguf("model.layers.0.mlp.unknown.weight"), None);
        assert_eq!(hf_to_gguf("model.layers.x.mlp.up_proj.weight"), None);
        for w in LayerWeight::all() {
            assert_eq!(
                Weight::from_hf(&w.hf_name(3)),
                Some(Weight::Layer(3, w)),
                "{w:?}"
            );
        }
    }
}
