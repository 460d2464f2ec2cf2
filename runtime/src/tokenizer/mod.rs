//! Text <-> token ids, from the tokenizer embedded in the GGUF file.
//!
//! moe-convert embeds the Hugging Face `tokenizer.json` verbatim (`tokenizer.huggingface.json`),
//! so encoding runs the same normaliser, pre-tokenizer and post-processor (BOS insertion) as
//! transformers' `tokenizer(text)`. Files from other converters (such as llama.cpp's) carry only
//! `tokenizer.ggml.*`; for byte-level BPE vocabularies the same tokenizer is rebuilt from the
//! tokens, merges and llama.cpp's pre-tokenizer regexes.

use crate::gguf::GgufHeader;

mod ggml;
mod stream;

use ggml::rebuild_bpe_json;
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

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS ourselves (rebuilt tokenizers have no post-processor).
    prepend_bos: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    end_of_generation: Vec<u32>,
}

impl Tokenizer {
    pub fn from_gguf(h: &GgufHeader) -> Result<Self, TokenizerError> {
        let id = |key: &str| {
            h.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let (json, prepend_bos) = match h.get("tokenizer.huggingface.json").and_then(|v| v.as_str())
        {
            Some(json) => (json.to_string(), false),
            None => {
                let add_bos = h
                    .get("tokenizer.ggml.add_bos_token")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                (rebuild_bpe_json(h)?, add_bos && bos.is_some())
            }
        };
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut end_of_generation: Vec<u32> = [
            eos,
            id("tokenizer.ggml.eot_token_id"),
            id("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        for text in END_OF_TURN_TEXTS {
            if let Some(t) = inner
                .get_added_vocabulary()
                .token_to_id(text, inner.get_model())
            {
                end_of_generation.push(t);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(Self {
            inner,
            prepend_bos,
            bos,
            eos,
            end_of_generation,
        })
    }

    /// Encodes like transformers' `tokenizer(text)`: special tokens (such as BOS) are added
    /// when `add_special` and the tokenizer's post-processor says so.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.prepend_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
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
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
