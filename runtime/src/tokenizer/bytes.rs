//! The bytes each token stands for: what constrained decoding matches against a grammar and
//! what `logprobs` report, independent of how the vocabulary spells bytes in its strings.

use super::pretokenizer::char_to_byte;

/// How an embedded Hugging Face vocabulary spells bytes in its token strings, read from its
/// decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Spelling {
    /// GPT-2's byte-level alphabet (`Ġ` for a space).
    ByteLevel,
    /// SentencePiece's `▁` for a space, and (with byte fallback) `<0xXX>` tokens for bytes.
    Metaspace { byte_fallback: bool },
    /// The strings are the text.
    Plain,
}

impl Spelling {
    /// From a tokenizer.json's `decoder`.
    pub(super) fn of_decoder(decoder: &serde_json::Value) -> Self {
        let text = decoder.to_string();
        if text.contains("\"ByteLevel\"") {
            Self::ByteLevel
        } else if text.contains("\"Metaspace\"") || text.contains('\u{2581}') {
            Self::Metaspace {
                byte_fallback: text.contains("\"ByteFallback\""),
            }
        } else {
            Self::Plain
        }
    }

    /// The bytes of an ordinary (not added) token.
    pub(super) fn bytes(self, token: &str) -> Vec<u8> {
        match self {
            Self::ByteLevel => token
                .chars()
                .map(|c| char_to_byte(c).unwrap_or(b'?'))
                .collect(),
            Self::Metaspace { byte_fallback } => {
                if byte_fallback {
                    if let Some(b) = byte_token(token) {
                        return vec![b];
                    }
                }
                token.replace('\u{2581}', " ").into_bytes()
            }
            Self::Plain => token.as_bytes().to_vec(),
        }
    }
}

/// The byte of a `<0xXX>` token.
pub(super) fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn spellings() {
        assert_eq!(Spelling::ByteLevel.bytes("Ġthe"), b" the");
        assert_eq!(Spelling::ByteLevel.bytes("Ċ"), b"\n");
        let spm = Spelling::Metaspace {
            byte_fallback: true,
        };
        assert_eq!(spm.bytes("\u{2581}the"), b" the");
        assert_eq!(spm.bytes("<0x0A>"), b"\n");
        assert_eq!(spm.bytes("<0xZZ>"), b"<0xZZ>");
        assert_eq!(Spelling::Plain.bytes("<0x0A>"), b"<0x0A>");
        let decoder = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]});
        assert_eq!(Spelling::of_decoder(&decoder), spm);
        let decoder = serde_json::json!({"type": "ByteLevel", "add_prefix_space": true});
        assert_eq!(Spelling::of_decoder(&decoder), Spelling::ByteLevel);
    }

    /// The bundled model's embedded byte-level vocabulary spells any text, multi-byte
    /// characters split over tokens included, and its end-of-turn token is special.
    #[test]
    fn an_embedded_vocabulary_spells_text() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/small-moe/small-moe-q8_0.gguf"
        );
        let file = GgufFile::open(path).unwrap();
        let tok = Tokenizer::from_gguf(file.header()).unwrap();
        let text = "Whales — naïve “quotes”, 日本語 🐳 and\nnew lines.";
        let ids = tok.encode(text, false).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| tok.token_bytes(id).unwrap())
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        let eos = tok.eos().expect("the bundled model has an end token");
        assert!(tok.is_special(eos));
        assert!(!tok.is_special(ids[0]));
        assert_eq!(tok.token_bytes(tok.vocab_size() as u32 + 10), None);
    }
}
