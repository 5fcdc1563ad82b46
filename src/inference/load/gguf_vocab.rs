//! A Hugging Face `tokenizer.json` as GGUF metadata, so a GGUF file we write carries its own
//! tokenizer: whole, for our loader (`tokenizer.huggingface.json`), and as llama.cpp's
//! `tokenizer.ggml.*` lists, so llama.cpp reads the same file and tokenizes as we do.
//!
//! llama.cpp's SentencePiece tokenizer joins the adjacent pair whose joined text has the highest
//! score; Hugging Face's BPE joins the pair of lowest merge rank. A token's score is therefore
//! minus the rank of the first merge that makes it, which orders llama.cpp's joins as ours.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

/// The key holding the whole `tokenizer.json` text.
pub const HF_JSON_KEY: &str = "tokenizer.huggingface.json";

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Score of tokens no merge makes (single characters, bytes, special tokens).
const UNMERGED_SCORE: f32 = 0.0;

/// The metadata for `json` (a `tokenizer.json` text) in a model of `model_vocab` rows. The
/// `tokenizer.ggml.*` lists are added only for SentencePiece-style BPE (byte fallback), the kind
/// Llama and Mistral use; other tokenizers travel as JSON alone.
pub fn tokenizer_metadata(json: &str, model_vocab: usize) -> Result<Vec<(String, Value)>, String> {
    let mut out = vec![(HF_JSON_KEY.to_string(), Value::String(json.to_string()))];
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("tokenizer.json: {e}"))?;
    let model = &doc["model"];
    if model["type"] != "BPE" || model["byte_fallback"] != true {
        return Ok(out);
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or("tokenizer.json: model.vocab is not a map")?;
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut put = |id: usize, text: &str| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some(text.to_string());
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or("tokenizer.json: a vocab id is not a number")? as usize;
        put(id, text);
    }
    let mut special: HashMap<usize, bool> = HashMap::new();
    for added in doc["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        put(id as usize, text);
        special.insert(id as usize, added["special"] == true);
    }
    if tokens.len() > model_vocab {
        return Err(format!(
            "the tokenizer has {} tokens but the model only {model_vocab}",
            tokens.len()
        ));
    }
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.as_deref().map(|t| (t, i)))
        .collect();
    let mut rank_of: HashMap<usize, usize> = HashMap::new();
    for (rank, merge) in model["merges"].as_array().into_iter().flatten().enumerate() {
        let joined = match merge {
            serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            serde_json::Value::Array(pair) => match (pair.first(), pair.get(1)) {
                (Some(a), Some(b)) => Some(format!(
                    "{}{}",
                    a.as_str().unwrap_or_default(),
                    b.as_str().unwrap_or_default()
                )),
                _ => None,
            },
            _ => None,
        };
        if let Some(id) = joined.and_then(|j| ids.get(j.as_str()).copied()) {
            rank_of.entry(id).or_insert(rank);
        }
    }
    let unk = model["unk_token"]
        .as_str()
        .and_then(|u| ids.get(u).copied());
    let mut texts = Vec::with_capacity(model_vocab);
    let mut scores = Vec::with_capacity(model_vocab);
    let mut types = Vec::with_capacity(model_vocab);
    for id in 0..model_vocab {
        let Some(text) = tokens.get(id).cloned().flatten() else {
            // Rows the tokenizer never produces, named as llama.cpp's converter names them.
            texts.push(Value::String(format!("[PAD{id}]")));
            scores.push(Value::F32(UNMERGED_SCORE));
            types.push(Value::I32(UNUSED));
            continue;
        };
        let kind = if Some(id) == unk {
            UNKNOWN
        } else if let Some(&is_special) = special.get(&id) {
            if is_special { CONTROL } else { USER_DEFINED }
        } else if is_byte_token(&text) {
            BYTE
        } else {
            NORMAL
        };
        let score = rank_of
            .get(&id)
            .map_or(UNMERGED_SCORE, |&r| -(r as f32) - 1.0);
        texts.push(Value::String(text));
        scores.push(Value::F32(score));
        types.push(Value::I32(kind));
    }
    let id_of = |t: &str| ids.get(t).map(|&i| Value::U32(i as u32));
    out.push((
        "tokenizer.ggml.model".to_string(),
        Value::String("llama".into()),
    ));
    out.push(("tokenizer.ggml.tokens".to_string(), Value::Array(texts)));
    out.push(("tokenizer.ggml.scores".to_string(), Value::Array(scores)));
    out.push(("tokenizer.ggml.token_type".to_string(), Value::Array(types)));
    let bos = bos_token(&doc);
    for (key, token) in [
        (
            "tokenizer.ggml.bos_token_id",
            bos.as_deref().or(Some("<s>")),
        ),
        ("tokenizer.ggml.eos_token_id", Some("</s>")),
        (
            "tokenizer.ggml.unknown_token_id",
            model["unk_token"].as_str(),
        ),
    ] {
        if let Some(v) = token.and_then(id_of) {
            out.push((key.to_string(), v));
        }
    }
    out.push((
        "tokenizer.ggml.add_bos_token".to_string(),
        Value::Bool(bos.is_some()),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".to_string(),
        Value::Bool(false),
    ));
    Ok(out)
}

/// `<0x0A>` and the like: SentencePiece's byte-fallback pieces.
fn is_byte_token(text: &str) -> bool {
    text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && u8::from_str_radix(&text[3..5], 16).is_ok()
}

/// The special token the post-processor puts before every single sequence, if any.
fn bos_token(doc: &serde_json::Value) -> Option<String> {
    let first = doc["post_processor"]["single"].as_array()?.first()?;
    first["SpecialToken"]["id"].as_str().map(String::from)
}

/// The `tokenizer.json` a GGUF file carries, if it carries one.
pub fn embedded_tokenizer(metadata: &HashMap<String, Value>) -> Option<&str> {
    metadata
        .get(HF_JSON_KEY)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama2() -> String {
        std::fs::read_to_string(crate::inference::tokenizer::test_support::fixture_path()).unwrap()
    }

    fn get<'a>(md: &'a [(String, Value)], key: &str) -> &'a Value {
        &md.iter().find(|(k, _)| k == key).unwrap().1
    }

    #[test]
    fn llama2_tokens_scores_and_types_follow_the_sentencepiece_layout() {
        let md = tokenizer_metadata(&llama2(), 32000).unwrap();
        let tokens = get(&md, "tokenizer.ggml.tokens").to_vec().unwrap();
        let types = get(&md, "tokenizer.ggml.token_type").to_vec().unwrap();
        let scores = get(&md, "tokenizer.ggml.scores").to_vec().unwrap();
        assert_eq!(tokens.len(), 32000);
        let text = |i: usize| tokens[i].to_string().unwrap().clone();
        let kind = |i: usize| types[i].to_i32().unwrap();
        assert_eq!((text(0).as_str(), kind(0)), ("<unk>", UNKNOWN));
        assert_eq!((text(1).as_str(), kind(1)), ("<s>", CONTROL));
        assert_eq!((text(2).as_str(), kind(2)), ("</s>", CONTROL));
        assert_eq!((text(3).as_str(), kind(3)), ("<0x00>", BYTE));
        assert_eq!((text(258).as_str(), kind(258)), ("<0xFF>", BYTE));
        assert_eq!(kind(259), NORMAL);
        // The first merge ("▁ t") makes "▁t", which outranks every later join.
        let t = tokens
            .iter()
            .position(|v| v.to_string().unwrap() == "▁t")
            .unwrap();
        let best = scores
            .iter()
            .map(|s| s.to_f32().unwrap())
            .fold(f32::MIN, f32::max);
        assert_eq!(scores[t].to_f32().unwrap(), -1.0);
        assert_eq!(best, 0.0, "unmerged tokens score 0, merged ones below");
        assert_eq!(get(&md, "tokenizer.ggml.bos_token_id").to_u32().unwrap(), 1);
        assert_eq!(get(&md, "tokenizer.ggml.eos_token_id").to_u32().unwrap(), 2);
        assert_eq!(
            get(&md, "tokenizer.ggml.unknown_token_id")
                .to_u32()
                .unwrap(),
            0
        );
        assert!(get(&md, "tokenizer.ggml.add_bos_token").to_bool().unwrap());
        let map: HashMap<String, Value> = md.into_iter().collect();
        assert_eq!(embedded_tokenizer(&map), Some(llama2().as_str()));
    }

    #[test]
    fn rows_past_the_tokenizer_are_padding_and_a_larger_tokenizer_is_refused() {
        let md = tokenizer_metadata(&llama2(), 32002).unwrap();
        let tokens = get(&md, "tokenizer.ggml.tokens").to_vec().unwrap();
        assert_eq!(tokens[32001].to_string().unwrap(), "[PAD32001]");
        let err = tokenizer_metadata(&llama2(), 100).unwrap_err();
        assert!(err.contains("32000 tokens but the model only 100"), "{err}");
    }

    #[test]
    fn other_tokenizers_travel_as_json_alone() {
        let json = r#"{"model":{"type":"WordPiece","vocab":{}}}"#;
        let md = tokenizer_metadata(json, 10).unwrap();
        assert_eq!(md.len(), 1);
        assert_eq!(md[0].0, HF_JSON_KEY);
    }
}
