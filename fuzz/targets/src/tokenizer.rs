//! `tokenizer`: a `tokenizer.ggml.*` vocabulary (as other converters write it) built from a
//! small text description, written as a vocab-only GGUF, read back, and rebuilt into a
//! tokenizer (`Tokenizer::from_gguf`); the rest of the input is encoded, decoded and streamed.
//!
//! Input (lines; invalid UTF-8 is replaced):
//!
//! ```text
//! model=gpt2 pre=qwen2 bos_token_id=1 add_bos_token=true ...   (tokenizer.ggml.<key>=<value>)
//! TYPE<TAB>SCORE<TAB>TEXT                                       (one token per line)
//! #merges
//! A B                                                           (one merge per line)
//! #text
//! the text to encode, to the end of the input
//! ```
//!
//! A description keeps the fuzzer on vocabularies (token types, scores, merges, special ids,
//! pre-tokenizer names) rather than on GGUF framing, which the `gguf` target covers.

use moe_runtime::gguf::{GgufHeader, GgufWriter, Value};
use moe_runtime::tokenizer::Tokenizer;

/// Token ids decoded one by one at most (a fuzzed vocabulary may be large).
const MAX_IDS_CHECKED: usize = 2048;

pub struct Description {
    pub metadata: Vec<(String, Value)>,
    pub text: String,
}

pub fn describe(data: &[u8]) -> Description {
    let input = String::from_utf8_lossy(data);
    let (head, text) = match input.split_once("\n#text\n") {
        Some((h, t)) => (h.to_string(), t.to_string()),
        None => (input.to_string(), String::new()),
    };
    let (vocab, merges) = match head.split_once("\n#merges\n") {
        Some((v, m)) => (v, Some(m)),
        None => (head.as_str(), None),
    };
    let mut lines = vocab.lines();
    let mut metadata = Vec::new();
    for kv in lines.next().unwrap_or("").split_whitespace() {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let value = if let Ok(n) = v.parse::<u32>() {
            Value::U32(n)
        } else if let Ok(b) = v.parse::<bool>() {
            Value::Bool(b)
        } else {
            Value::String(v.to_string())
        };
        metadata.push((format!("tokenizer.ggml.{k}"), value));
    }
    let (mut tokens, mut types, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    for line in lines {
        let mut f = line.splitn(3, '\t');
        let (ty, score, text) = (f.next(), f.next(), f.next());
        let (ty, score, text) = match (ty, score, text) {
            (Some(ty), Some(score), Some(text)) => (ty, score, text),
            // A bare line is a normal token.
            _ => ("1", "0", line),
        };
        tokens.push(text.to_string());
        types.push(ty.trim().parse::<i32>().unwrap_or(1));
        scores.push(score.trim().parse::<f32>().unwrap_or(0.0));
    }
    metadata.push(("tokenizer.ggml.tokens".into(), Value::string_array(tokens)));
    metadata.push(("tokenizer.ggml.token_type".into(), Value::i32_array(types)));
    metadata.push(("tokenizer.ggml.scores".into(), Value::f32_array(scores)));
    if let Some(m) = merges {
        metadata.push((
            "tokenizer.ggml.merges".into(),
            Value::string_array(m.lines()),
        ));
    }
    // A key given twice is refused by the reader; keep the first.
    let mut seen = std::collections::HashSet::new();
    metadata.retain(|(k, _)| seen.insert(k.clone()));
    Description { metadata, text }
}

pub fn run(data: &[u8]) {
    let d = describe(data);
    let bytes = GgufWriter::begin(Vec::new(), &d.metadata, Vec::new(), 32)
        .and_then(|w| w.finish())
        .expect("a vocab-only GGUF writes");
    let h = GgufHeader::parse(&bytes).expect("what the writer wrote parses");
    let Ok(tok) = Tokenizer::from_gguf(&h) else {
        return;
    };
    let n = tok.vocab_size();
    for id in 0..n.min(MAX_IDS_CHECKED) as u32 {
        let _ = (tok.token_bytes(id), tok.token_text(id), tok.is_special(id));
    }
    let _ = tok.token_bytes(n as u32);
    for add_special in [false, true] {
        let Ok(ids) = tok.encode(&d.text, add_special) else {
            continue;
        };
        assert!(
            ids.iter().all(|&id| (id as usize) < n),
            "encode returned an id outside the vocabulary ({n} tokens): {ids:?}"
        );
        let _ = tok.decode(&ids, false);
        let _ = tok.decode(&ids, true);
        let mut stream = tok.stream(false);
        for &id in &ids {
            let _ = stream.push(id);
        }
        let _ = stream.finish();
    }
    // Ids a client may send (`prompt` as token ids) are not checked against the vocabulary
    // by the tokenizer's callers before decoding logprobs alternatives: decoding must refuse.
    let _ = tok.decode(&[n as u32, u32::MAX], false);
}
