//! SentencePiece BPE over a `tokenizer.ggml.*` vocabulary (`tokenizer.ggml.model = llama`), as
//! llama.cpp's `llm_tokenizer_spm_session` does it: the text is split into characters, then the
//! adjacent pair whose concatenation is the token with the highest score is merged, again and
//! again; characters that end up in no token are written as `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;
use super::TokenizerError;

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// Highest score first; of equal scores the leftmost pair (llama.cpp's `llm_bigram_spm`
    /// comparator, which compares scores with `<`, so NaN ranks as equal).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Appends the tokens of `text` (spaces already escaped as `▁`) to `out`.
pub(super) fn tokenize(
    vocab: &Vocab,
    text: &str,
    out: &mut Vec<u32>,
) -> Result<(), TokenizerError> {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        let len = c.len_utf8();
        symbols.push(Symbol {
            start,
            len,
            prev: i.checked_sub(1),
            next: (start + len < text.len()).then_some(i + 1),
        });
    }
    let mut queue = BinaryHeap::new();
    let try_add = |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, left, right| {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r): (&Symbol, &Symbol) = (&symbols[left], &symbols[right]);
        let piece = &text[l.start..l.start + l.len + r.len];
        if let Some(id) = vocab.id(piece) {
            queue.push(Bigram {
                left,
                right,
                score: vocab.score(id),
                len: piece.len(),
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(&symbols, &mut queue, Some(i - 1), Some(i));
    }
    while let Some(b) = queue.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        // A pair one of whose symbols has changed since it was queued is stale.
        if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
            continue;
        }
        symbols[b.left].len += r.len;
        symbols[b.right].len = 0;
        symbols[b.left].next = r.next;
        if let Some(n) = r.next {
            symbols[n].prev = Some(b.left);
        }
        try_add(&symbols, &mut queue, l.prev, Some(b.left));
        try_add(&symbols, &mut queue, Some(b.left), r.next);
    }

    let mut at = (!symbols.is_empty()).then_some(0);
    while let Some(i) = at {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        // Merged symbols are always tokens (a pair is only queued when it is one), so only a
        // single character can be missing; llama.cpp's `rev_merge` lookup never applies to it.
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    out.push(byte_token(vocab, b)?);
                }
            }
        }
        at = s.next;
    }
    Ok(())
}

/// llama.cpp's `byte_to_token` for SentencePiece vocabularies: `<0xXX>`, else the byte itself.
fn byte_token(vocab: &Vocab, b: u8) -> Result<u32, TokenizerError> {
    vocab
        .id(&format!("<0x{b:02X}>"))
        .or_else(|| std::str::from_utf8(&[b]).ok().and_then(|s| vocab.id(s)))
        .ok_or_else(|| {
            TokenizerError::Encode(format!(
                "the vocabulary has no byte token <0x{b:02X}> for a character it cannot spell"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::super::vocab::attr;
    use super::*;

    fn vocab(tokens: &[(&str, f32)]) -> Vocab {
        let mut texts: Vec<String> = tokens.iter().map(|t| t.0.to_string()).collect();
        let mut scores: Vec<f32> = tokens.iter().map(|t| t.1).collect();
        let mut attrs = vec![attr::NORMAL; texts.len()];
        for b in 0..=255u8 {
            texts.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            attrs.push(attr::BYTE);
        }
        Vocab::new(texts, scores, attrs).unwrap()
    }

    fn ids(v: &Vocab, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        tokenize(v, text, &mut out).unwrap();
        out.into_iter().map(|id| v.text(id).to_string()).collect()
    }

    #[test]
    fn merges_by_score_not_by_length() {
        // "ab" scores higher than "bc", so "abc" becomes ab + c even though "bc" exists too.
        let v = vocab(&[
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -2.0),
            ("bc", -3.0),
        ]);
        assert_eq!(ids(&v, "abc"), ["ab", "c"]);
        let v = vocab(&[
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -3.0),
            ("bc", -2.0),
        ]);
        assert_eq!(ids(&v, "abc"), ["a", "bc"]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let v = vocab(&[("a", -1.0), ("aa", -2.0)]);
        assert_eq!(ids(&v, "aaa"), ["aa", "a"]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let v = vocab(&[("▁", -1.0), ("x", -1.0)]);
        assert_eq!(ids(&v, "▁é"), ["▁", "<0xC3>", "<0xA9>"]);
    }
}
