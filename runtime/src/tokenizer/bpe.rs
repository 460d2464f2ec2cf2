//! Merge-ranked BPE over a `tokenizer.ggml.*` vocabulary (`tokenizer.ggml.model = gpt2` or
//! `gemma4`), as llama.cpp's `llm_tokenizer_bpe_session` does it: the pre-tokenizer cuts the text
//! into words, each word is split into characters (after GPT-2's byte-to-unicode mapping, unless
//! the vocabulary spells raw UTF-8), and within a word the adjacent pair with the lowest merge
//! rank is merged until no listed merge applies.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use super::pretokenizer::{byte_to_char, PreTokenizer, PreTokenizerSpec};
use super::vocab::Vocab;
use super::TokenizerError;

pub(super) struct Bpe {
    /// Merge rank by the symbol ids of its two sides, as listed in `tokenizer.ggml.merges`.
    ranks: HashMap<(u32, u32), u32>,
    /// Merge sides that are not tokens, numbered after the vocabulary.
    extra_symbols: HashMap<String, u32>,
    pre: PreTokenizer,
    byte_encode: bool,
    ignore_merges: bool,
    newline_words_whole: bool,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    /// The id of its text as a token or merge side (none: it takes part in no merge).
    id: Option<u32>,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(PartialEq, Eq)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// Lowest rank first, then the leftmost pair (llama.cpp's `llm_bigram_bpe` comparator);
    /// used through `Reverse` in a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        (self.rank, self.left).cmp(&(other.rank, other.left))
    }
}

impl Bpe {
    /// llama.cpp looks merges up by the text of their two sides; numbering every side (token id,
    /// or a number after the vocabulary for the rare side that is no token) gives the same
    /// lookups without building strings.
    pub fn new<'m>(
        vocab: &Vocab,
        merges: impl ExactSizeIterator<Item = &'m str>,
        spec: &PreTokenizerSpec,
    ) -> Result<Self, TokenizerError> {
        let mut ranks = HashMap::with_capacity(merges.len());
        let mut extra_symbols: HashMap<String, u32> = HashMap::new();
        let mut symbol = |text: &str| -> Result<u32, TokenizerError> {
            if let Some(id) = vocab.id(text).or_else(|| extra_symbols.get(text).copied()) {
                return Ok(id);
            }
            let id = u32::try_from(vocab.len() + extra_symbols.len())
                .map_err(|_| TokenizerError::Invalid("too many merge symbols".into()))?;
            extra_symbols.insert(text.to_string(), id);
            Ok(id)
        };
        for (rank, merge) in merges.enumerate() {
            // llama.cpp splits at the first space after the first byte and keeps the first rank
            // of a repeated merge. A merge without that space, or with a side that holds a
            // space, can never apply: no symbol holds a space.
            let Some(at) = merge
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1)
            else {
                continue;
            };
            let (left, right) = (&merge[..at], &merge[at + 1..]);
            if left.contains(' ') || right.contains(' ') {
                continue;
            }
            let rank = u32::try_from(rank)
                .map_err(|_| TokenizerError::Invalid("more than 2^32 merges".into()))?;
            let key = (symbol(left)?, symbol(right)?);
            ranks.entry(key).or_insert(rank);
        }
        Ok(Self {
            ranks,
            extra_symbols,
            pre: PreTokenizer::new(spec.rules)?,
            byte_encode: spec.byte_encode,
            ignore_merges: spec.ignore_merges,
            newline_words_whole: spec.newline_words_whole,
        })
    }

    fn symbol_id(&self, vocab: &Vocab, text: &str) -> Option<u32> {
        vocab
            .id(text)
            .or_else(|| self.extra_symbols.get(text).copied())
    }

    /// Appends the tokens of `text` (one fragment between special tokens) to `out`.
    pub fn tokenize(
        &self,
        vocab: &Vocab,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut word = String::new();
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut queue = BinaryHeap::new();
        for range in self.pre.split(text)? {
            word.clear();
            if self.byte_encode {
                word.extend(text[range].bytes().map(byte_to_char));
            } else {
                word.push_str(&text[range]);
            }
            symbols.clear();
            queue.clear();

            let whole = (self.ignore_merges
                || (self.newline_words_whole && word.bytes().all(|b| b == b'\n')))
                && vocab.id(&word).is_some();
            if whole {
                symbols.push(Symbol {
                    start: 0,
                    len: word.len(),
                    id: None,
                    prev: None,
                    next: None,
                });
            } else {
                let n = word.chars().count();
                for (i, (start, c)) in word.char_indices().enumerate() {
                    let len = c.len_utf8();
                    symbols.push(Symbol {
                        start,
                        len,
                        id: self.symbol_id(vocab, &word[start..start + len]),
                        prev: i.checked_sub(1),
                        next: (i + 1 < n).then_some(i + 1),
                    });
                }
            }
            let add = |symbols: &[Symbol], queue: &mut BinaryHeap<_>, l, r| {
                let (Some(left), Some(right)) = (l, r) else {
                    return;
                };
                let (ls, rs): (&Symbol, &Symbol) = (&symbols[left], &symbols[right]);
                let (Some(a), Some(b)) = (ls.id, rs.id) else {
                    return;
                };
                if let Some(&rank) = self.ranks.get(&(a, b)) {
                    queue.push(Reverse(Bigram {
                        rank,
                        left,
                        right,
                        len: ls.len + rs.len,
                    }));
                }
            };
            for i in 1..symbols.len() {
                add(&symbols, &mut queue, Some(i - 1), Some(i));
            }
            while let Some(Reverse(b)) = queue.pop() {
                let (l, r) = (symbols[b.left], symbols[b.right]);
                // Stale when either side changed since the pair was queued: a symbol only grows
                // by absorbing its right neighbour, so equal lengths mean equal text.
                if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                    continue;
                }
                let merged = &mut symbols[b.left];
                merged.len += r.len;
                merged.id = self.symbol_id(vocab, &word[l.start..l.start + merged.len]);
                merged.next = r.next;
                symbols[b.right].len = 0;
                if let Some(n) = r.next {
                    symbols[n].prev = Some(b.left);
                }
                add(&symbols, &mut queue, l.prev, Some(b.left));
                add(&symbols, &mut queue, Some(b.left), r.next);
            }

            for s in symbols.iter().filter(|s| s.len > 0) {
                let piece = &word[s.start..s.start + s.len];
                match vocab.id(piece) {
                    Some(id) => out.push(id),
                    // llama.cpp looks each byte up on its own and drops what it cannot find.
                    None => {
                        for &b in piece.as_bytes() {
                            let id = if self.byte_encode {
                                std::str::from_utf8(&[b]).ok().and_then(|s| vocab.id(s))
                            } else {
                                vocab.id(&format!("<0x{b:02X}>"))
                            };
                            out.extend(id);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::pretokenizer::pre_tokenizer_spec;
    use super::super::vocab::attr;
    use super::*;

    fn vocab(texts: &[&str]) -> Vocab {
        let n = texts.len();
        Vocab::new(
            texts.iter().map(|t| t.to_string()).collect(),
            vec![0.0; n],
            vec![attr::NORMAL; n],
        )
        .unwrap()
    }

    fn pieces(bpe: &Bpe, v: &Vocab, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        bpe.tokenize(v, text, &mut out).unwrap();
        out.into_iter().map(|id| v.text(id).to_string()).collect()
    }

    #[test]
    fn merges_apply_by_rank_within_words() {
        let v = vocab(&["a", "b", "c", "Ġ", "ab", "bc", "Ġa", "Ġab"]);
        let spec = pre_tokenizer_spec("gpt-2").unwrap();
        // "b c" ranks before "a b": "abc" -> a + bc; in " ab" "a b" ranks before "Ġ a", which
        // leaves no merge for Ġ + ab.
        let bpe = Bpe::new(&v, ["b c", "a b", "Ġ a", "Ġa b"].into_iter(), &spec).unwrap();
        assert_eq!(pieces(&bpe, &v, "abc ab"), ["a", "bc", "Ġ", "ab"]);
        let bpe = Bpe::new(&v, ["Ġ a", "Ġa b", "a b"].into_iter(), &spec).unwrap();
        assert_eq!(pieces(&bpe, &v, " ab"), ["Ġab"]);
    }

    #[test]
    fn merge_sides_need_not_be_tokens() {
        // "ab" is no token, but llama.cpp merges by text, so "ab c" still applies.
        let v = vocab(&["a", "b", "c", "abc"]);
        let spec = pre_tokenizer_spec("gpt-2").unwrap();
        let bpe = Bpe::new(&v, ["a b", "ab c"].into_iter(), &spec).unwrap();
        assert_eq!(pieces(&bpe, &v, "abc"), ["abc"]);
        // Without "ab c", the symbol "ab" is left over; it is no token, and its bytes on their
        // own are, so they are what comes out.
        let bpe = Bpe::new(&v, ["a b"].into_iter(), &spec).unwrap();
        assert_eq!(pieces(&bpe, &v, "abc"), ["a", "b", "c"]);
    }

    #[test]
    fn ignore_merges_takes_whole_words() {
        let v = vocab(&["a", "b", "c", "bc", "abc"]);
        let spec = pre_tokenizer_spec("llama-bpe").unwrap();
        assert!(spec.ignore_merges);
        let bpe = Bpe::new(&v, ["b c"].into_iter(), &spec).unwrap();
        assert_eq!(pieces(&bpe, &v, "abc"), ["abc"]);
        let spec = pre_tokenizer_spec("qwen2").unwrap();
        let bpe = Bpe::new(&v, ["b c"].into_iter(), &spec).unwrap();
        assert_eq!(pieces(&bpe, &v, "abc"), ["a", "bc"]);
    }

    #[test]
    fn raw_utf8_vocabularies_fall_back_to_byte_tokens() {
        let v = vocab(&["h", "i", "hi", "<0xC3>", "<0xA9>"]);
        let spec = pre_tokenizer_spec("gemma4").unwrap();
        let bpe = Bpe::new(&v, ["h i"].into_iter(), &spec).unwrap();
        assert_eq!(pieces(&bpe, &v, "hié"), ["hi", "<0xC3>", "<0xA9>"]);
    }
}
