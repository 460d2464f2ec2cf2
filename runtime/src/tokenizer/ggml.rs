//! Tokenizers rebuilt from llama.cpp's `tokenizer.ggml.*` metadata, for files that carry no
//! embedded `tokenizer.huggingface.json`.

use crate::gguf::GgufHeader;

use super::TokenizerError;

/// llama.cpp's pre-tokenizer regexes (`llm_tokenizer_bpe`), by `tokenizer.ggml.pre` name.
fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    Some(match pre {
        "gpt-2" | "gpt2" | "olmo" | "mpt" | "jais" => &[GPT2],
        "qwen2" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "llama-bpe" | "llama3" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "refact" | "starcoder" => &[r"\p{N}", GPT2],
        "default" => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
        _ => return None,
    })
}

/// A Hugging Face tokenizer.json equivalent to the byte-level BPE described by `tokenizer.ggml.*`.
pub(super) fn rebuild_bpe_json(h: &GgufHeader) -> Result<String, TokenizerError> {
    use serde_json::json;
    let model = h.get("tokenizer.ggml.model").and_then(|v| v.as_str());
    if model != Some("gpt2") {
        return Err(TokenizerError::Missing(format!(
            "tokenizer model {model:?} without an embedded tokenizer.huggingface.json is not \
             supported yet (only byte-level BPE, `gpt2`); pass token ids with --tokens"
        )));
    }
    let strings = |key: &str| -> Result<Vec<&str>, TokenizerError> {
        h.get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| TokenizerError::Missing(format!("no `{key}` array")))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| TokenizerError::Invalid(format!("`{key}` holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = h
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect())
        .unwrap_or_default();
    let pre = h
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let regexes = pre_tokenizer_regexes(pre).ok_or_else(|| {
        TokenizerError::Missing(format!("pre-tokenizer `{pre}` is not known to moe-edge"))
    })?;
    const CONTROL: i64 = 3;
    const USER_DEFINED: i64 = 4;
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == USER_DEFINED, "special": ty == CONTROL,
            }));
        }
        vocab.insert(text.to_string(), json!(id));
    }
    let mut pretokenizers: Vec<serde_json::Value> = regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    pretokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    Ok(doc.to_string())
}
