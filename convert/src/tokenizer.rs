//! Tokenizer metadata: llama.cpp's `tokenizer.ggml.*` keys, the chat template, and the verbatim
//! `tokenizer.json` (which moe-edge's runtime uses, so encoding matches transformers exactly).
//! Byte-level BPE vocabularies are written as llama.cpp's `gpt2` model from `tokenizer.json`;
//! SentencePiece ones (a BPE with byte fallback, beside `tokenizer.model`) as its `llama` model
//! from `tokenizer.model`, as llama.cpp's converter reads them.

use std::collections::HashMap;

use moe_runtime::gguf::Value;
use serde_json::Value as Json;

use crate::arch::ArchConverter;
use crate::error::ConvertError;
use crate::hf::Checkpoint;
use crate::sentencepiece;

const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Pre-tokenizer names llama.cpp knows, recognised from the split regex of tokenizer.json.
const KNOWN_PRE_REGEXES: &[(&str, &str)] = &[
    (
        "qwen2",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "llama-bpe",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    // Qwen3.5's (letters with their combining marks): llama-vocab.cpp's "original regex from
    // tokenizer.json" for LLAMA_VOCAB_PRE_TYPE_QWEN35.
    (
        "qwen35",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
];

pub fn metadata(
    ckpt: &Checkpoint,
    n_vocab: usize,
    conv: &dyn ArchConverter,
) -> Result<Vec<(String, Value)>, ConvertError> {
    let Some(tok_text) = ckpt.read_text("tokenizer.json")? else {
        return Err(ConvertError::Input(format!(
            "{} has no tokenizer.json; moe-convert needs the fast tokenizer file",
            ckpt.dir.display()
        )));
    };
    let tok: Json = serde_json::from_str(&tok_text)
        .map_err(|e| ConvertError::Input(format!("tokenizer.json: invalid JSON: {e}")))?;
    // Embedded verbatim, it must be a file the runtime's tokenizer reads (a missing field the
    // lookups below do without, such as an added token's `special`, made a file that converted
    // and then did not load; found by the convert fuzz target).
    moe_runtime::tokenizer::Tokenizer::check_huggingface_json(&tok_text)
        .map_err(|e| bad(&e.to_string()))?;
    let tok_cfg = ckpt
        .read_json("tokenizer_config.json")?
        .unwrap_or(Json::Null);
    let gen_cfg = ckpt
        .read_json("generation_config.json")?
        .unwrap_or(Json::Null);

    let model = tok.get("model").ok_or_else(|| bad("no `model` section"))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(ConvertError::Unsupported(format!(
            "tokenizer.json model type {:?}: only BPE tokenizers are supported",
            model.get("type")
        )));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("BPE model has no vocab"))?;

    // Token strings and types by id; ids the tokenizer does not define are padding.
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n_vocab];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<(), ConvertError> {
        let id = id as usize;
        if id >= n_vocab {
            return Err(ConvertError::Input(format!(
                "tokenizer token `{text}` has id {id}, outside the model's vocab_size {n_vocab}"
            )));
        }
        tokens[id] = Some((text.to_string(), ty));
        Ok(())
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("vocab id is not an integer"))?;
        place(id, text, TOKEN_NORMAL)?;
    }
    let mut by_content: HashMap<String, u32> = vocab
        .iter()
        .filter_map(|(t, id)| id.as_u64().map(|i| (t.clone(), i as u32)))
        .collect();
    for added in tok
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            added.get("id").and_then(Json::as_u64),
            added.get("content").and_then(Json::as_str),
        ) else {
            return Err(bad("added token without id or content"));
        };
        let special = added
            .get("special")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        place(
            id,
            content,
            if special {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            },
        )?;
        by_content.insert(content.to_string(), id as u32);
    }
    let (texts, types): (Vec<String>, Vec<i32>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED)))
        .unzip();

    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("BPE model has no merges"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                match (part(&pair[0]), part(&pair[1])) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => Err(bad("merge entry is not a pair of strings")),
                }
            }
            _ => Err(bad("merge entry is neither a string nor a pair")),
        })
        .collect::<Result<_, _>>()?;

    let byte_level = json_mentions_type(&tok["pre_tokenizer"], "ByteLevel")
        || json_mentions_type(&tok["decoder"], "ByteLevel");
    let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
    let mut meta: Vec<(String, Value)> = if byte_level {
        vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            (
                "tokenizer.ggml.pre".into(),
                Value::String(conv.tokenizer_pre(pre_name(&tok)).into()),
            ),
            ("tokenizer.ggml.tokens".into(), Value::string_array(texts)),
            ("tokenizer.ggml.token_type".into(), Value::i32_array(types)),
            ("tokenizer.ggml.merges".into(), Value::string_array(merges)),
        ]
    } else if byte_fallback && ckpt.dir.join("tokenizer.model").is_file() {
        let spm = sentencepiece::read(ckpt, n_vocab)?;
        let mut m = vec![
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            ("tokenizer.ggml.pre".into(), Value::String("default".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::string_array(spm.tokens),
            ),
            ("tokenizer.ggml.scores".into(), Value::f32_array(spm.scores)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::i32_array(spm.types),
            ),
        ];
        // llama.cpp's ERNIE converter copies it; SentencePiece otherwise prepends a space.
        if let Some(b) = tok_cfg.get("add_prefix_space").and_then(Json::as_bool) {
            m.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(b)));
        }
        m
    } else if byte_fallback {
        return Err(ConvertError::Input(format!(
            "{} has a SentencePiece-style tokenizer.json but no tokenizer.model, which holds the \
             vocabulary scores llama.cpp's `llama` tokenizer needs: copy tokenizer.model from the \
             model's repository into the folder",
            ckpt.dir.display()
        )));
    } else {
        return Err(ConvertError::Unsupported(
            "only byte-level BPE (GPT-2 style) and SentencePiece BPE (byte fallback, with \
             tokenizer.model) tokenizers are supported"
                .into(),
        ));
    };

    // Special tokens: tokenizer_config's strings first, then config.json / generation_config ids.
    let id_of = |key: &str| -> Option<u32> {
        let v = tok_cfg.get(key)?;
        let content = v
            .as_str()
            .or_else(|| v.get("content").and_then(Json::as_str))?;
        by_content.get(content).copied()
    };
    let cfg_id = |json: &Json, key: &str| -> Vec<u32> {
        match json.get(key) {
            Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Json::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => Vec::new(),
        }
    };
    let config = &ckpt.config.json;
    let bos = id_of("bos_token")
        .or_else(|| cfg_id(&gen_cfg, "bos_token_id").first().copied())
        .or_else(|| cfg_id(config, "bos_token_id").first().copied());
    let mut eos_list = Vec::new();
    eos_list.extend(id_of("eos_token"));
    eos_list.extend(cfg_id(&gen_cfg, "eos_token_id"));
    eos_list.extend(cfg_id(config, "eos_token_id"));
    let mut eos_unique = Vec::new();
    for e in eos_list {
        if !eos_unique.contains(&e) && (e as usize) < n_vocab {
            eos_unique.push(e);
        }
    }
    if let Some(b) = bos.filter(|&b| (b as usize) < n_vocab) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = eos_unique.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    // GGUF has no list of end tokens; llama.cpp's convention for a second one is the EOT id.
    if let Some(&e) = eos_unique.get(1) {
        meta.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(e)));
    }
    for (key, gguf) in [
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        // gguf-py's SpecialVocab also reads these (ERNIE's <|end_of_sentence|>, <mask:1>); the
        // key's spelling is llama.cpp's.
        ("sep_token", "tokenizer.ggml.seperator_token_id"),
        ("mask_token", "tokenizer.ggml.mask_token_id"),
    ] {
        if let Some(id) = id_of(key) {
            meta.push((gguf.into(), Value::U32(id)));
        }
    }
    for (name, text) in conv.special_tokens() {
        if let Some(&id) = by_content.get(*text) {
            let key = format!("tokenizer.ggml.{name}_token_id");
            meta.retain(|(k, _)| *k != key);
            meta.push((key, Value::U32(id)));
        }
    }
    let adds_bos = tok_cfg
        .get("add_bos_token")
        .and_then(Json::as_bool)
        .unwrap_or_else(|| post_processor_adds_bos(&tok, bos, &texts_lookup(&by_content)));
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    meta.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(
            tok_cfg
                .get("add_eos_token")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        ),
    ));

    if let Some(template) = chat_template(ckpt, &tok_cfg)? {
        meta.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    for (key, gguf) in [
        ("temperature", "general.sampling.temp"),
        ("top_p", "general.sampling.top_p"),
    ] {
        if let Some(v) = gen_cfg.get(key).and_then(Json::as_f64) {
            meta.push((gguf.into(), Value::F32(v as f32)));
        }
    }
    if let Some(v) = gen_cfg.get("top_k").and_then(Json::as_i64) {
        meta.push(("general.sampling.top_k".into(), Value::I32(v as i32)));
    }
    meta.push(("tokenizer.huggingface.json".into(), Value::String(tok_text)));
    Ok(meta)
}

fn bad(why: &str) -> ConvertError {
    ConvertError::Input(format!("tokenizer.json: {why}"))
}

fn texts_lookup(by_content: &HashMap<String, u32>) -> HashMap<u32, String> {
    by_content.iter().map(|(k, v)| (*v, k.clone())).collect()
}

/// True when a TemplateProcessing post-processor puts the BOS token before the sequence.
fn post_processor_adds_bos(tok: &Json, bos: Option<u32>, texts: &HashMap<u32, String>) -> bool {
    let Some(bos_text) = bos.and_then(|b| texts.get(&b)) else {
        return false;
    };
    let single = &tok["post_processor"]["single"];
    single
        .as_array()
        .and_then(|items| items.first())
        .and_then(|first| first.get("SpecialToken"))
        .and_then(|s| s.get("id"))
        .and_then(Json::as_str)
        .is_some_and(|id| id == bos_text)
}

fn json_mentions_type(v: &Json, ty: &str) -> bool {
    match v {
        Json::Object(m) => {
            m.get("type").and_then(Json::as_str) == Some(ty)
                || m.values().any(|x| json_mentions_type(x, ty))
        }
        Json::Array(a) => a.iter().any(|x| json_mentions_type(x, ty)),
        _ => false,
    }
}

/// llama.cpp identifies pre-tokenizers by name; recognise the common regexes, otherwise the
/// GPT-2 one (a plain ByteLevel pre-tokenizer) or llama.cpp's generic default.
fn pre_name(tok: &Json) -> &'static str {
    let text = tok["pre_tokenizer"].to_string();
    for (name, regex) in KNOWN_PRE_REGEXES {
        if text.contains(&Json::String(regex.to_string()).to_string()) {
            return name;
        }
    }
    let pre = &tok["pre_tokenizer"];
    if pre.get("type").and_then(Json::as_str) == Some("ByteLevel")
        && pre.get("use_regex").and_then(Json::as_bool).unwrap_or(true)
    {
        return "gpt-2";
    }
    "default"
}

/// `chat_template` from tokenizer_config.json (a string, or a list of named templates of which
/// the default is taken), else `chat_template.jinja`.
fn chat_template(ckpt: &Checkpoint, tok_cfg: &Json) -> Result<Option<String>, ConvertError> {
    match tok_cfg.get("chat_template") {
        Some(Json::String(s)) => return Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| list.first());
            if let Some(t) = pick.and_then(|t| t.get("template")).and_then(Json::as_str) {
                return Ok(Some(t.to_string()));
            }
        }
        _ => {}
    }
    ckpt.read_text("chat_template.jinja")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer.json's pre-tokenizer as transformers writes it: the split regex, then the
    /// byte-level mapping.
    fn with_regex(regex: &str) -> Json {
        serde_json::json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]}})
    }

    #[test]
    fn pre_tokenizers_are_named_as_llama_cpp_names_them() {
        for (name, regex) in KNOWN_PRE_REGEXES {
            assert_eq!(pre_name(&with_regex(regex)), *name);
        }
        // Qwen3.5's regex differs from Qwen2's by the combining marks only.
        let qwen35 = KNOWN_PRE_REGEXES
            .iter()
            .find(|(n, _)| *n == "qwen35")
            .unwrap();
        assert!(qwen35.1.contains(r"[\p{L}\p{M}]+"));
        assert_eq!(pre_name(&with_regex(r"\p{N}+")), "default");
    }
}
