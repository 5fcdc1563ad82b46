//! The model's own tokenizer, set up so that text is always text: a `</s>` typed by a user is
//! encoded as the characters `<`, `/`, `s`, `>`, never as the end-of-sequence control token.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer file {0} does not exist (it must be the model's tokenizer.json)")]
    Missing(PathBuf),
    #[error("cannot load tokenizer {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the tokenizer has no `{0}` token")]
    MissingSpecial(&'static str),
    #[error("tokenizer failed: {0}")]
    Encode(String),
}

/// A token id and the byte range (start, end) of the text it covers.
pub type TokenSpan = (u32, (usize, usize));

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    /// Tokens a lone "\n" costs when encoded on its own, beyond the one it costs in context
    /// (the normalizer's leading `▁`).
    newline_overhead: usize,
    fingerprint: u64,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        if !path.exists() {
            return Err(TokenizerError::Missing(path.to_path_buf()));
        }
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            TokenizerError::Encode(message) => TokenizerError::Invalid {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        inner.set_encode_special_tokens(true);
        let bos = inner
            .token_to_id("<s>")
            .ok_or(TokenizerError::MissingSpecial("<s>"))?;
        let eos = inner
            .token_to_id("</s>")
            .ok_or(TokenizerError::MissingSpecial("</s>"))?;
        let mut tok = TextTokenizer {
            inner,
            bos,
            eos,
            newline_overhead: 0,
            fingerprint: fnv1a(FNV_OFFSET, bytes),
        };
        tok.newline_overhead = tok.encode("\n", false)?.len().saturating_sub(1);
        Ok(tok)
    }

    /// Encodes text as plain text; `bos` puts the beginning-of-sequence id first.
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if bos {
            ids.push(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids and the byte offsets (start, end) in `text` each one covers.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Vec<TokenSpan>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc
            .get_ids()
            .iter()
            .copied()
            .zip(enc.get_offsets().iter().copied())
            .collect())
    }

    /// How many tokens `text`, which starts with "\n", costs when it follows other text in one
    /// prompt. Encoding it alone would add the normalizer's leading `▁`; a newline is always its
    /// own byte token, so that extra piece is exactly the difference.
    pub fn count_continuation(&self, text: &str) -> Result<usize, TokenizerError> {
        debug_assert!(text.starts_with('\n'));
        Ok(self.encode(text, false)?.len() - self.newline_overhead)
    }

    pub fn count(&self, text: &str) -> Result<usize, TokenizerError> {
        Ok(self.encode(text, false)?.len())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Identifies this tokenizer, so cached counts from another one are never trusted.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// A key for a cached count of `text` under this tokenizer.
    pub fn count_key(&self, text: &str) -> i64 {
        fnv1a(self.fingerprint, text.as_bytes()) as i64
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::sync::{Arc, OnceLock};

    pub fn fixture_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer/tokenizer.json")
    }

    /// The real Llama-2 tokenizer, loaded once per test binary.
    pub fn llama2() -> Arc<TextTokenizer> {
        static TOK: OnceLock<Arc<TextTokenizer>> = OnceLock::new();
        TOK.get_or_init(|| Arc::new(TextTokenizer::from_file(&fixture_path()).unwrap()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::llama2;
    use super::*;

    #[test]
    fn known_ids() {
        let t = llama2();
        assert_eq!(t.encode("Hello world", true).unwrap(), vec![1, 15043, 3186]);
        assert_eq!((t.bos(), t.eos()), (1, 2));
        assert_eq!(t.vocab_size(), 32000);
    }

    #[test]
    fn special_token_text_is_plain_text() {
        let t = llama2();
        let ids = t.encode("</s> <s> <unk>", true).unwrap();
        assert_eq!(ids[0], 1, "BOS first");
        assert!(
            !ids[1..].iter().any(|&id| id <= 2),
            "no control ids in {ids:?}"
        );
        assert_eq!(t.decode(&ids).unwrap(), "</s> <s> <unk>");
    }

    #[test]
    fn continuation_counts_add_up() {
        let t = llama2();
        let pieces = [
            "SYSTEM: be kind",
            "\nUSER: hi there",
            "\nASSISTANT: héllo 👋",
            "\n\nUSER:  spaced",
            "\nASSISTANT:",
        ];
        let whole: String = pieces.concat();
        let sum = t.count(pieces[0]).unwrap()
            + pieces[1..]
                .iter()
                .map(|p| t.count_continuation(p).unwrap())
                .sum::<usize>();
        assert_eq!(sum, t.count(&whole).unwrap());
    }

    #[test]
    fn missing_file_is_named() {
        let err = TextTokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
    }
}
