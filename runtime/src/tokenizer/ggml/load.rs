//! Building a [`GgmlTokenizer`] from `tokenizer.ggml.*`: llama.cpp's defaults per tokenizer
//! model, the special ids, and the texts it recognises special tokens by.

use crate::gguf::{GgufHeader, Value};

use super::super::bpe::Bpe;
use super::super::pretokenizer::pre_tokenizer_spec;
use super::super::vocab::{attr, Vocab};
use super::super::TokenizerError;
use super::{GgmlTokenizer, Model};

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

impl GgmlTokenizer {
    pub fn from_gguf(h: &GgufHeader) -> Result<Self, TokenizerError> {
        let missing = |what: String| TokenizerError::Missing(what);
        let invalid = |what: String| TokenizerError::Invalid(what);
        let text_of = |key: &str| h.get(key).and_then(Value::as_str);
        let model_name = text_of("tokenizer.ggml.model")
            .ok_or_else(|| missing("no tokenizer.ggml.model".into()))?;
        let mut pre_name = text_of("tokenizer.ggml.pre").unwrap_or("").to_string();

        let tokens = h
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| missing("no tokenizer.ggml.tokens array".into()))?;
        let n = tokens.len();
        let mut texts = Vec::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            let t = t
                .as_str()
                .ok_or_else(|| invalid("tokenizer.ggml.tokens holds a non-string".into()))?;
            texts.push(if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.to_string()
            });
        }
        let scores = match h.get("tokenizer.ggml.scores").and_then(Value::as_array) {
            None => vec![0.0; n],
            Some(s) if s.len() < n => {
                return Err(invalid(format!(
                    "tokenizer.ggml.scores has {} entries for {n} tokens",
                    s.len()
                )))
            }
            Some(s) => s[..n]
                .iter()
                .map(|v| match *v {
                    Value::F32(x) => Ok(x),
                    Value::I32(x) => Ok(x as f32),
                    _ => Err(invalid("tokenizer.ggml.scores must be f32 or i32".into())),
                })
                .collect::<Result<_, _>>()?,
        };
        let attrs = match h.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            None => vec![attr::NORMAL; n],
            Some(t) if t.len() < n => {
                return Err(invalid(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    t.len()
                )))
            }
            Some(t) => t[..n]
                .iter()
                .map(|v| match *v {
                    Value::I32(x) => Ok(attr::from_token_type(x.into())),
                    _ => Err(invalid("tokenizer.ggml.token_type must be i32".into())),
                })
                .collect::<Result<_, _>>()?,
        };
        let mut vocab = Vocab::new(texts, scores, attrs).map_err(invalid)?;

        // Per-type defaults, as llama.cpp sets them before reading the metadata.
        let mut bos: Option<u32>;
        let mut eos: Option<u32>;
        let mut add_bos;
        let mut add_eos = false;
        let mut add_space_prefix;
        let mut escape_whitespaces = true;
        let clean_spaces;
        let model = match model_name {
            "llama" => {
                bos = Some(1);
                eos = Some(2);
                add_bos = true;
                add_space_prefix = true;
                clean_spaces = false;
                Model::SentencePiece
            }
            "gpt2" | "gemma4" => {
                if model_name == "gemma4" {
                    pre_name = "gemma4".into();
                    bos = None;
                    eos = None;
                } else {
                    bos = Some(11);
                    eos = Some(11);
                }
                let spec = pre_tokenizer_spec(&pre_name).ok_or_else(|| {
                    missing(format!(
                        "its pre-tokenizer `tokenizer.ggml.pre = {pre_name}` is not one that \
                         moe-edge (or the llama.cpp it follows) knows"
                    ))
                })?;
                add_space_prefix = false;
                escape_whitespaces = spec.escape_whitespaces;
                clean_spaces = spec.clean_spaces;
                add_bos = spec.add_bos.unwrap_or(false);
                if spec.no_default_bos {
                    bos = None;
                }
                let merges: Vec<&str> = match h.get("tokenizer.ggml.merges") {
                    None if pre_name == "kimi-k2" => Vec::new(),
                    None => return Err(missing("no tokenizer.ggml.merges array".into())),
                    Some(m) => m
                        .as_array()
                        .ok_or_else(|| invalid("tokenizer.ggml.merges is not an array".into()))?
                        .iter()
                        .map(|v| {
                            v.as_str().ok_or_else(|| {
                                invalid("tokenizer.ggml.merges holds a non-string".into())
                            })
                        })
                        .collect::<Result<_, _>>()?,
                };
                Model::Bpe(Bpe::new(&vocab, merges.into_iter(), &spec)?)
            }
            "no_vocab" | "none" => {
                return Err(missing(
                    "the file has no vocabulary (tokenizer.ggml.model = none)".into(),
                ))
            }
            other => {
                let what = match other {
                    "bert" => "WordPiece (BERT)",
                    "t5" => "Unigram (T5)",
                    "rwkv" => "RWKV",
                    "plamo2" => "PLaMo-2",
                    "hybriddna" | "whitespace" | "test" => "special-purpose",
                    _ => "unknown",
                };
                return Err(missing(format!(
                    "its tokenizer model `tokenizer.ggml.model = {other}` ({what}) is not \
                     implemented by moe-edge (SentencePiece `llama`, BPE `gpt2` and `gemma4` are)"
                )));
            }
        };
        if let Some(v) = h
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(Value::as_bool)
        {
            add_space_prefix = v;
        }

        // Special token ids: defaults outside the vocabulary are dropped; metadata ids inside
        // it replace the defaults.
        let in_vocab = |id: Option<u32>| id.filter(|&i| vocab.contains(i));
        bos = in_vocab(bos);
        eos = in_vocab(eos);
        let meta_id = |key: &str| {
            h.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&i| vocab.contains(i))
        };
        bos = meta_id("tokenizer.ggml.bos_token_id").or(bos);
        eos = meta_id("tokenizer.ggml.eos_token_id").or(eos);
        let mut eot = meta_id("tokenizer.ggml.eot_token_id");
        let mut eom = meta_id("tokenizer.ggml.eom_token_id");
        // The deprecated keys are read last, so they win.
        let mut fim_pre = meta_id("tokenizer.ggml.prefix_token_id")
            .or_else(|| meta_id("tokenizer.ggml.fim_pre_token_id"));
        let mut fim_suf = meta_id("tokenizer.ggml.suffix_token_id")
            .or_else(|| meta_id("tokenizer.ggml.fim_suf_token_id"));
        let mut fim_mid = meta_id("tokenizer.ggml.middle_token_id")
            .or_else(|| meta_id("tokenizer.ggml.fim_mid_token_id"));
        let mut fim_pad = meta_id("tokenizer.ggml.fim_pad_token_id");
        let mut fim_rep = meta_id("tokenizer.ggml.fim_rep_token_id");
        let mut fim_sep = meta_id("tokenizer.ggml.fim_sep_token_id");
        let flag = |key: &str| h.get(key).and_then(Value::as_bool);
        add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos);
        add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(add_eos);
        if matches!(model, Model::Bpe(_))
            && matches!(pre_name.as_str(), "gemma4" | "granite-embed-multi-311m")
        {
            // llama.cpp's Gemma 4 workaround: always BOS.
            add_bos = true;
        }

        // Tokens recognised by their text when the metadata does not name them; llama.cpp makes
        // them control tokens (it walks a hash map; here the lowest id of several wins).
        let n_u32 = vocab.len() as u32;
        for (slot, names) in [
            (&mut eot, EOT_TEXTS),
            (&mut eom, EOM_TEXTS),
            (&mut fim_pre, FIM_PRE_TEXTS),
            (&mut fim_suf, FIM_SUF_TEXTS),
            (&mut fim_mid, FIM_MID_TEXTS),
            (&mut fim_pad, FIM_PAD_TEXTS),
            (&mut fim_rep, FIM_REP_TEXTS),
            (&mut fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_none() {
                if let Some(id) = names.iter().filter_map(|t| vocab.id(t)).min() {
                    *slot = Some(id);
                    vocab.set_attr_bits(id, attr::CONTROL, true);
                }
            }
        }

        let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        let by_text: Vec<u32> = EOG_TEXTS.iter().filter_map(|t| vocab.id(t)).collect();
        for &id in &by_text {
            vocab.set_attr_bits(id, attr::CONTROL, true);
        }
        eog.extend(by_text);
        // gpt-oss's channel tokens are always rendered.
        for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(id) = vocab.id(text) {
                vocab.set_attr(id, attr::USER_DEFINED);
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        let eog_id =
            |vocab: &Vocab, eog: &[u32], text: &str| vocab.id(text).filter(|id| eog.contains(id));
        // o200k_harmony and solar-open: `<|end|>` ends a message, not the generation.
        let has = |vocab: &Vocab, eog: &[u32], text| eog_id(vocab, eog, text).is_some();
        let call = has(&vocab, &eog, "<|call|>") || has(&vocab, &eog, "<|calls|>");
        if let Some(end) = eog_id(&vocab, &eog, "<|end|>") {
            if call && (has(&vocab, &eog, "<|return|>") || has(&vocab, &eog, "<|flush|>")) {
                eog.retain(|&id| id != end);
                vocab.set_attr(end, attr::USER_DEFINED);
            }
        }
        // Gemma 4 and PLaMo have an ordinary `</s>`.
        if let Some(s) = eog_id(&vocab, &eog, "</s>") {
            if has(&vocab, &eog, "<|tool_response>") || has(&vocab, &eog, "<|plamo:eos|>") {
                eog.retain(|&id| id != s);
                vocab.set_attr(s, attr::NORMAL);
            }
        }

        let mut special: Vec<u32> = (0..n_u32)
            .filter(|&id| vocab.has_attr(id, attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN))
            .collect();
        special.sort_by_key(|&id| std::cmp::Reverse(vocab.text(id).len()));

        // Whitespace stripping around special tokens, which llama.cpp sets by model name.
        let lower = |key: &str| text_of(key).unwrap_or("").to_lowercase();
        let (general_name, arch) = (lower("general.name"), lower("general.architecture"));
        let pre_raw = text_of("tokenizer.ggml.pre").unwrap_or("");
        let any = |s: &str, subs: &[&str]| subs.iter().any(|x| s.contains(x));
        if any(pre_raw, &["jina-v2-de", "jina-v2-es", "jina-v2-code"])
            || any(&arch, &["nomic-bert-moe", "jina-bert-v3"])
        {
            if let Some(id) = vocab.id("<mask>") {
                vocab.set_attr_bits(id, attr::LSTRIP, true);
            }
        } else if any(&general_name, &["phi-3", "phi3"]) {
            for &id in &special {
                vocab.set_attr_bits(id, attr::RSTRIP, true);
            }
            for (text, on) in [
                ("</s>", true),
                ("<unk>", false),
                ("<s>", false),
                ("<|endoftext|>", false),
            ] {
                if let Some(id) = vocab.id(text) {
                    vocab.set_attr_bits(id, attr::RSTRIP, on);
                }
            }
        } else if general_name.contains("modern-bert") {
            if let Some(id) = vocab.id("[MASK]") {
                vocab.set_attr_bits(id, attr::LSTRIP, true);
            }
        }

        Ok(Self {
            vocab,
            model,
            special,
            bos,
            eos,
            add_bos: add_bos && bos.is_some(),
            add_eos: add_eos && eos.is_some(),
            add_space_prefix,
            escape_whitespaces,
            clean_spaces,
            end_of_generation: eog,
        })
    }
}
