//! Text <-> token ids, from the tokenizer embedded in the GGUF file.
//!
//! moe-convert embeds the Hugging Face `tokenizer.json` verbatim (`tokenizer.huggingface.json`),
//! so encoding runs the same normaliser, pre-tokenizer and post-processor (BOS insertion) as
//! transformers' `tokenizer(text)`. Files from other converters (such as llama.cpp's) carry only
//! `tokenizer.ggml.*`; those are tokenized as llama.cpp tokenizes them ([`GgmlTokenizer`]).

use crate::gguf::GgufHeader;

mod bpe;
mod bytes;
mod ggml;
mod pretokenizer;
mod spm;
mod stream;
mod vocab;

pub use ggml::GgmlTokenizer;
pub use stream::Detokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model file has no usable tokenizer: {0}")]
    Missing(String),
    #[error("the embedded tokenizer is invalid: {0}")]
    Invalid(String),
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

/// Control tokens that end a turn in common chat formats; llama.cpp treats them as end of
/// generation too.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<|end_of_text|>",
    "</s>",
    "<end_of_turn>",
];

enum Backend {
    /// The embedded `tokenizer.huggingface.json`.
    HuggingFace(Box<tokenizers::Tokenizer>),
    /// `tokenizer.ggml.*` only.
    Ggml(Box<GgmlTokenizer>),
}

pub struct Tokenizer {
    backend: Backend,
    /// How the embedded vocabulary spells bytes (unused for `tokenizer.ggml.*` files).
    spelling: bytes::Spelling,
    /// The embedded vocabulary's added tokens, by id, and whether each is special.
    added: Vec<(u32, bool)>,
    bos: Option<u32>,
    eos: Option<u32>,
    end_of_generation: Vec<u32>,
}

impl Tokenizer {
    /// Whether a Hugging Face `tokenizer.json` is one [`from_gguf`](Self::from_gguf) reads once
    /// embedded (`tokenizer.huggingface.json`): moe-convert checks it before writing a file.
    pub fn check_huggingface_json(json: &str) -> Result<(), TokenizerError> {
        tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map(drop)
            .map_err(|e| TokenizerError::Invalid(e.to_string()))
    }

    pub fn from_gguf(h: &GgufHeader) -> Result<Self, TokenizerError> {
        let id = |key: &str| {
            h.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let Some(json) = h.get("tokenizer.huggingface.json").and_then(|v| v.as_str()) else {
            let ggml = GgmlTokenizer::from_gguf(h)?;
            return Ok(Self {
                spelling: bytes::Spelling::Plain,
                added: Vec::new(),
                bos: ggml.bos(),
                eos: ggml.eos(),
                end_of_generation: ggml.end_of_generation().to_vec(),
                backend: Backend::Ggml(Box::new(ggml)),
            });
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        let spelling = serde_json::from_str::<serde_json::Value>(json)
            .map(|doc| bytes::Spelling::of_decoder(&doc["decoder"]))
            .unwrap_or(bytes::Spelling::Plain);
        let mut added: Vec<(u32, bool)> = inner
            .get_added_tokens_decoder()
            .iter()
            .map(|(&id, t)| (id, t.special))
            .collect();
        added.sort_unstable();
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut end_of_generation: Vec<u32> = [
            eos,
            id("tokenizer.ggml.eot_token_id"),
            id("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let added_id = |text: &str| {
            inner
                .get_added_vocabulary()
                .token_to_id(text, inner.get_model())
        };
        end_of_generation.extend(END_OF_TURN_TEXTS.iter().filter_map(|t| added_id(t)));
        // gpt-oss's o200k_harmony, as llama.cpp treats it: `<|end|>` closes a message (the
        // reasoning, before the answer), `<|return|>` and `<|call|>` end the generation.
        if let (Some(ret), Some(call)) = (added_id("<|return|>"), added_id("<|call|>")) {
            end_of_generation.extend([ret, call]);
            if let Some(end) = added_id("<|end|>") {
                end_of_generation.retain(|&t| t != end);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(Self {
            backend: Backend::HuggingFace(Box::new(inner)),
            spelling,
            added,
            bos,
            eos,
            end_of_generation,
        })
    }

    /// Encodes like transformers' `tokenizer(text)`: special tokens (such as BOS) are added
    /// when `add_special` and the tokenizer says so, and special tokens written in the text are
    /// recognised.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::HuggingFace(inner) => inner
                .encode(text, add_special)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
            Backend::Ggml(ggml) => ggml.encode(text, add_special, true),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        match &self.backend {
            Backend::HuggingFace(inner) => inner
                .decode(ids, skip_special)
                .map_err(|e| TokenizerError::Encode(e.to_string())),
            Backend::Ggml(ggml) => ggml.decode(ids, skip_special, !skip_special),
        }
    }

    /// Incremental decoder that yields text only once it forms whole UTF-8 characters.
    pub fn stream(&self, skip_special: bool) -> Detokenizer<'_> {
        Detokenizer::new(self, skip_special)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::HuggingFace(inner) => inner.get_vocab_size(true),
            Backend::Ggml(ggml) => ggml.vocab_size(),
        }
    }

    /// The token's string in the vocabulary (such as `<|im_end|>`, or `Ġthe`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::HuggingFace(inner) => inner.id_to_token(id),
            Backend::Ggml(ggml) => ggml.token_text(id).map(str::to_string),
        }
    }

    /// The bytes token `id` stands for in text (an added or special token: its text); None
    /// outside the vocabulary. Concatenated, they are a sequence's text before any decoder
    /// clean-up (a SentencePiece vocabulary's leading space included).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match &self.backend {
            Backend::HuggingFace(inner) => {
                let token = inner.id_to_token(id)?;
                if self.added(id).is_some() {
                    return Some(token.into_bytes());
                }
                Some(self.spelling.bytes(&token))
            }
            Backend::Ggml(ggml) => ggml.token_to_piece(id, true).ok(),
        }
    }

    /// Whether `id` is a special (control) token rather than text, such as `<|im_end|>`.
    pub fn is_special(&self, id: u32) -> bool {
        match &self.backend {
            Backend::HuggingFace(_) => self.added(id) == Some(true),
            Backend::Ggml(ggml) => ggml.is_control(id),
        }
    }

    /// Whether `id` is an added token of the embedded vocabulary, and if so whether special.
    fn added(&self, id: u32) -> Option<bool> {
        let i = self.added.binary_search_by_key(&id, |&(a, _)| a).ok()?;
        Some(self.added[i].1)
    }

    /// The embedded Hugging Face tokenizer, when the file has one.
    pub fn huggingface(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.backend {
            Backend::HuggingFace(inner) => Some(inner),
            Backend::Ggml(_) => None,
        }
    }

    /// The llama.cpp-style tokenizer, when the file has only `tokenizer.ggml.*`.
    pub fn ggml(&self) -> Option<&GgmlTokenizer> {
        match &self.backend {
            Backend::HuggingFace(_) => None,
            Backend::Ggml(ggml) => Some(ggml),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, Value};

    /// A file carrying only an embedded tokenizer.json with these added special tokens.
    fn tokenizer_with(specials: &[&str]) -> Tokenizer {
        let added: Vec<serde_json::Value> = specials
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({"id": i + 2, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let mut vocab = serde_json::json!({"a": 0, "b": 1});
        for (i, t) in specials.iter().enumerate() {
            vocab[*t] = (i + 2).into();
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "vocab": vocab, "merges": []}
        });
        let meta = vec![(
            "tokenizer.huggingface.json".to_string(),
            Value::String(json.to_string()),
        )];
        let bytes = GgufWriter::begin(Vec::new(), &meta, Vec::new(), 32)
            .unwrap()
            .finish()
            .unwrap();
        Tokenizer::from_gguf(&crate::gguf::GgufHeader::parse(&bytes).unwrap()).unwrap()
    }

    /// gpt-oss's `<|end|>` closes the reasoning message, not the reply: with `<|return|>` and
    /// `<|call|>` in the vocabulary those end the generation instead (as in llama.cpp).
    #[test]
    fn harmony_ends_at_return_and_call_not_end() {
        let t = tokenizer_with(&["<|end|>", "<|return|>", "<|call|>"]);
        let id = |s| t.huggingface().unwrap().token_to_id(s).unwrap();
        assert!(!t.is_end_of_generation(id("<|end|>")));
        assert!(t.is_end_of_generation(id("<|return|>")));
        assert!(t.is_end_of_generation(id("<|call|>")));
        // Elsewhere (Phi-3's chat format) `<|end|>` ends the turn.
        let t = tokenizer_with(&["<|end|>"]);
        let end = t.huggingface().unwrap().token_to_id("<|end|>").unwrap();
        assert!(t.is_end_of_generation(end));
    }
}
