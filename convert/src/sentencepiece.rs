//! A SentencePiece `tokenizer.model` read into the vocabulary llama.cpp's converter writes for
//! it (`_create_vocab_sentencepiece`): every piece with its score and llama.cpp's token type,
//! then the tokens of `added_tokens.json` and `tokenizer_config.json`'s `added_tokens_decoder`.

use prost::Message;
use serde_json::Value as Json;

use crate::error::ConvertError;
use crate::hf::Checkpoint;

/// llama.cpp's token types (gguf-py's `TokenType`).
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const UNUSED: i32 = 5;
pub const BYTE: i32 = 6;

/// The parts of sentencepiece's `ModelProto` a vocabulary needs (field numbers from
/// sentencepiece_model.proto; every other field is skipped).
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
}

#[derive(Clone, PartialEq, Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6; absent means NORMAL.
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

/// Token texts, scores and types, `n_vocab` long.
pub struct SpmVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
}

/// Reads `tokenizer.model` (and the added tokens) as llama.cpp does.
pub fn read(ckpt: &Checkpoint, n_vocab: usize) -> Result<SpmVocab, ConvertError> {
    let path = ckpt.dir.join("tokenizer.model");
    let bytes = std::fs::read(&path).map_err(|e| ConvertError::io(&path, e))?;
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| {
        ConvertError::Input(format!(
            "{}: not a SentencePiece model: {e}",
            path.display()
        ))
    })?;
    let mut v = SpmVocab {
        tokens: (0..n_vocab).map(|i| format!("[PAD{i}]")).collect(),
        scores: vec![-10000.0; n_vocab],
        types: vec![UNUSED; n_vocab],
    };
    for (id, p) in model.pieces.iter().enumerate().take(n_vocab) {
        v.tokens[id] = p.piece.clone().unwrap_or_default();
        v.scores[id] = p.score.unwrap_or(0.0);
        // llama.cpp asks IsUnknown, IsControl, IsUnused, IsByte; user-defined pieces stay normal.
        v.types[id] = match p.kind.unwrap_or(1) {
            2 => UNKNOWN,
            3 => CONTROL,
            5 => UNUSED,
            6 => BYTE,
            _ => NORMAL,
        };
    }
    if let Some(added) = ckpt.read_json("added_tokens.json")? {
        for (text, id) in added.as_object().into_iter().flatten() {
            let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < n_vocab) else {
                continue;
            };
            v.tokens[id] = text.clone();
            v.scores[id] = -1000.0;
            v.types[id] = USER_DEFINED;
        }
    }
    let tok_cfg = ckpt
        .read_json("tokenizer_config.json")?
        .unwrap_or(Json::Null);
    for (id, data) in tok_cfg
        .get("added_tokens_decoder")
        .and_then(Json::as_object)
        .into_iter()
        .flatten()
    {
        let (Ok(id), Some(text)) = (
            id.parse::<usize>(),
            data.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        if id >= n_vocab {
            continue;
        }
        let special = data.get("special").and_then(Json::as_bool) == Some(true);
        if special || looks_special(text) {
            v.tokens[id] = text.to_string();
            v.types[id] = CONTROL;
        } else {
            // Pre-normalised: user-defined tokens match text with plain spaces.
            v.tokens[id] = text.replace('\u{2581}', " ");
            v.types[id] = USER_DEFINED;
        }
        v.scores[id] = -1000.0;
    }
    Ok(v)
}

/// gguf-py's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_keep_llama_cpp_types_and_scores() {
        let model = ModelProto {
            pieces: vec![
                Piece {
                    piece: Some("<unk>".into()),
                    score: Some(0.0),
                    kind: Some(2),
                },
                Piece {
                    piece: Some("<0x41>".into()),
                    score: Some(0.0),
                    kind: Some(6),
                },
                Piece {
                    piece: Some("\u{2581}the".into()),
                    score: Some(-3.5),
                    kind: None,
                },
                Piece {
                    piece: Some("<mine>".into()),
                    score: Some(0.0),
                    kind: Some(4),
                },
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.model"), model.encode_to_vec()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"added_tokens_decoder": {"3": {"content": "<|x|>", "special": false}}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), empty_safetensors()).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let v = read(&ckpt, 6).unwrap();
        assert_eq!(v.types, [UNKNOWN, BYTE, NORMAL, CONTROL, UNUSED, UNUSED]);
        assert_eq!(v.tokens[2], "\u{2581}the");
        assert_eq!(v.tokens[3], "<|x|>");
        assert_eq!(v.tokens[5], "[PAD5]");
        assert_eq!(v.scores[..4], [0.0, 0.0, -3.5, -1000.0]);
        assert_eq!(v.scores[4], -10000.0);
    }

    fn empty_safetensors() -> Vec<u8> {
        let header = b"{}";
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header);
        out
    }
}
