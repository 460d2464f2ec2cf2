//! Incremental detokenization: text for each new token as it is generated, at a cost per token
//! that does not grow with the sequence.

use super::Tokenizer;

/// Decodes a window of recent ids (the scheme of Hugging Face's text-generation-inference): the
/// text of `ids[prefix..]` minus that of `ids[prefix..read]` is what the newest ids added, so
/// context-dependent decoding (a SentencePiece word's leading space, byte tokens forming one
/// character) comes out right without decoding the whole sequence again. Text ending in an
/// incomplete UTF-8 character is held back until the character completes.
pub struct Detokenizer<'t> {
    tok: &'t Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Ids up to here have been turned into text.
    read: usize,
}

impl<'t> Detokenizer<'t> {
    pub fn new(tok: &'t Tokenizer, skip_special: bool) -> Self {
        Self::after(tok, skip_special, &[])
    }

    /// A detokenizer for ids that follow `context` (the end of the prompt), whose text is not
    /// emitted: the first new word keeps the space a SentencePiece vocabulary encodes in it,
    /// which decoding it alone would strip.
    pub fn after(tok: &'t Tokenizer, skip_special: bool, context: &[u32]) -> Self {
        Self {
            tok,
            skip_special,
            ids: context.to_vec(),
            prefix: 0,
            read: context.len(),
        }
    }

    /// Adds one id; returns the text that became complete (often empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        self.emit(false)
    }

    /// Whatever is still held back (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self) -> String {
        self.emit(true)
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, self.skip_special).unwrap_or_default()
    }

    fn emit(&mut self, last: bool) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let before = self.decode(&self.ids[self.prefix..self.read]);
        let now = self.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && (last || !now.ends_with('\u{FFFD}')) {
            if let Some(new) = now.get(before.len()..) {
                let new = new.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                // Only the window is needed from here on.
                if self.prefix > 0 {
                    self.ids.drain(..self.prefix);
                    self.read -= self.prefix;
                    self.prefix = 0;
                }
                return new;
            }
        }
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    fn bundled() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/small-moe/small-moe-q8_0.gguf"
        );
        let file = GgufFile::open(path).expect("the bundled model opens");
        Tokenizer::from_gguf(file.header()).expect("it carries a tokenizer")
    }

    /// Token by token, the pieces add up to the whole sequence's decoding, multi-byte
    /// characters split over byte tokens included, while the window stays short.
    #[test]
    fn pieces_add_up_to_the_whole_decoding() {
        let tok = bundled();
        let text = "It is a truth universally acknowledged — naïve “quotes”, 日本語 and emoji 🐳, \
                    that a single man in possession of a good fortune must be in want of a wife.";
        let ids = tok.encode(text, false).unwrap();
        assert!(ids.len() > 40);
        for skip_special in [false, true] {
            let mut d = tok.stream(skip_special);
            let mut out = String::new();
            let mut longest_window = 0;
            for &id in &ids {
                out += &d.push(id);
                longest_window = longest_window.max(d.ids.len());
            }
            out += &d.finish();
            assert_eq!(out, tok.decode(&ids, skip_special).unwrap());
            assert!(
                longest_window <= 8,
                "the window grew to {longest_window} ids: decoding is not incremental"
            );
        }
    }

    /// After a context, the pieces are exactly what the new ids add to the context's text.
    #[test]
    fn pieces_after_a_context_are_what_the_ids_add() {
        let tok = bundled();
        let ids = tok
            .encode(
                "Call me Ishmael. Some years ago — never mind how long",
                false,
            )
            .unwrap();
        let (context, new) = ids.split_at(4);
        let mut d = Detokenizer::after(&tok, false, context);
        let mut out = String::new();
        for &id in new {
            out += &d.push(id);
        }
        out += &d.finish();
        let whole = tok.decode(&ids, false).unwrap();
        let before = tok.decode(context, false).unwrap();
        assert_eq!(out, whole[before.len()..]);
    }

    /// A character split over tokens is held back until it is complete, never emitted as
    /// U+FFFD halfway.
    #[test]
    fn incomplete_characters_are_held_back() {
        let tok = bundled();
        let ids = tok.encode("🐳🐳🐳", false).unwrap();
        let mut d = tok.stream(false);
        let pieces: Vec<String> = ids.iter().map(|&id| d.push(id)).collect();
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat() + &d.finish(), "🐳🐳🐳");
    }
}
