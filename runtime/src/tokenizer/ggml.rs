//! The tokenizer of a GGUF file that carries only llama.cpp's `tokenizer.ggml.*` metadata (no
//! embedded `tokenizer.huggingface.json`), implemented as llama.cpp implements it
//! (`src/llama-vocab.cpp`): loading and defaults (`llama_vocab::impl::load`), special-token
//! splitting (`tokenizer_st_partition`), SentencePiece and BPE tokenization, and decoding
//! (`token_to_piece`, `detokenize`).
//!
//! Natively rather than through the `tokenizers` crate: llama.cpp's rules are not all expressible
//! as a Hugging Face tokenizer.json (SentencePiece merges by token score rather than by a merge
//! list; user-defined tokens are split out even when special tokens are not parsed; per-token
//! left/right whitespace stripping chosen by model name; byte fallback that silently drops what
//! it cannot spell; the decoder's leading-space and clean-up rules), and a port is exact by
//! construction where a translation would only be equal case by case.

use crate::gguf::{GgufHeader, Value};

use super::bpe::Bpe;
use super::pretokenizer::{char_to_byte, pre_tokenizer_spec};
use super::vocab::{attr, Vocab};
use super::{spm, TokenizerError};

enum Model {
    /// `tokenizer.ggml.model = llama`.
    SentencePiece,
    /// `gpt2` and `gemma4`.
    Bpe(Bpe),
}

/// A tokenizer built from `tokenizer.ggml.*`.
pub struct GgmlTokenizer {
    vocab: Vocab,
    model: Model,
    /// Tokens split out of the text before tokenizing: control, user-defined and unknown ones,
    /// longest first.
    special: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    escape_whitespaces: bool,
    clean_spaces: bool,
    /// Sorted ids that end generation (llama.cpp's `special_eog_ids`).
    end_of_generation: Vec<u32>,
}

enum Fragment {
    Text(std::ops::Range<usize>),
    Token(u32),
}

/// C's `isspace` in the "C" locale, which llama.cpp's strip attributes use.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// The texts llama.cpp recognises as end-of-turn, end-of-message and fill-in-the-middle tokens
/// when the metadata does not name them.
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

    /// llama.cpp's `tokenize(text, add_special, parse_special)`: `add_special` adds BOS/EOS as
    /// the vocabulary asks; `parse_special` turns the text of control tokens into those tokens
    /// (user-defined tokens always are).
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            Model::SentencePiece => {
                // A space goes before the first text and before text that follows a special
                // token, as SentencePiece's own prefix would.
                let mut prev_special = true;
                let mut piece = String::new();
                for f in fragments {
                    match f {
                        Fragment::Text(r) => {
                            piece.clear();
                            if self.add_space_prefix && prev_special {
                                piece.push(' ');
                            }
                            piece.push_str(&text[r]);
                            let piece = piece.replace(' ', "\u{2581}");
                            spm::tokenize(&self.vocab, &piece, &mut out)?;
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for f in fragments {
                    match f {
                        Fragment::Text(r) if self.escape_whitespaces => {
                            let piece = text[r].replace(' ', "\u{2581}");
                            bpe.tokenize(&self.vocab, &piece, &mut out)?;
                        }
                        Fragment::Text(r) => bpe.tokenize(&self.vocab, &text[r], &mut out)?,
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// llama.cpp's `tokenizer_st_partition`: cuts the text around the special tokens, longest
    /// first, leftmost occurrences first.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut fragments = if text.is_empty() {
            Vec::new()
        } else {
            vec![Fragment::Text(0..text.len())]
        };
        let bytes = text.as_bytes();
        for &id in &self.special {
            let a = self.vocab.attr(id);
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = self.vocab.text(id);
            if !fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(r) if text[r.clone()].contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(mut r) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = text[r.clone()].find(needle) {
                    let (start, end) = (r.start + at, r.start + at + needle.len());
                    let mut left_end = start;
                    if a & attr::LSTRIP != 0 {
                        while left_end > r.start && c_isspace(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > r.start {
                        next.push(Fragment::Text(r.start..left_end));
                    }
                    next.push(Fragment::Token(id));
                    let mut right_start = end;
                    if a & attr::RSTRIP != 0 {
                        while right_start < r.end && c_isspace(bytes[right_start]) {
                            right_start += 1;
                        }
                    }
                    r = right_start..r.end;
                }
                if !r.is_empty() {
                    next.push(Fragment::Text(r));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// llama.cpp's `token_to_piece`: the bytes a token stands for. Control and unknown tokens
    /// are empty unless `special`.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Result<Vec<u8>, TokenizerError> {
        if !self.vocab.contains(id) {
            return Err(TokenizerError::Encode(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.vocab.len()
            )));
        }
        let a = self.vocab.attr(id);
        let text = self.vocab.text(id);
        if a & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return Ok(if special {
                text.as_bytes().to_vec()
            } else {
                Vec::new()
            });
        }
        if a & attr::USER_DEFINED != 0 {
            return Ok(text.as_bytes().to_vec());
        }
        if a & attr::NORMAL != 0 {
            let raw_utf8 = match &self.model {
                Model::SentencePiece => true,
                Model::Bpe(_) => self.escape_whitespaces,
            };
            return Ok(if raw_utf8 {
                text.replace('\u{2581}', " ").into_bytes()
            } else {
                decode_byte_level(text)
            });
        }
        if a & attr::BYTE != 0 {
            // `<0xXX>`; llama.cpp reads the two hex digits with strtol, 0 when they are not.
            let b = text
                .get(3..5)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
            return Ok(vec![b]);
        }
        Ok(Vec::new())
    }

    /// llama.cpp's `detokenize(tokens, remove_special, unparse_special)`, as lossy UTF-8.
    pub fn decode(
        &self,
        ids: &[u32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<String, TokenizerError> {
        let mut ids = ids;
        let mut remove_space = self.add_space_prefix;
        if remove_special && self.add_bos && ids.first().is_some_and(|&t| Some(t) == self.bos) {
            remove_space = false;
            ids = &ids[1..];
        }
        if remove_special && self.add_eos && ids.last().is_some_and(|&t| Some(t) == self.eos) {
            ids = &ids[..ids.len() - 1];
        }
        let mut out = Vec::new();
        for &id in ids {
            let piece = self.token_to_piece(id, unparse_special)?;
            let skip = usize::from(remove_space && piece.first() == Some(&b' '));
            out.extend_from_slice(&piece[skip..]);
            remove_space = false;
        }
        if self.clean_spaces {
            clean_up_spaces(&mut out);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Sorted ids that end generation.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The token's text as the vocabulary spells it (`Ġ`, `▁`, `<0x0A>` and all).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.contains(id).then(|| self.vocab.text(id))
    }
}

/// llama.cpp's `llama_decode_text`: GPT-2 byte-level characters back to bytes.
fn decode_byte_level(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// llama.cpp's `clean_spaces` passes (transformers' `clean_up_tokenization`), in place and byte
/// for byte as llama.cpp does them.
fn clean_up_spaces(t: &mut Vec<u8>) {
    // " ?", " !", " .", " ,"
    let n = t.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }
    // " ' " -> "'"
    let n = total;
    total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = t[i];
        if x == b'\'' && i + 1 < n && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }
    // " 's", " 'm", " 're", " 've"
    let n = total;
    total = usize::from(n > 0);
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = t[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if i + 2 < n {
                let x2 = t[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    /// A vocabulary-only header with these `tokenizer.ggml.*` entries.
    fn header(model: &str, pre: Option<&str>) -> GgufHeader {
        header_with(model, pre, Vec::new())
    }

    fn header_with(model: &str, pre: Option<&str>, extra: Vec<(String, Value)>) -> GgufHeader {
        let mut meta = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String(model.into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::string_array(["a", "b", "ab"]),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                Value::string_array(["a b"]),
            ),
        ];
        if let Some(pre) = pre {
            meta.push(("tokenizer.ggml.pre".to_string(), Value::String(pre.into())));
        }
        meta.extend(extra);
        let bytes = GgufWriter::begin(Vec::new(), &meta, Vec::new(), 32)
            .unwrap()
            .finish()
            .unwrap();
        GgufHeader::parse(&bytes).unwrap()
    }

    fn error(model: &str, pre: Option<&str>) -> String {
        match GgmlTokenizer::from_gguf(&header(model, pre)) {
            Ok(_) => panic!("{model} {pre:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn add_bos_and_add_eos_are_honoured() {
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let h = header_with(
            "gpt2",
            Some("llama-bpe"),
            vec![
                (key("bos_token_id"), Value::U32(0)),
                (key("eos_token_id"), Value::U32(1)),
                (key("add_bos_token"), Value::Bool(false)),
                (key("add_eos_token"), Value::Bool(true)),
            ],
        );
        let tok = GgmlTokenizer::from_gguf(&h).unwrap();
        assert_eq!(tok.encode("ab", true, false).unwrap(), [2, 1]);
        assert_eq!(tok.encode("ab", false, false).unwrap(), [2]);
        // Without the keys, llama.cpp's default for llama3-style vocabularies: BOS, no EOS.
        let h = header_with(
            "gpt2",
            Some("llama-bpe"),
            vec![(key("bos_token_id"), Value::U32(0))],
        );
        let tok = GgmlTokenizer::from_gguf(&h).unwrap();
        assert_eq!(tok.encode("ab", true, false).unwrap(), [0, 2]);
        // Decoding without specials drops the leading BOS (here the token "a").
        assert_eq!(tok.decode(&[0, 2], true, false).unwrap(), "ab");
    }

    #[test]
    fn what_cannot_be_tokenized_is_named() {
        let e = error("bert", None);
        assert!(
            e.contains("tokenizer.ggml.model = bert") && e.contains("WordPiece"),
            "{e}"
        );
        let e = error("gpt2", Some("no-such-pre"));
        assert!(e.contains("tokenizer.ggml.pre = no-such-pre"), "{e}");
        let e = error("none", None);
        assert!(e.contains("no vocabulary"), "{e}");
        // A missing pre-tokenizer is llama.cpp's default one.
        let tok = GgmlTokenizer::from_gguf(&header("gpt2", None)).unwrap();
        assert_eq!(tok.encode("ab", false, false).unwrap(), [2]);
    }

    fn clean(s: &str) -> String {
        let mut v = s.as_bytes().to_vec();
        clean_up_spaces(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn clean_up_spaces_matches_llama_cpp() {
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("it ' s"), "it's");
        assert_eq!(
            clean("I 'm sure they 're here , aren 't they"),
            "I'm sure they're here, aren 't they"
        );
        assert_eq!(clean(" 'll"), " 'll");
        assert_eq!(clean(""), "");
    }
}
