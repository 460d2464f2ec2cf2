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

use super::bpe::Bpe;
use super::vocab::{attr, Vocab};
use super::{spm, TokenizerError};

mod decode;
mod load;

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
impl GgmlTokenizer {
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

    /// Whether `id` is a control token (or unknown, which llama.cpp treats alike).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.contains(id) && self.vocab.attr(id) & (attr::CONTROL | attr::UNKNOWN) != 0
    }

    /// The token's text as the vocabulary spells it (`Ġ`, `▁`, `<0x0A>` and all).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.contains(id).then(|| self.vocab.text(id))
    }
}
#[cfg(test)]
mod tests {
    use super::decode::clean_up_spaces;
    use super::*;
    use crate::gguf::{GgufHeader, GgufWriter, Value};

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
