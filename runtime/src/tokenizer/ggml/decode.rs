//! Decoding as llama.cpp's `token_to_piece` and `detokenize` do it.

use super::super::pretokenizer::char_to_byte;
use super::super::vocab::attr;
use super::super::TokenizerError;
use super::{GgmlTokenizer, Model};

impl GgmlTokenizer {
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
pub(super) fn clean_up_spaces(t: &mut Vec<u8>) {
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
